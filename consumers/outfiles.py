"""Output files that are either complete or clearly partial, never a truncated earlier good file.

`OutputFile(path)` writes to a temporary file beside `path`; `commit()` renames it over `path`,
`keep_partial()` (an interrupted run) renames it to `<path>.partial`, `discard()` (a failed run)
deletes it, leaving any earlier `path` as it was. `-` is standard output; a path that exists and
is not a regular file (/dev/null, a FIFO) is written directly. A name ending in .gz is compressed.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator

STDOUT = "-"


class OutputError(OSError):
    """An output file that cannot be written (missing directory, no permission)."""


class Interrupted(Exception):
    """Ctrl-C: the command stopped early; the message is the one-line summary of what was written."""


def is_regular_path(path: str) -> bool:
    """True for a path a file will be created at (not `-`, not /dev/null or another special file)."""
    return path != STDOUT and (not os.path.exists(path) or os.path.isfile(path))


def default_dead_letters(out: str | None, fallback: str) -> str:
    """Dead letters beside the output when that is a regular file, else `fallback` in the working directory."""
    return f"{out}.dlq.jsonl" if out and is_regular_path(out) else fallback


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputFile:
    """A binary output file written atomically (see the module docstring)."""

    def __init__(self, path: str, flag: str = "--out", compresslevel: int = 9) -> None:
        self.path = path
        self._tmp: str | None = None
        self._raw: IO[bytes]
        if path == STDOUT:
            self._raw = sys.stdout.buffer
        elif not is_regular_path(path):
            self._raw = self._open(lambda: open(path, "wb"), flag)
        else:
            directory = os.path.dirname(os.path.abspath(path))
            fd, self._tmp = self._open(lambda: tempfile.mkstemp(
                prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory), flag)
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
            self._raw = os.fdopen(fd, "wb")
        # Compression follows the name the file will have, not the temporary one; no time in the header,
        # so the same output is the same bytes.
        self.file: IO[bytes] = (gzip.GzipFile(os.path.basename(path), "wb", compresslevel, self._raw, mtime=0)
                                if path.endswith(".gz") and path != STDOUT else self._raw)
        self.lines = 0

    def _open(self, opener, flag: str):
        try:
            return opener()
        except OSError as exc:
            directory = os.path.dirname(os.path.abspath(self.path))
            if isinstance(exc, FileNotFoundError) and not os.path.isdir(directory):  # not /proc's "no such file"
                raise OutputError(f"cannot write {flag} {self.path}: directory {directory} does not exist") from None
            raise OutputError(f"cannot write {flag} {self.path}: {exc.strerror}") from None

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def _close(self) -> None:
        if self.file is not self._raw:
            self.file.close()  # the gzip trailer; leaves _raw open
        if self._raw is sys.stdout.buffer:
            self._raw.flush()
        else:
            self._raw.close()

    def commit(self) -> str:
        """Complete: the output replaces `path`. Returns where it is."""
        self._close()
        if self._tmp:
            os.replace(self._tmp, self.path)
            self._tmp = None
        return self.path

    def keep_partial(self) -> str:
        """Interrupted: what was written is kept as `<path>.partial` (`path` itself is left alone)."""
        self._close()
        if not self._tmp:
            return self.path
        partial = self.path + ".partial"
        os.replace(self._tmp, partial)
        self._tmp = None
        return partial

    def discard(self) -> None:
        """Failed: the temporary file goes; an earlier `path` is left as it was."""
        try:
            self._close()
        except OSError:
            pass
        if self._tmp:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None


def check_output_dir(path: str, flag: str = "--out") -> str:
    """`path`'s directory; fail now, not after minutes of work, where it does not exist or takes no new file."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OutputError(f"cannot write {flag} {path}: directory {directory} does not exist")
    _check_takes_files(directory, flag, path)
    return directory


def check_output_tree(directory: str, flag: str) -> None:
    """As check_output_dir, for a directory made with its missing parents (mkdir -p): the nearest one that exists
    must take new files."""
    existing = os.path.abspath(directory)
    while not os.path.isdir(existing):
        if os.path.lexists(existing):
            raise OutputError(f"cannot write {flag} {directory}: {existing} is not a directory")
        existing = os.path.dirname(existing)
    _check_takes_files(existing, flag, directory)


def _check_takes_files(directory: str, flag: str, path: str) -> None:
    """A file is made in `directory` and removed: write permission alone does not say it can be (root under /sys)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".probe", dir=directory)
    except OSError as exc:
        raise OutputError(f"cannot write {flag} {path}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def check_distinct(outputs: dict[str, str | None]) -> None:
    """Two of a command's outputs (flag -> path) that are one file: the one written last would replace the other."""
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        if path and is_regular_path(path):
            key = os.path.realpath(path)
            if key in seen:
                raise OutputError(f"{seen[key]} and {flag} are the same file, {path}: give each its own")
            seen[key] = flag


@contextmanager
def atomic_paths(*paths: str, flag: str = "--out") -> Iterator[list[str]]:
    """For code that opens its outputs by name: temporary paths beside `paths` (ending in .gz where
    theirs do), renamed over them when the block succeeds, to `<path>.partial` on Ctrl-C (raising
    Interrupted), deleted on an error. `-` (standard output) and special files (/dev/null) get a
    temporary file in the system's temporary directory, copied to them when the block succeeds:
    a rename would replace the special file itself."""
    temps: list[str] = []
    try:
        for path in paths:
            regular = is_regular_path(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                                       dir=check_output_dir(path, flag) if regular else None,
                                       suffix=".tmp.gz" if regular and path.endswith(".gz") else ".tmp")
            os.fchmod(fd, 0o666 & ~_umask())
            os.close(fd)
            temps.append(tmp)
        yield temps
    except KeyboardInterrupt:
        kept = []
        for tmp, path in zip(temps, paths):
            if is_regular_path(path):
                os.replace(tmp, path + ".partial")
                kept.append(path + ".partial")
            else:  # nothing half-written goes to standard output
                os.unlink(tmp)
        raise Interrupted(f"interrupted: partial output kept in {', '.join(kept) or 'no file'}") from None
    except BaseException:
        for tmp in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    for tmp, path in zip(temps, paths):
        if is_regular_path(path):
            os.replace(tmp, path)
        else:
            _copy_out(tmp, path)


def _copy_out(tmp: str, path: str) -> None:
    """A finished temporary file to standard output or a special file; then it goes."""
    try:
        with open(tmp, "rb") as src:
            if path == STDOUT:
                shutil.copyfileobj(src, sys.stdout.buffer)
                sys.stdout.buffer.flush()
            else:
                with open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    finally:
        os.unlink(tmp)
