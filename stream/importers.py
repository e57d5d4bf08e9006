"""Importers: public e-commerce datasets -> JSON lines in the project's event contract.

The formats (taobao, rees46, yoochoose, retailrocket) and how their rows map to events are
`stream.import_formats`; the parsing they share and the skip reasons are `stream.import_rows`.
This module reads a format's files (`iter_import`), writes them as JSON lines (`import_dataset`)
and reads those back (`read_events`).

Events keep the file's row order (nothing is sorted). `event_id` is
"<format>-<file name without .gz>-<line number>": deterministic, and unique across the
files of one import (`import_dataset` refuses two sources with the same file name).

A row that cannot be used never stops an import: it is counted in `ImportReport.skipped`
under a reason (and the first place it happened is kept in `ImportReport.examples`).
A file that is clearly of another format (its first row does not fit) raises ValueError.
Files may be plain or gzip-compressed (recognised by their magic bytes, not their name).
"""

from __future__ import annotations

import gzip
import logging
import os
import uuid
import zlib
from pathlib import Path
from typing import IO, Callable, Iterator

import orjson

from stream.import_formats import FORMATS, LAYOUTS
from stream.import_rows import BOM, ImportReport, layout_events, open_text

__all__ = ["FORMATS", "ImportReport", "iter_import", "import_dataset", "read_events"]

log = logging.getLogger(__name__)

_PROGRESS_EVERY = 10_000  # events per write, and between progress callbacks


def _source_name(src: Path) -> str:
    name = src.name[:-3] if src.name.endswith(".gz") else src.name
    return name[:160]  # event ids stay well under the contract's 256 characters


def _check_format(fmt: str) -> None:
    if fmt not in LAYOUTS:
        raise ValueError(f"unknown dataset format {fmt!r}; known formats: {', '.join(FORMATS)}")


class DamagedFile(ValueError):
    """A source's compressed data cut short or corrupt: the file is the problem, not its format."""


def iter_import(fmt: str, src: str | Path, report: ImportReport | None = None) -> Iterator[dict]:
    """Events of one source file (plain or .gz), lazily, in the file's row order.

    Rows that cannot be used are counted in `report` when one is given (otherwise a warning
    logs their counts). An unknown format or a missing file raises at once; a file whose first
    row shows it is not of that format raises ValueError when iteration starts.
    """
    _check_format(fmt)
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file")
    return _iter_import(fmt, src, report)


def _iter_import(fmt: str, src: Path, report: ImportReport | None) -> Iterator[dict]:
    rep = ImportReport() if report is None else report
    try:
        with open_text(src) as fh:
            layout = LAYOUTS[fmt](fh, src)
            if layout is not None:
                yield from layout_events(layout, src, f"{fmt}-{_source_name(src)}-", rep)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # a download cut short: say so, with the rows read
        raise DamagedFile(f"{src}: gzip data broken after {rep.rows:,} rows ({exc}); download the file again") from None
    if report is None and rep.skipped:
        log.warning("%s: skipped %d of %d rows: %s (first at %s)", src, sum(rep.skipped.values()), rep.rows,
                    rep.skipped, rep.examples)


# ---------------------------------------------------------------------------------------------
# writing and reading JSON lines


def import_dataset(fmt: str, sources: list[str | Path], out: str | Path | IO[bytes],
                   progress: Callable[[int], None] | None = None) -> ImportReport:
    """Convert sources into JSON lines at `out` (gzip when it ends in .gz; orjson). Returns the report.

    Sources are read in the order given, each in its row order. `progress`, when given, is
    called with the number of rows read so far (every 10,000 events and at the end of each source).
    The output appears only when the import succeeded (written to a temporary file first);
    the gzip output is byte-for-byte reproducible (no timestamp in its header). `out` may also be
    an open binary file (anything with `write`): the lines are written to it as they come.
    """
    _check_format(fmt)
    sources = [Path(s) for s in sources]
    for s in sources:
        if not s.is_file():
            raise FileNotFoundError(f"{s}: no such file")
    names: dict[str, Path] = {}
    for s in sources:
        name = _source_name(s)
        if name in names:
            raise ValueError(f"sources {names[name]} and {s} share the file name {name!r}: "
                             f"their event ids would collide; import them separately")
        names[name] = s
    report = ImportReport()
    if not isinstance(out, (str, Path)):
        _write(fmt, sources, out, report, progress)
        return report
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as raw:
            if out.name.endswith(".gz"):
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as sink:
                    _write(fmt, sources, sink, report, progress)
            else:
                _write(fmt, sources, raw, report, progress)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return report


def _write(fmt: str, sources: list[Path], sink, report: ImportReport,
           progress: Callable[[int], None] | None) -> None:
    dumps = orjson.dumps
    chunk: list[bytes] = []
    for src in sources:
        # Rows read so far = finished files' rows + this file's events and skips (each row is one of them).
        rows_before, skipped_before = report.rows, sum(report.skipped.values())
        written = 0
        for event in iter_import(fmt, src, report):
            chunk.append(dumps(event))
            if len(chunk) >= _PROGRESS_EVERY:  # one write per chunk: few syscalls and compress calls
                sink.write(b"\n".join(chunk) + b"\n")
                written += len(chunk)
                chunk.clear()
                if progress is not None:
                    progress(rows_before + written + sum(report.skipped.values()) - skipped_before)
        if chunk:
            sink.write(b"\n".join(chunk) + b"\n")
            chunk.clear()
        if progress is not None:
            progress(report.rows)


def read_events(paths: list[str | Path]) -> Iterator[dict]:
    """Read JSON-lines event files (plain or .gz, by magic bytes) back as dicts, in file order.

    Blank lines are ignored; a line that is not a JSON object raises ValueError naming the
    file and line (these are the importers' own outputs: a bad line means a damaged file).
    """
    loads = orjson.loads
    for path in paths:
        path = Path(path)
        with open(path, "rb") as raw:
            gz = raw.peek(2)[:2] == b"\x1f\x8b"
            fh = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            for number, line in enumerate(fh, 1):
                if number == 1:
                    line = line.removeprefix(BOM)  # some tools start a file with one
                if not line.strip():
                    continue
                try:
                    event = loads(line)
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from None
                if not isinstance(event, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(event).__name__}")
                yield event
