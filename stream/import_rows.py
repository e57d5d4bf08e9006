"""What every dataset format shares on its way to events: the skip reasons and the report that counts
them, the field parsers, reading plain or gzip CSV, and the loop that turns a file's rows into events
(`layout_events` over a format's `Layout`). The formats themselves are `stream.import_formats`.

A row that cannot be used never stops an import: a parser raises `BadRow` with a reason, and the row
is counted in `ImportReport.skipped` under it (the first place it happened is kept in
`ImportReport.examples`).
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from stream.events import MAX_ID_CHARS, MAX_TS_MS, MIN_TS_MS

# Skip reasons (keys of ImportReport.skipped).
WRONG_COLUMNS = "wrong_column_count"
BAD_ID = "bad_id"  # empty, non-numeric or over-long user / item / category id
BAD_TIMESTAMP = "bad_timestamp"  # not a number / time, or outside the contract's 1970..2200
BAD_PRICE = "bad_price"  # not a finite number >= 0
UNKNOWN_EVENT = "unknown_event_type"
REMOVE_FROM_CART = "remove_from_cart"  # rees46: a real event the contract has no type for
EMPTY_LINE = "empty_line"
CSV_ERROR = "csv_error"  # the csv module refused the line (e.g. a field over its size limit)

BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark some Windows tools put at the start of a file

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)


@dataclass
class ImportReport:
    """What an import read: data rows (headers excluded), events produced, rows skipped by reason."""

    rows: int = 0
    events: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> "file:line" of its first skip
    # With a list: every skipped row as (reason, line, its fields joined by the file's delimiter), for a
    # reader that dead-letters them (a replay); the csv module's refused lines have no text ("").
    rejected: list[tuple[str, int, str]] | None = None

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if reason not in self.examples:
            self.examples[reason] = where


class BadRow(Exception):
    """A row that cannot be used, and why (one of the skip reasons above)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# field parsers (raise BadRow)


def parse_id(value: str) -> str:
    """A numeric id as the dataset wrote it (digits only, at most MAX_ID_CHARS)."""
    if value.isdigit() and value.isascii() and len(value) <= MAX_ID_CHARS:
        return value
    raise BadRow(BAD_ID)


def _ts_checked(ms: int) -> int:
    if MIN_TS_MS <= ms <= MAX_TS_MS:
        return ms
    raise BadRow(BAD_TIMESTAMP)


def parse_seconds(value: str) -> int:
    """Unix seconds ("1511658000" or "1396437466.94") -> epoch ms, exact to the millisecond."""
    try:
        return _ts_checked(round(float(value) * 1000))  # <= 3 decimals at 1e9 s: float is exact enough
    except (ValueError, OverflowError):  # not a number, NaN, inf
        raise BadRow(BAD_TIMESTAMP) from None


def parse_int_seconds(value: str) -> int:
    try:
        return _ts_checked(int(value) * 1000)
    except ValueError:
        raise BadRow(BAD_TIMESTAMP) from None


def parse_epoch_ms(value: str) -> int:
    try:
        return _ts_checked(int(value))
    except ValueError:
        raise BadRow(BAD_TIMESTAMP) from None


def parse_iso(value: str) -> int:
    """ISO-8601 time ("2014-04-07T10:51:09.277Z", "2019-10-01 00:00:00 UTC"); naive means UTC."""
    if value.endswith(" UTC"):
        value = value[:-4]
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise BadRow(BAD_TIMESTAMP) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return _ts_checked((moment - _EPOCH) // _MS)  # integer arithmetic: no float rounding


def parse_price(value: str) -> float:
    try:
        price = float(value)
    except ValueError:
        raise BadRow(BAD_PRICE) from None
    if math.isfinite(price) and price >= 0:
        return price
    raise BadRow(BAD_PRICE)


# ---------------------------------------------------------------------------------------------
# reading


def _is_gzip(src: Path) -> bool:
    with open(src, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def open_text(src: Path) -> io.TextIOBase:
    """Text stream of a plain or gzip file (told by magic bytes); undecodable bytes become U+FFFD.
    A byte-order mark at the start is dropped (utf-8-sig), so a first row or header reads as written."""
    if _is_gzip(src):
        return gzip.open(src, "rt", encoding="utf-8-sig", errors="replace", newline="")
    return open(src, encoding="utf-8-sig", errors="replace", newline="")


# Stands for a line the csv module refused: its single column never matches a format's width.
CSV_ERROR_ROW = ["\x00csv-error"]


def csv_rows(reader) -> Iterator[list[str]]:
    """The reader's rows; a line the csv module refuses (csv.Error) becomes CSV_ERROR_ROW."""
    while True:
        try:
            yield from reader  # no per-row cost: the try only matters when the reader raises
            return
        except csv.Error:
            yield CSV_ERROR_ROW


def _bad_width(row: list[str]) -> str:
    if row is CSV_ERROR_ROW:
        return CSV_ERROR
    return WRONG_COLUMNS if row else EMPTY_LINE


def header_columns(header: list[str], required: tuple[str, ...], fmt: str, src: Path,
                   casefold: bool = False) -> dict[str, int]:
    """Column name -> index of a header; ValueError names the file when a required column is missing."""
    names = [h.strip().lstrip("\ufeff") for h in header]
    if casefold:
        names = [n.lower() for n in names]
    index = {name: i for i, name in enumerate(names)}
    missing = [c for c in required if c not in index]
    if missing:
        raise ValueError(
            f"{src}: not a {fmt} file: its header {header[:12]!r} lacks the column(s) {', '.join(missing)} "
            f"(expected {', '.join(required)})"
        )
    return index


@dataclass
class Layout:
    """How one file's data rows become events: what a format hands to `layout_events`."""

    reader: Any  # the csv reader: its line_num (+ line_offset) is the line of the row just read
    rows: Iterable[list[str]]  # the data rows (header already read), a refused line as CSV_ERROR_ROW
    width: int  # column count of a usable row; any other row is skipped (see _bad_width)
    parse: Callable[[list[str], str], dict]  # (row, event_id) -> event; raises BadRow
    line_offset: int = 0  # lines read before the reader started


def layout_events(layout: Layout, src: Path, prefix: str, report: ImportReport) -> Iterator[dict]:
    """The loop every format shares: rows -> events, each unusable row skipped under its reason.

    The counts reach `report` however the iteration ends (exhausted, closed early, or raising).
    """
    reader, line_offset, width, parse = layout.reader, layout.line_offset, layout.width, layout.parse
    rejected, delimiter = report.rejected, reader.dialect.delimiter
    rows = events = 0
    try:
        for row in layout.rows:
            rows += 1
            line = str(reader.line_num + line_offset)
            try:
                if len(row) != width:
                    raise BadRow(_bad_width(row))
                event = parse(row, prefix + line)
            except BadRow as bad:
                report.skip(bad.reason, f"{src}:{line}")
                if rejected is not None:
                    rejected.append((bad.reason, int(line), "" if row is CSV_ERROR_ROW else delimiter.join(row)))
                continue
            events += 1
            yield event
    finally:
        report.rows += rows
        report.events += events
