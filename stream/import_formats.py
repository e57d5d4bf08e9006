"""The dataset formats: how each one's rows become events in the project's contract
(see docs/contracts.md).

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

Each format reads its header (if any), checks that the file is of that format (ValueError if
not) and returns its `Layout` (`stream.import_rows`), or None for an empty file. None of these
datasets records a quantity: purchases leave it out (the contract's default is 1).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Iterator

from stream.events import MAX_ID_CHARS
from stream.import_rows import (BAD_ID, CSV_ERROR_ROW, REMOVE_FROM_CART, UNKNOWN_EVENT, BadRow, Layout, csv_rows,
                                header_columns, parse_epoch_ms, parse_id, parse_int_seconds, parse_iso, parse_price,
                                parse_seconds)

TAOBAO_TYPES = {"pv": "click", "fav": "click", "cart": "add_to_cart", "buy": "purchase"}
REES46_TYPES = {"view": "click", "cart": "add_to_cart", "purchase": "purchase"}
RETAILROCKET_TYPES = {"view": "click", "addtocart": "add_to_cart", "transaction": "purchase"}

_TAOBAO_HEADER = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
_REES46_REQUIRED = ("event_time", "event_type", "product_id", "user_id")
_YOOCHOOSE_REQUIRED = ("SessionId", "ItemId", "Time")
_RETAILROCKET_REQUIRED = ("timestamp", "visitorid", "event", "itemid")
_RSC15_NO_CATEGORY = frozenset(("0", "S"))  # "0": unknown; "S": special offer, not a category


def _taobao(fh, src: Path) -> Layout:
    reader = csv.reader(fh, quoting=csv.QUOTE_NONE)
    types = TAOBAO_TYPES

    def parse(row: list[str], event_id: str) -> dict:
        user, item, category, behaviour, seconds = row
        kind = types.get(behaviour)
        if kind is None:
            raise BadRow(UNKNOWN_EVENT)
        return {
            "event_id": event_id,
            "user_id": parse_id(user),
            "type": kind,
            "ts": parse_int_seconds(seconds) if seconds.isdigit() else parse_seconds(seconds),
            "item_id": parse_id(item),
            "category": parse_id(category),
        }

    return Layout(reader, _taobao_rows(csv_rows(reader), src), 5, parse)


def _taobao_rows(rows: Iterator[list[str]], src: Path) -> Iterator[list[str]]:
    """The rows, checked lazily: the file is judged by its first real line when iteration reaches it.

    Blank or refused lines before that line pass through (to be skipped); a header line is dropped.
    """
    for row in rows:
        if row and row is not CSV_ERROR_ROW:  # judge the file by its first real line
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


def _rees46(fh, src: Path) -> Layout | None:
    # Standard CSV quoting here (brand and category_code are text); the other formats are
    # numbers and words only and are read with QUOTE_NONE, so a stray quote cannot swallow lines.
    reader = csv.reader(fh)
    header = next(reader, None)
    if header is None:
        return None
    cols = header_columns(header, _REES46_REQUIRED, "rees46", src)
    i_time, i_type, i_item, i_user = (cols[c] for c in _REES46_REQUIRED)
    i_cat_id, i_cat_code, i_price = cols.get("category_id"), cols.get("category_code"), cols.get("price")
    types = REES46_TYPES
    last_time, last_ms = None, 0

    def parse(row: list[str], event_id: str) -> dict:
        nonlocal last_time, last_ms
        kind = types.get(row[i_type])
        if kind is None:
            raise BadRow(REMOVE_FROM_CART if row[i_type] == "remove_from_cart" else UNKNOWN_EVENT)
        when = row[i_time]
        if when != last_time:  # the file is time-ordered: many rows share a second
            last_ms = parse_iso(when)
            last_time = when
        event = {
            "event_id": event_id,
            "user_id": parse_id(row[i_user]),
            "type": kind,
            "ts": last_ms,
            "item_id": parse_id(row[i_item]),
        }
        code = row[i_cat_code] if i_cat_code is not None else ""
        if code:
            if len(code) > MAX_ID_CHARS:
                raise BadRow(BAD_ID)
            event["category"] = code
        elif i_cat_id is not None and row[i_cat_id]:
            event["category"] = parse_id(row[i_cat_id])
        if i_price is not None and row[i_price]:
            event["price"] = parse_price(row[i_price])
        return event

    return Layout(reader, csv_rows(reader), len(header), parse)


def _yoochoose(fh, src: Path) -> Layout | None:
    first = fh.readline()
    if not first:
        return None
    if "\t" in first:  # session-rec benchmark file: tab-separated with a header
        header = first.rstrip("\r\n").split("\t")
        cols = header_columns(header, _YOOCHOOSE_REQUIRED, "yoochoose (session-rec)", src)
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        line_offset = 1
        width = len(header)
        i_session, i_item, i_time = (cols[c] for c in _YOOCHOOSE_REQUIRED)
        i_category = None
        to_ms = parse_seconds
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
            parse_iso(fields[1])
        except BadRow:
            raise ValueError(f"{src}: not a yoochoose-clicks.dat file: the second column of its first line, "
                             f"{fields[1][:40]!r}, is not an ISO-8601 timestamp") from None
        reader = csv.reader(_chain(first, fh), quoting=csv.QUOTE_NONE)
        line_offset = 1 if header_line else 0
        width, i_session, i_time, i_item, i_category = 4, 0, 1, 2, 3
        to_ms = parse_iso
    no_category = _RSC15_NO_CATEGORY

    def parse(row: list[str], event_id: str) -> dict:
        session = int(parse_id(row[i_session]))
        if session >= 1 << 63:  # the contract's integer ids are signed 64-bit: one row, not the whole import
            raise BadRow(BAD_ID)
        event = {
            "event_id": event_id,
            "user_id": session,
            "type": "click",
            "ts": to_ms(row[i_time]),
            "item_id": parse_id(row[i_item]),
        }
        if i_category is not None:
            category = row[i_category]
            if category and category not in no_category:
                if len(category) > MAX_ID_CHARS:
                    raise BadRow(BAD_ID)
                event["category"] = category
        return event

    return Layout(reader, csv_rows(reader), width, parse, line_offset)


def _chain(first: str, rest: Iterable[str]) -> Iterator[str]:
    yield first
    yield from rest


def _retailrocket(fh, src: Path) -> Layout | None:
    reader = csv.reader(fh, quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if header is None:
        return None
    cols = header_columns(header, _RETAILROCKET_REQUIRED, "retailrocket events.csv", src, casefold=True)
    i_time, i_user, i_event, i_item = (cols[c] for c in _RETAILROCKET_REQUIRED)
    types = RETAILROCKET_TYPES

    def parse(row: list[str], event_id: str) -> dict:
        kind = types.get(row[i_event])
        if kind is None:
            raise BadRow(UNKNOWN_EVENT)
        return {
            "event_id": event_id,
            "user_id": parse_id(row[i_user]),
            "type": kind,
            "ts": parse_epoch_ms(row[i_time]),
            "item_id": parse_id(row[i_item]),
        }

    return Layout(reader, csv_rows(reader), len(header), parse)


# Format name -> what reads a file of it (its header, if any) and returns its Layout.
LAYOUTS = {"taobao": _taobao, "rees46": _rees46, "yoochoose": _yoochoose, "retailrocket": _retailrocket}
FORMATS = tuple(LAYOUTS)
