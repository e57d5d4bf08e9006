"""The `profiles` command line: the group, and the wiring of its commands.

The commands live in consumers/commands/ (live.py: against a deployment's topics; logs.py: over event
logs; modelling.py: models and the benchmark); options shared between them, and the one mapping from
options to Settings, in consumers/commands/options.py. Every `run` flag has an environment fallback
(shown in --help): KAFKA_BOOTSTRAP_SERVERS for the brokers, PROFILES_<OPTION> for the rest. The flags
build one frozen Settings object, which is passed down explicitly.
"""

from __future__ import annotations

import logging
import os
import sys

# Before torch is imported (its OpenMP runtime reads this once, when it loads): idle OpenMP threads sleep
# instead of spinning. The GRU pass runs on every core (--gru-threads); a thread left spinning after it
# holds a core the broker client's threads (and, on a small machine, the broker) need, and when the
# cores are shared the pass waits for threads that are not running. Measured in docs/benchmarks.md.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402 (after the environment above)

from consumers.commands import live, logs, modelling  # noqa: E402
from consumers.commands.base import ProfilesGroup  # noqa: E402

log = logging.getLogger("profiles")


def _setup_logging(level: str) -> None:
    from stream.kafka import configure_librdkafka_log

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    configure_librdkafka_log(debug=level.lower() == "debug")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("profiles")
    except PackageNotFoundError:
        return "unknown (not installed)"


@click.group(cls=ProfilesGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(_version(), "--version", prog_name="profiles", message="%(prog)s %(version)s")
@click.option("--log-level", default="info", show_default=True, envvar="PROFILES_LOG_LEVEL", show_envvar=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              help="Also accepted after the subcommand. debug: librdkafka's own log and tracebacks too.")
def main(log_level: str) -> None:
    """Real-time e-commerce user profiles: Kafka events in, GRU-updated profiles out.

    Start with `profiles demo` to see it work on an embedded broker.
    """
    _setup_logging(log_level)


for _command in (
    live.run, live.forget, live.tail, live.get,
    logs.replay, logs.inspect, logs.generate, logs.demo, logs.import_, logs.split,
    modelling.train, modelling.calibrate, modelling.evaluate, modelling.evaluate_fields, modelling.evaluate_synthetic,
    modelling.model, modelling.bench,
):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
