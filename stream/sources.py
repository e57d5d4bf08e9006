"""Event-log sources for replay: files now (JSON lines, gzip, the importers' formats).

Same contract as the live Kafka source: `next_batch()` returns a RecordBatch and never
blocks on anything but local I/O; an empty batch with `exhausted` true means the end.
Positions: a file record's topic is its path, partition 0, offset its line number
(1-based), so dead letters point at the exact line.
"""

from __future__ import annotations

import glob
import gzip
import os
from pathlib import Path
from typing import Iterator

import orjson

from stream.events import RecordBatch

JSON_FORMATS = ("jsonl",)
IMPORT_FORMATS = ("taobao", "rees46", "yoochoose", "retailrocket")


class SourceError(ValueError):
    """A replay source that does not exist or cannot be read."""


def expand_paths(sources: list[str]) -> list[Path]:
    """Files named directly, by glob, or found (sorted, recursively) under directories."""
    paths: list[Path] = []
    for source in sources:
        if any(ch in source for ch in "*?["):
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                raise SourceError(f"no file matches {source!r}")
            paths += [Path(m) for m in matches if os.path.isfile(m)]
        elif os.path.isdir(source):
            found = sorted(p for p in Path(source).rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise SourceError(f"directory {source!r} holds no files")
            paths += found
        elif os.path.isfile(source):
            paths.append(Path(source))
        else:
            raise SourceError(f"{source!r} does not exist")
    return paths


def _open(path: Path):
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


class FileSource:
    """Records of JSON-lines files (or of public dataset files, converted on the fly), in batches."""

    def __init__(self, paths: list[Path], batch_records: int, fmt: str = "jsonl") -> None:
        if fmt not in JSON_FORMATS + IMPORT_FORMATS:
            raise SourceError(f"unknown format {fmt!r}")
        self.paths = paths
        self.batch_records = batch_records
        self.format = fmt
        self.total_bytes = sum(p.stat().st_size for p in paths)
        self._done_bytes = 0
        self._lines = self._records()
        self.exhausted = False

    @property
    def bytes_read(self) -> int:
        """Bytes of whole files finished, plus the position in the current one (for progress bars)."""
        return self._done_bytes + self._current_pos()

    def _current_pos(self) -> int:
        fh = getattr(self, "_fh", None)
        try:
            return fh.fileobj.tell() if isinstance(fh, gzip.GzipFile) else (fh.tell() if fh else 0)
        except (ValueError, OSError):
            return 0

    def _records(self) -> Iterator[tuple[str, int, bytes]]:
        for path in self.paths:
            name = str(path)
            if self.format == "jsonl":
                with _open(path) as self._fh:
                    for number, line in enumerate(self._fh, 1):
                        line = line.rstrip(b"\r\n")
                        if line:
                            yield name, number, line
            else:
                from models.importers import iter_import

                # Converted on the fly (progress advances per file); line = the event's position.
                for number, event in enumerate(iter_import(self.format, path), 1):
                    yield name, number, orjson.dumps(event)
            self._fh = None
            self._done_bytes += path.stat().st_size

    def next_batch(self) -> RecordBatch:
        topics, offsets, values = [], [], []
        for name, number, line in self._lines:
            topics.append(name)
            offsets.append(number)
            values.append(line)
            if len(values) >= self.batch_records:
                break
        else:
            self.exhausted = True
        n = len(values)
        return RecordBatch(topics, [0] * n, offsets, [None] * n, values)
