"""Importers: public e-commerce datasets -> JSON lines in the project's event contract.

Each format's rows become event dicts (see `stream.events` for the contract):

  taobao        Taobao UserBehavior CSV, no header:
                user_id,item_id,category_id,behavior_type,timestamp (unix s).
                pv -> click, fav -> click, cart -> add_to_cart, buy -> purchase.
  rees46        REES46 multi-category store CSV with its header
                (event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session).
                view -> click, cart -> add_to_cart, purchase -> purchase;
                remove_from_cart is skipped (counted under "remove_from_cart").
  yoochoose     RecSys Challenge 2015 clicks. Either the session-rec benchmark files
                (tab-separated, header SessionId ItemId Time, unix seconds) or the raw
                yoochoose-clicks.dat (no header: SessionId,Timestamp ISO,ItemId,Category).
                Every row is a click and the session is the user (user_id is the int session id).
                Times are taken as written: the session-rec files' Time is 2 h behind the raw
                file's UTC timestamps (session-rec converted them with time.mktime in CEST).
  retailrocket  RetailRocket events.csv (header timestamp,visitorid,event,itemid,transactionid; ms).
                view -> click, addtocart -> add_to_cart, transaction -> purchase.

Events keep the file's row order (nothing is sorted). `event_id` is
"<format>-<file name without .gz>-<line number>": deterministic, and unique across the
files of one import (`import_dataset` refuses two sources with the same file name).
None of these datasets records a quantity: purchases leave it out (the contract's default is 1).

A row that cannot be used never stops an import: it is counted in `ImportReport.skipped`
under a reason (and the first place it happened is kept in `ImportReport.examples`).
A file that is clearly of another format (its first row does not fit) raises ValueError.
Files may be plain or gzip-compressed (recognised by their magic bytes, not their name).
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import orjson

from stream.events import MAX_ID_CHARS, MAX_TS_MS

log = logging.getLogger(__name__)

FORMATS = ("taobao", "rees46", "yoochoose", "retailrocket")

# Skip reasons (keys of ImportReport.skipped).
WRONG_COLUMNS = "wrong_column_count"
BAD_ID = "bad_id"  # empty, non-numeric or over-long user / item / category id
BAD_TIMESTAMP = "bad_timestamp"  # not a number / time, or outside the contract's 1970..2200
BAD_PRICE = "bad_price"  # not a finite number >= 0
UNKNOWN_EVENT = "unknown_event_type"
REMOVE_FROM_CART = "remove_from_cart"  # rees46: a real event the contract has no type for
EMPTY_LINE = "empty_line"
CSV_ERROR = "csv_error"  # the csv module refused the line (e.g. a field over its size limit)

TAOBAO_TYPES = {"pv": "click", "fav": "click", "cart": "add_to_cart", "buy": "purchase"}
REES46_TYPES = {"view": "click", "cart": "add_to_cart", "purchase": "purchase"}
RETAILROCKET_TYPES = {"view": "click", "addtocart": "add_to_cart", "transaction": "purchase"}

_TAOBAO_HEADER = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
_REES46_REQUIRED = ("event_time", "event_type", "product_id", "user_id")
_YOOCHOOSE_REQUIRED = ("SessionId", "ItemId", "Time")
_RETAILROCKET_REQUIRED = ("timestamp", "visitorid", "event", "itemid")
_RSC15_NO_CATEGORY = frozenset(("0", "S"))  # "0": unknown; "S": special offer, not a category

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
_PROGRESS_EVERY = 10_000  # events per write, and between progress callbacks


@dataclass
class ImportReport:
    """What an import read: data rows (headers excluded), events produced, rows skipped by reason."""

    rows: int = 0
    events: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> "file:line" of its first skip

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if reason not in self.examples:
            self.examples[reason] = where


class _BadRow(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# field parsers (raise _BadRow)


def _id(value: str) -> str:
    """A numeric id as the dataset wrote it (digits only, at most MAX_ID_CHARS)."""
    if value.isdigit() and value.isascii() and len(value) <= MAX_ID_CHARS:
        return value
    raise _BadRow(BAD_ID)


def _ts_checked(ms: int) -> int:
    if 0 <= ms <= MAX_TS_MS:
        return ms
    raise _BadRow(BAD_TIMESTAMP)


def _seconds_to_ms(value: str) -> int:
    """Unix seconds ("1511658000" or "1396437466.94") -> epoch ms, exact to the millisecond."""
    try:
        return _ts_checked(round(float(value) * 1000))  # <= 3 decimals at 1e9 s: float is exact enough
    except (ValueError, OverflowError):  # not a number, NaN, inf
        raise _BadRow(BAD_TIMESTAMP) from None


def _seconds_int_to_ms(value: str) -> int:
    try:
        return _ts_checked(int(value) * 1000)
    except ValueError:
        raise _BadRow(BAD_TIMESTAMP) from None


def _ms(value: str) -> int:
    try:
        return _ts_checked(int(value))
    except ValueError:
        raise _BadRow(BAD_TIMESTAMP) from None


def _iso_to_ms(value: str) -> int:
    """ISO-8601 time ("2014-04-07T10:51:09.277Z", "2019-10-01 00:00:00 UTC"); naive means UTC."""
    if value.endswith(" UTC"):
        value = value[:-4]
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _BadRow(BAD_TIMESTAMP) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return _ts_checked((moment - _EPOCH) // _MS)  # integer arithmetic: no float rounding


def _price(value: str) -> float:
    try:
        price = float(value)
    except ValueError:
        raise _BadRow(BAD_PRICE) from None
    if math.isfinite(price) and price >= 0:
        return price
    raise _BadRow(BAD_PRICE)


# ---------------------------------------------------------------------------------------------
# reading


def _is_gzip(src: Path) -> bool:
    with open(src, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _open_text(src: Path) -> io.TextIOBase:
    """Text stream of a plain or gzip file (told by magic bytes); undecodable bytes become U+FFFD."""
    if _is_gzip(src):
        return gzip.open(src, "rt", encoding="utf-8", errors="replace", newline="")
    return open(src, encoding="utf-8", errors="replace", newline="")


# Stands for a line the csv module refused: its single column never matches a format's width.
_CSV_ERROR_ROW = ["\x00csv-error"]


def _rows(reader) -> Iterator[list[str]]:
    """The reader's rows; a line the csv module refuses (csv.Error) becomes _CSV_ERROR_ROW."""
    while True:
        try:
            yield from reader  # no per-row cost: the try only matters when the reader raises
            return
        except csv.Error:
            yield _CSV_ERROR_ROW


def _bad_width(row: list[str]) -> str:
    if row is _CSV_ERROR_ROW:
        return CSV_ERROR
    return WRONG_COLUMNS if row else EMPTY_LINE


def _columns(header: list[str], required: tuple[str, ...], fmt: str, src: Path,
             casefold: bool = False) -> dict[str, int]:
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


def _source_name(src: Path) -> str:
    name = src.name[:-3] if src.name.endswith(".gz") else src.name
    return name[:160]  # event ids stay well under the contract's 256 characters


def _check_format(fmt: str) -> None:
    if fmt not in _LAYOUTS:
        raise ValueError(f"unknown dataset format {fmt!r}; known formats: {', '.join(FORMATS)}")


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
    with _open_text(src) as fh:
        layout = _LAYOUTS[fmt](fh, src)
        if layout is not None:
            yield from _events(layout, src, f"{fmt}-{_source_name(src)}-", rep)
    if report is None and rep.skipped:
        log.warning("%s: skipped %d of %d rows: %s (first at %s)", src, sum(rep.skipped.values()), rep.rows,
                    rep.skipped, rep.examples)


@dataclass
class _Layout:
    """How one file's data rows become events: what a format hands to `_events`."""

    reader: Any  # the csv reader: its line_num (+ line_offset) is the line of the row just read
    rows: Iterable[list[str]]  # the data rows (header already read), a refused line as _CSV_ERROR_ROW
    width: int  # column count of a usable row; any other row is skipped (see _bad_width)
    parse: Callable[[list[str], str], dict]  # (row, event_id) -> event; raises _BadRow
    line_offset: int = 0  # lines read before the reader started


def _events(layout: _Layout, src: Path, prefix: str, report: ImportReport) -> Iterator[dict]:
    """The loop every format shares: rows -> events, each unusable row skipped under its reason.

    The counts reach `report` however the iteration ends (exhausted, closed early, or raising).
    """
    reader, line_offset, width, parse = layout.reader, layout.line_offset, layout.width, layout.parse
    rows = events = 0
    try:
        for row in layout.rows:
            rows += 1
            line = str(reader.line_num + line_offset)
            if len(row) != width:
                report.skip(_bad_width(row), f"{src}:{line}")
                continue
            try:
                event = parse(row, prefix + line)
            except _BadRow as bad:
                report.skip(bad.reason, f"{src}:{line}")
                continue
            events += 1
            yield event
    finally:
        report.rows += rows
        report.events += events


# Each format reads its header (if any), checks that the file is of that format (ValueError if
# not) and returns its _Layout, or None for an empty file.


def _taobao(fh, src: Path) -> _Layout:
    reader = csv.reader(fh, quoting=csv.QUOTE_NONE)
    types = TAOBAO_TYPES

    def parse(row: list[str], event_id: str) -> dict:
        user, item, category, behaviour, seconds = row
        kind = types.get(behaviour)
        if kind is None:
            raise _BadRow(UNKNOWN_EVENT)
        return {
            "event_id": event_id,
            "user_id": _id(user),
            "type": kind,
            "ts": _seconds_int_to_ms(seconds) if seconds.isdigit() else _seconds_to_ms(seconds),
            "item_id": _id(item),
            "category": _id(category),
        }

    return _Layout(reader, _taobao_rows(_rows(reader), src), 5, parse)


def _taobao_rows(rows: Iterator[list[str]], src: Path) -> Iterator[list[str]]:
    """The rows, checked lazily: the file is judged by its first real line when iteration reaches it.

    Blank or refused lines before that line pass through (to be skipped); a header line is dropped.
    """
    for row in rows:
        if row and row is not _CSV_ERROR_ROW:  # judge the file by its first real line
            break
        yield row
    else:
        return
    if len(row) != 5:
        raise ValueError(f"{src}: not a taobao UserBehavior file: its first line has {len(row)} "
                         f"column(s), expected 5 ({','.join(_TAOBAO_HEADER)})")
    is_header = tuple(c.strip().lower().replace("behaviour", "behavior") for c in row) == _TAOBAO_HEADER
    if not is_header:  # some copies carry a header line: it is dropped, not counted
        if row[3] not in TAOBAO_TYPES:
            raise ValueError(f"{src}: not a taobao UserBehavior file: its first row's behaviour type "
                             f"{row[3][:40]!r} is none of {', '.join(TAOBAO_TYPES)}")
        yield row
    yield from rows


def _rees46(fh, src: Path) -> _Layout | None:
    # Standard CSV quoting here (brand and category_code are text); the other formats are
    # numbers and words only and are read with QUOTE_NONE, so a stray quote cannot swallow lines.
    reader = csv.reader(fh)
    header = next(reader, None)
    if header is None:
        return None
    cols = _columns(header, _REES46_REQUIRED, "rees46", src)
    i_time, i_type, i_item, i_user = (cols[c] for c in _REES46_REQUIRED)
    i_cat_id, i_cat_code, i_price = cols.get("category_id"), cols.get("category_code"), cols.get("price")
    types = REES46_TYPES
    last_time, last_ms = None, 0

    def parse(row: list[str], event_id: str) -> dict:
        nonlocal last_time, last_ms
        kind = types.get(row[i_type])
        if kind is None:
            raise _BadRow(REMOVE_FROM_CART if row[i_type] == "remove_from_cart" else UNKNOWN_EVENT)
        when = row[i_time]
        if when != last_time:  # the file is time-ordered: many rows share a second
            last_ms = _iso_to_ms(when)
            last_time = when
        event = {
            "event_id": event_id,
            "user_id": _id(row[i_user]),
            "type": kind,
            "ts": last_ms,
            "item_id": _id(row[i_item]),
        }
        code = row[i_cat_code] if i_cat_code is not None else ""
        if code:
            if len(code) > MAX_ID_CHARS:
                raise _BadRow(BAD_ID)
            event["category"] = code
        elif i_cat_id is not None and row[i_cat_id]:
            event["category"] = _id(row[i_cat_id])
        if i_price is not None and row[i_price]:
            event["price"] = _price(row[i_price])
        return event

    return _Layout(reader, _rows(reader), len(header), parse)


def _yoochoose(fh, src: Path) -> _Layout | None:
    first = fh.readline()
    if not first:
        return None
    if "\t" in first:  # session-rec benchmark file: tab-separated with a header
        header = first.rstrip("\r\n").split("\t")
        cols = _columns(header, _YOOCHOOSE_REQUIRED, "yoochoose (session-rec)", src)
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        line_offset = 1
        width = len(header)
        i_session, i_item, i_time = (cols[c] for c in _YOOCHOOSE_REQUIRED)
        i_category = None
        to_ms = _seconds_to_ms
    else:  # raw RSC15 yoochoose-clicks.dat: SessionId,Timestamp,ItemId,Category, no header
        fields = first.rstrip("\r\n").split(",")
        header_line = len(fields) == 4 and fields[1].strip().lower() == "timestamp"
        if header_line:  # tolerate a header some copies add (session_id,timestamp,item_id,category)
            first = fh.readline()
            if not first:
                return None
            fields = first.rstrip("\r\n").split(",")
        if len(fields) != 4:
            raise ValueError(f"{src}: not a yoochoose clicks file: its first line has neither tabs (session-rec "
                             f"'SessionId<TAB>ItemId<TAB>Time') nor the 4 comma-separated columns of "
                             f"yoochoose-clicks.dat (SessionId,Timestamp,ItemId,Category); it has "
                             f"{len(fields)} column(s) (yoochoose-buys.dat is not supported)")
        try:
            _iso_to_ms(fields[1])
        except _BadRow:
            raise ValueError(f"{src}: not a yoochoose-clicks.dat file: the second column of its first line, "
                             f"{fields[1][:40]!r}, is not an ISO-8601 timestamp") from None
        reader = csv.reader(_chain(first, fh), quoting=csv.QUOTE_NONE)
        line_offset = 1 if header_line else 0
        width, i_session, i_time, i_item, i_category = 4, 0, 1, 2, 3
        to_ms = _iso_to_ms
    no_category = _RSC15_NO_CATEGORY

    def parse(row: list[str], event_id: str) -> dict:
        event = {
            "event_id": event_id,
            "user_id": int(_id(row[i_session])),
            "type": "click",
            "ts": to_ms(row[i_time]),
            "item_id": _id(row[i_item]),
        }
        if i_category is not None:
            category = row[i_category]
            if category and category not in no_category:
                if len(category) > MAX_ID_CHARS:
                    raise _BadRow(BAD_ID)
                event["category"] = category
        return event

    return _Layout(reader, _rows(reader), width, parse, line_offset)


def _chain(first: str, rest: Iterable[str]) -> Iterator[str]:
    yield first
    yield from rest


def _retailrocket(fh, src: Path) -> _Layout | None:
    reader = csv.reader(fh, quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if header is None:
        return None
    cols = _columns(header, _RETAILROCKET_REQUIRED, "retailrocket events.csv", src, casefold=True)
    i_time, i_user, i_event, i_item = (cols[c] for c in _RETAILROCKET_REQUIRED)
    types = RETAILROCKET_TYPES

    def parse(row: list[str], event_id: str) -> dict:
        kind = types.get(row[i_event])
        if kind is None:
            raise _BadRow(UNKNOWN_EVENT)
        return {
            "event_id": event_id,
            "user_id": _id(row[i_user]),
            "type": kind,
            "ts": _ms(row[i_time]),
            "item_id": _id(row[i_item]),
        }

    return _Layout(reader, _rows(reader), len(header), parse)


_LAYOUTS = {"taobao": _taobao, "rees46": _rees46, "yoochoose": _yoochoose, "retailrocket": _retailrocket}


# ---------------------------------------------------------------------------------------------
# writing and reading JSON lines


def import_dataset(fmt: str, sources: list[str | Path], out: str | Path,
                   progress: Callable[[int], None] | None = None) -> ImportReport:
    """Convert sources into JSON lines at `out` (gzip when it ends in .gz; orjson). Returns the report.

    Sources are read in the order given, each in its row order. `progress`, when given, is
    called with the number of rows read so far (every 10,000 events and at the end of each source).
    The output appears only when the import succeeded (written to a temporary file first);
    the gzip output is byte-for-byte reproducible (no timestamp in its header).
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
    out = Path(out)
    report = ImportReport()
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
                if not line.strip():
                    continue
                try:
                    event = loads(line)
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from None
                if not isinstance(event, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(event).__name__}")
                yield event
