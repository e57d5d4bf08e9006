"""The sources' contract (`BatchSource`) and the replay's sources: files (JSON lines, gzip, the
importers' formats) and Kafka topic ranges (kafka://TOPIC?from=&to=). The live source, the daemon's
Kafka consumer, is consumers/source.py.

Positions: a file record's topic is its path, partition 0, offset its line number
(1-based), so dead letters point at the exact line.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import logging
import os
import stat
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlparse

import numpy as np
import orjson

from stream.events import NOT_JSON, NOT_OBJECT, TOO_LARGE, DeadLetter, EventColumns, RecordBatch, epoch_ms
from stream.import_formats import FORMATS
from stream.import_rows import BOM, ImportReport
from stream.settings import KafkaSettings

log = logging.getLogger(__name__)

JSON_FORMATS = ("jsonl",)
IMPORT_FORMATS = FORMATS  # the importers' (stream/import_formats.py): written once, there


class SourceError(ValueError):
    """A replay source that does not exist or cannot be read."""


def expand_paths(sources: list[str], outputs: Mapping[str, str | None] | None = None) -> list[Path]:
    """Files named directly, by glob, or found (sorted, recursively) under directories.

    `outputs` (flag -> path) are the command's own output files. One named as a source is refused: it
    would be overwritten while it is read. One that a directory or glob finds (an earlier run's output,
    or its .partial, beside the logs) is skipped, with a log line."""
    own = _output_files(outputs or {})
    paths: list[Path] = []
    for source in sources:
        if any(ch in source for ch in "*?["):
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                raise SourceError(f"no file matches {source!r}")
            paths += _not_own([Path(m) for m in matches if os.path.isfile(m)], own)
        elif os.path.isdir(source):
            found = sorted(p for p in Path(source).rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise SourceError(f"directory {source!r} holds no files")
            paths += _not_own(found, own)
        elif os.path.isfile(source):
            flag, named = own.get(_file_id(source), (None, False))
            if named:
                raise SourceError(f"{flag} {source} is one of the inputs (it would be overwritten while it is read)")
            paths.append(Path(source))
        elif source == "-" or os.path.exists(source):  # a pipe, a device, or standard input
            raise SourceError(f"{source!r} is not a file, directory or glob: event logs are read from files (and "
                              f"kafka:// ranges), not from pipes or standard input; write the events to a file first")
        else:
            raise SourceError(f"{source!r} does not exist")
    return paths


def _file_id(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of a regular file, None for anything else: names of one file compare equal."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _output_files(outputs: Mapping[str, str | None]) -> dict[tuple[int, int] | None, tuple[str, bool]]:
    """The output files that exist, and their .partial: file id -> (flag, whether it is the output itself)."""
    own: dict[tuple[int, int] | None, tuple[str, bool]] = {}
    for flag, path in outputs.items():
        if path and path != "-":  # '-' is standard output, whatever a file of that name holds
            own[_file_id(path + ".partial")] = (flag, False)
            own[_file_id(path)] = (flag, True)
    own.pop(None, None)
    return own


def _not_own(found: list[Path], own: dict[tuple[int, int] | None, tuple[str, bool]]) -> list[Path]:
    if not own:
        return found
    kept = []
    for path in found:
        if (mine := own.get(_file_id(path))) is None:
            kept.append(path)
        else:
            log.warning("skipping %s: it is this command's %s%s, not an input", path, mine[0],
                        "" if mine[1] else " (partial)")
    return kept


def format_hint(dead: DeadLetter) -> str:
    """Why a record may have failed as a whole, when its file looks like another layout than JSON lines."""
    value = (dead.value or b"").lstrip()
    if dead.reason == TOO_LARGE and value.startswith(b"["):  # a whole JSON array on one line
        return "; is it a JSON array? The events are JSON lines: one JSON object per line"
    if dead.reason not in (NOT_JSON, NOT_OBJECT):
        return ""
    if value.startswith((b"\xff\xfe", b"\xfe\xff")) or value.count(b"\x00") * 4 > len(value):
        return "; it looks like UTF-16 text: the events are UTF-8 (iconv -f UTF-16 -t UTF-8 converts it)"
    if value.startswith((b"[", b"{", b"}", b'"')):  # an array's or a pretty-printed object's lines
        return "; is it a JSON array or pretty-printed JSON? The events are JSON lines: one JSON object per line"
    if dead.reason == NOT_JSON and (b"," in value or b"\t" in value):
        return (f"; it looks like CSV: convert it with `profiles import --format` ({', '.join(IMPORT_FORMATS)}), "
                "or replay it so with `profiles replay --format`")
    return ""


def no_usable_events(sources: list, reasons: Mapping[str, int], example: DeadLetter | None) -> str:
    """The error of a command that found no event to use in `sources`: how many records broke the
    contract, for what reason most of them, one as an example, and a hint where the file looks like CSV
    or a JSON array. `example` is a dead letter of the most frequent reason."""
    dead = sum(reasons.values())
    why = ""
    if dead and example is not None:
        most = max(reasons.values())
        why = (f" ({dead:,} records broke the event contract, {most:,} as {example.reason}, e.g. "
               f"{example.topic}:{example.offset}: {example.detail}{format_hint(example)})")
    return f"no usable events in {', '.join(map(str, sources))}{why}"


def no_usable_events_among(sources: list, dead: list[DeadLetter]) -> str:
    """no_usable_events for a command that holds its dead letters: their reasons counted, the first of the
    most frequent one as the example."""
    reasons = Counter(d.reason for d in dead)
    top = reasons.most_common(1)
    return no_usable_events(sources, reasons, next(d for d in dead if d.reason == top[0][0]) if top else None)


def _open(path: Path):
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _whole_lines(path: Path) -> int:
    """Lines readable from a damaged gzip before it breaks (the error path only: reads it again)."""
    n = 0
    try:
        with gzip.open(path, "rb") as fh:
            for _line in fh:
                n += 1
    except (EOFError, gzip.BadGzipFile, zlib.error):
        pass
    return n


@runtime_checkable
class BatchSource(Protocol):
    """What every source of record batches provides: the daemon's Kafka consumer (consumers/source.py),
    the replay's files and kafka:// ranges (below).

    - A batch: `next_batch(stop)` returns a RecordBatch, possibly empty, blocking no longer than the
      batch window (the live source: `batch_max_ms`, or until `stop` is set) or on local I/O (files).
    - The end: `exhausted` turns true once every record has been returned; the live source never
      ends. An empty batch alone is not the end.
    - Positions: each record carries its (topic, partition, offset). `positions()` is where a reader
      of the same topics would continue: per topic, partition -> the next offset (files: none).
    - `time_range`: the event-time range whose events are applied (None: all); `name` and
      `progress()` (done, total; 0: unknown) for progress reports, in the source's own unit.
    """

    name: str
    time_range: TimeRange | None
    exhausted: bool

    def next_batch(self, stop: threading.Event | None = None) -> RecordBatch: ...

    def positions(self) -> dict[str, dict[int, int]]: ...

    def progress(self) -> tuple[int, int]: ...


class FileSource:
    """Records of JSON-lines files (or of public dataset files, converted on the fly), in batches.
    A BatchSource: ends at the last file's end; progress in bytes."""

    time_range = None

    def __init__(self, paths: list[Path], batch_records: int, fmt: str = "jsonl", keep_rejected: bool = False) -> None:
        if fmt not in JSON_FORMATS + IMPORT_FORMATS:
            raise SourceError(f"unknown format {fmt!r}")
        self.paths = paths
        self.batch_records = batch_records
        self.format = fmt
        # Rows an import format cannot convert: kept as dead letters for take_rejected() (a replay), or
        # else counted in one warning per file.
        self._rejected: list[DeadLetter] | None = [] if keep_rejected else None
        self.total_bytes = sum(p.stat().st_size for p in paths)
        self._done_bytes = 0
        self._chunk_iter = self._chunks()
        self._name, self._numbers, self._values, self._at = "", [], [], 0  # the chunk being consumed
        self.exhausted = False
        self.name = f"{len(paths)} file(s)"

    def positions(self) -> dict[str, dict[int, int]]:
        return {}  # files are no topics a reader continues

    def progress(self) -> tuple[int, int]:
        return self.bytes_read, self.total_bytes

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

    def _chunks(self) -> Iterator[tuple[str, list[int], list[bytes]]]:
        """(file name, line numbers, records) in chunks: lines are read a megabyte at a time, not one by one."""
        for path in self.paths:
            name = str(path)
            if self.format == "jsonl":
                with _open(path) as self._fh:
                    first = 1
                    while lines := self._read_lines(path, first):
                        if first == 1 and lines[0].startswith(BOM):  # once per file: some tools write one
                            lines[0] = lines[0][len(BOM):]
                        # Trailing whitespace (a CRLF, spaces) is no part of a record, and a line of only
                        # whitespace is a blank line. In C, not a Python loop.
                        records = list(map(bytes.rstrip, lines))
                        numbers = list(range(first, first + len(lines)))
                        first += len(lines)
                        if not all(records):  # skip blank lines, keep the others' line numbers
                            numbers = [n for n, r in zip(numbers, records) if r]
                            records = [r for r in records if r]
                        yield name, numbers, records
            else:
                from stream.importers import DamagedFile, iter_import

                # Converted on the fly (progress advances per file); line = the event's position.
                report = ImportReport(rejected=[]) if self._rejected is not None else None
                events = enumerate(iter_import(self.format, path, report), 1)
                try:
                    while chunk := list(itertools.islice(events, 10_000)):
                        self._keep_rejected(name, report)
                        yield name, [n for n, _ in chunk], [orjson.dumps(e) for _, e in chunk]
                except DamagedFile as exc:
                    raise SourceError(str(exc)) from None
                except (ValueError, UnicodeDecodeError) as exc:
                    raise SourceError(f"{exc} (is --format {self.format} right? the event contract's JSON lines "
                                      "are --format jsonl)") from None
                self._keep_rejected(name, report)
            self._fh = None
            self._done_bytes += path.stat().st_size

    def _keep_rejected(self, name: str, report: ImportReport | None) -> None:
        if report is None:
            return
        self._rejected += [DeadLetter(row.encode(), None, reason,
                                      f"--format {self.format}: row not converted ({reason.replace('_', ' ')})",
                                      name, 0, line) for reason, line, row in report.rejected]
        report.rejected.clear()

    def take_rejected(self) -> list[DeadLetter]:
        """The rows read so far that the import format could not convert (line = the row's line in its
        file, value = its fields joined by the file's delimiter), each once; with keep_rejected only."""
        rejected = self._rejected or []
        if self._rejected is not None:
            self._rejected = []
        return rejected

    def _read_lines(self, path: Path, first: int) -> list[bytes]:
        """About a megabyte of whole lines; a damaged gzip becomes a SourceError naming where it broke."""
        try:
            return self._fh.readlines(1 << 20)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            at = self._fh.fileobj.tell() if isinstance(self._fh, gzip.GzipFile) else self._fh.tell()
            raise SourceError(f"{path}: gzip data broken after line {_whole_lines(path):,} (compressed byte "
                              f"{at:,} of {path.stat().st_size:,}): {exc}") from None

    def next_batch(self, stop: threading.Event | None = None) -> RecordBatch:
        """Up to batch_records records (fewer only at the end)."""
        topics: list[str] = []
        offsets: list[int] = []
        values: list[bytes] = []
        while len(values) < self.batch_records:
            if self._at >= len(self._values):
                chunk = next(self._chunk_iter, None)
                if chunk is None:
                    self.exhausted = True
                    break
                self._name, self._numbers, self._values = chunk
                self._at = 0
            end = min(len(self._values), self._at + self.batch_records - len(values))
            values += self._values[self._at:end]
            offsets += self._numbers[self._at:end]
            topics += [self._name] * (end - self._at)
            self._at = end
        return RecordBatch.of(values, topic=topics, offsets=offsets)


@dataclass(frozen=True)
class TimeRange:
    """Event-time range [start_ms, end_ms); None = open."""

    start_ms: int | None = None
    end_ms: int | None = None

    def mask(self, ts):
        keep = ts >= (self.start_ms if self.start_ms is not None else -(1 << 62))
        return keep & (ts < (self.end_ms if self.end_ms is not None else 1 << 62))

    def split(self, records: RecordBatch, events: EventColumns) -> tuple[EventColumns, RangeCut]:
        """A batch's events in the range, and what was left out of it."""
        keep = self.mask(events.ts)
        first_after = {}
        if self.end_ms is not None:
            first_after = _first_offsets(records, events.record_index[events.ts >= self.end_ms])
        return events.take(keep), RangeCut(outside=int(len(keep) - keep.sum()), first_after=first_after)


@dataclass
class RangeCut:
    """The events of a batch that a TimeRange left out (not applied)."""

    outside: int = 0  # valid events outside the range
    # With an end bound: per input partition, the first offset of an event at or after it (where a
    # daemon started from the replay's snapshot must begin reading).
    first_after: dict[int, int] = field(default_factory=dict)


def _first_offsets(records: RecordBatch, index: np.ndarray) -> dict[int, int]:
    """Per partition, the smallest offset among these records (by position in the batch)."""
    if not len(index):
        return {}
    partitions = np.asarray(records.partitions, dtype=np.int64)[index]
    offsets = np.asarray(records.offsets, dtype=np.int64)[index]
    return {int(p): int(offsets[partitions == p].min()) for p in np.unique(partitions)}


def parse_kafka_uri(uri: str) -> tuple[str, TimeRange]:
    """kafka://TOPIC?from=ISO&to=ISO (either bound optional; ISO-8601 or epoch ms) -> (topic, range)."""
    parsed = urlparse(uri)
    topic = parsed.netloc + parsed.path.rstrip("/") if parsed.netloc else parsed.path.lstrip("/")
    if parsed.scheme != "kafka" or not topic:
        raise SourceError(f"{uri!r} is not kafka://TOPIC[?from=ISO&to=ISO]")
    query = parse_qs(parsed.query)
    unknown = set(query) - {"from", "to"}
    if unknown:
        raise SourceError(f"{uri!r}: unknown parameter(s) {', '.join(sorted(unknown))} (use from= and to=)")

    def moment(name: str) -> int | None:
        if name not in query:
            return None
        text = query[name][0]
        if text.isdigit():
            return int(text)
        try:
            when = datetime.fromisoformat(text.replace(" ", "+"))  # '+' of a zone may arrive as a space
        except ValueError:
            raise SourceError(f"{uri!r}: {name}= must be ISO-8601 or epoch milliseconds") from None
        return epoch_ms(when if when.tzinfo else when.replace(tzinfo=timezone.utc))

    window = TimeRange(moment("from"), moment("to"))
    if window.start_ms is not None and window.end_ms is not None and window.end_ms <= window.start_ms:
        raise SourceError(f"{uri!r}: to= must be after from=")
    return topic, window


class KafkaRangeSource:
    """A topic's records from the first offset whose write time reaches `from` up to the end
    offsets at start. Write time bounds the seek only: the replay filters on event time
    (`time_range`), since logs are often produced late (and some brokers index by write time alone).
    A BatchSource: ends at those end offsets; progress in records."""

    def __init__(self, kafka: KafkaSettings, topic: str, window: TimeRange, batch_records: int) -> None:
        from confluent_kafka import Consumer, TopicPartition

        from stream.kafka import FETCH_WITHOUT_STALLS, end_offsets

        self.topic = self.name = topic
        self.time_range = window
        self.batch_records = batch_records
        self.ends = {p: e for p, e in end_offsets(kafka, topic).items() if e > 0}
        self.consumer = Consumer(kafka.client_config(FETCH_WITHOUT_STALLS, **{
            "group.id": "profiles-replay", "enable.auto.commit": False, "enable.partition.eof": False}))
        starts = {p: 0 for p in self.ends}
        if window.start_ms is not None and self.ends:
            found = self.consumer.offsets_for_times(
                [TopicPartition(topic, p, window.start_ms) for p in self.ends], timeout=30)
            starts = {tp.partition: (tp.offset if tp.offset >= 0 else self.ends[tp.partition]) for tp in found}
        self.position = dict(starts)
        self.total = sum(self.ends[p] - starts[p] for p in self.ends)
        pending = [TopicPartition(topic, p, starts[p]) for p in self.ends if starts[p] < self.ends[p]]
        self.consumer.assign(pending)
        self.exhausted = not pending

    @property
    def records_read(self) -> int:
        return self.total - sum(self.ends[p] - self.position[p] for p in self.ends)

    def next_batch(self, stop: threading.Event | None = None) -> RecordBatch:
        batch = RecordBatch.empty()
        while not self.exhausted and len(batch) < self.batch_records:
            messages = self.consumer.consume(self.batch_records - len(batch), 1.0)
            mine = [m for m in messages if m.error() is None and m.offset() < self.ends[m.partition()]]
            for m in mine:
                self.position[m.partition()] = m.offset() + 1
            batch.extend(RecordBatch.from_messages(mine))
            self.exhausted = all(self.position[p] >= self.ends[p] for p in self.ends)
        if self.exhausted:
            self.consumer.close()
        return batch

    def positions(self) -> dict[str, dict[int, int]]:
        """The resume position: per partition, the next offset to read."""
        return {self.topic: dict(self.position)}

    def progress(self) -> tuple[int, int]:
        return self.records_read, self.total


def open_sources(kafka: KafkaSettings | None, sources: list[str], fmt: str, batch_records: int,
                 outputs: Mapping[str, str | None] | None = None, keep_rejected: bool = False) -> list[BatchSource]:
    """The replay's sources: files all together, in the order given, then each kafka://TOPIC?from=&to=
    as its own source with its event-time range. `outputs` and `keep_rejected`: see expand_paths and
    FileSource."""
    files = [s for s in sources if not s.startswith("kafka://")]
    opened: list[BatchSource] = [
        FileSource(expand_paths(files, outputs), batch_records, fmt, keep_rejected)] if files else []
    for uri in (s for s in sources if s.startswith("kafka://")):
        topic, window = parse_kafka_uri(uri)
        opened.append(KafkaRangeSource(kafka, topic, window, batch_records))
    return opened
