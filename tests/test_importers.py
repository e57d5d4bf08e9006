"""Dataset importers: real rows -> contract events, skipped rows counted by reason, JSON-lines round trips."""

from __future__ import annotations

import gzip
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest

from stream.importers import FORMATS, ImportReport, import_dataset, iter_import, read_events
from stream.decode import decode_batch
from tests.helpers import record_batch

FIXTURES = Path(__file__).parent / "data" / "importers"
TAOBAO = FIXTURES / "taobao_userbehavior.csv"  # 8 rows of the real Taobao sample
REES46 = FIXTURES / "rees46_2019-Oct.csv"  # header + 6 rows of the real REES46 sample (CRLF, as there)
YOOCHOOSE = FIXTURES / "yoochoose_train_full.txt"  # header + 6 rows of the real session-rec train_full

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared data is absent ({SHARED} not found)")


def assert_valid(events: list[dict]) -> None:
    """Every event passes the daemon's decoder: no dead letters, one column entry per event."""
    n = len(events)
    batch = record_batch(events, topic="import", keys=None)
    cols, dead = decode_batch(batch, 65536)
    assert dead == [], [(d.reason, d.detail, d.value) for d in dead[:3]]
    assert len(cols) == n
    assert len({e["event_id"] for e in events}) == n


def imported(fmt: str, path: Path) -> tuple[list[dict], ImportReport]:
    report = ImportReport()
    events = list(iter_import(fmt, path, report))
    return events, report


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- one test per format: real rows -> exact events ---------------------------------------------------------


def test_taobao_real_rows():
    events, report = imported("taobao", TAOBAO)
    p = "taobao-taobao_userbehavior.csv-"
    assert events == [
        {"event_id": p + "1", "user_id": "543462", "type": "click", "ts": 1511658000000, "item_id": "1715",
         "category": "1464116"},
        {"event_id": p + "2", "user_id": "662867", "type": "click", "ts": 1511658000000, "item_id": "2244074",
         "category": "1575622"},
        {"event_id": p + "3", "user_id": "813974", "type": "purchase", "ts": 1511658000000, "item_id": "1332724",
         "category": "2520771"},
        {"event_id": p + "4", "user_id": "543789", "type": "add_to_cart", "ts": 1511658001000,
         "item_id": "3110556", "category": "4558987"},
        {"event_id": p + "5", "user_id": "672849", "type": "click", "ts": 1511658002000, "item_id": "1822977",
         "category": "4801426"},  # fav -> click
        {"event_id": p + "6", "user_id": "682317", "type": "click", "ts": 1511658003000, "item_id": "655740",
         "category": "982926"},
        {"event_id": p + "7", "user_id": "436966", "type": "add_to_cart", "ts": 1511658003000,
         "item_id": "1329977", "category": "3607361"},
        {"event_id": p + "8", "user_id": "23125", "type": "purchase", "ts": 1511658009000, "item_id": "4680673",
         "category": "1756314"},
    ]
    assert report == ImportReport(rows=8, events=8, skipped={})
    assert_valid(events)


def test_rees46_real_rows():
    events, report = imported("rees46", REES46)
    p = "rees46-rees46_2019-Oct.csv-"
    assert events == [
        # empty category_code: the category id stands in
        {"event_id": p + "2", "user_id": "541312140", "type": "click", "ts": 1569888000000, "item_id": "44600062",
         "category": "2103807459595387724", "price": 35.79},
        {"event_id": p + "3", "user_id": "554748717", "type": "click", "ts": 1569888000000, "item_id": "3900821",
         "category": "appliances.environment.water_heater", "price": 33.2},
        {"event_id": p + "4", "user_id": "519107250", "type": "click", "ts": 1569888001000, "item_id": "17200506",
         "category": "furniture.living_room.sofa", "price": 543.1},
        {"event_id": p + "5", "user_id": "543272936", "type": "purchase", "ts": 1569888134000,
         "item_id": "1004856", "category": "electronics.smartphone", "price": 130.76},
        {"event_id": p + "6", "user_id": "550121407", "type": "add_to_cart", "ts": 1569888314000,
         "item_id": "5100816", "category": "2053013553375346967", "price": 29.51},
        {"event_id": p + "7", "user_id": "512450748", "type": "click", "ts": 1569896496000, "item_id": "53000001",
         "category": "2146660886926852416", "price": 0.0},  # a real zero price is kept
    ]
    assert report == ImportReport(rows=6, events=6, skipped={})
    assert_valid(events)


def test_yoochoose_session_rec_rows():
    events, report = imported("yoochoose", YOOCHOOSE)
    p = "yoochoose-yoochoose_train_full.txt-"
    expected = [(2, 3, 214716935, 1396437466940), (3, 3, 214832672, 1396438212318),
                (4, 6, 214701242, 1396796300848), (5, 6, 214826623, 1396796546976),
                (6, 7, 214826835, 1396413533104), (7, 7, 214826715, 1396413545854)]
    assert events == [{"event_id": f"{p}{line}", "user_id": session, "type": "click", "ts": ts,
                       "item_id": str(item)} for line, session, item, ts in expected]
    assert report == ImportReport(rows=6, events=6, skipped={})
    assert_valid(events)


def test_yoochoose_raw_rsc15_clicks(tmp_path):
    # The first lines of the original yoochoose-clicks.dat, then categories as that file has them.
    src = write(tmp_path, "yoochoose-clicks.dat",
                "1,2014-04-07T10:51:09.277Z,214536502,0\n"
                "1,2014-04-07T10:54:46.998Z,214536506,0\n"
                "2,2014-04-07T13:56:37.614Z,214662742,S\n"
                "2,2014-04-07T13:57:19.373Z,214662742,2053\n"
                "3,2014-04-07T14:00:00Z,214825110,7\n")
    events, report = imported("yoochoose", src)
    p = "yoochoose-yoochoose-clicks.dat-"
    assert events == [
        {"event_id": p + "1", "user_id": 1, "type": "click", "ts": 1396867869277, "item_id": "214536502"},
        {"event_id": p + "2", "user_id": 1, "type": "click", "ts": 1396868086998, "item_id": "214536506"},
        {"event_id": p + "3", "user_id": 2, "type": "click", "ts": 1396878997614, "item_id": "214662742"},
        {"event_id": p + "4", "user_id": 2, "type": "click", "ts": 1396879039373, "item_id": "214662742",
         "category": "2053"},
        {"event_id": p + "5", "user_id": 3, "type": "click", "ts": 1396879200000, "item_id": "214825110",
         "category": "7"},
    ]
    assert report == ImportReport(rows=5, events=5, skipped={})
    assert_valid(events)
    # The session-rec files hold the same clicks 2 h earlier (the test split's first row is session 1's
    # first click at 1396860669.277): their Time was made with time.mktime in CEST. Both are kept as written.
    assert events[0]["ts"] - 1396860669277 == 2 * 3600 * 1000

    with_header = write(tmp_path, "clicks-with-header.dat",
                        "session_id,timestamp,item_id,category\n1,2014-04-07T10:51:09.277Z,214536502,0\n")
    events, report = imported("yoochoose", with_header)
    assert [(e["event_id"], e["ts"]) for e in events] == [("yoochoose-clicks-with-header.dat-2", 1396867869277)]
    assert report.rows == 1


def test_retailrocket_hand_written_rows(tmp_path):
    src = write(tmp_path, "events.csv",
                "timestamp,visitorid,event,itemid,transactionid\n"
                "1433221332117,257597,view,355908,\n"
                "1433224214164,992329,view,248676,\n"
                "1433221999827,111016,addtocart,459835,\n"
                "1433222276276,483648,transaction,11117,4000\n")
    events, report = imported("retailrocket", src)
    p = "retailrocket-events.csv-"
    assert events == [
        {"event_id": p + "2", "user_id": "257597", "type": "click", "ts": 1433221332117, "item_id": "355908"},
        {"event_id": p + "3", "user_id": "992329", "type": "click", "ts": 1433224214164, "item_id": "248676"},
        {"event_id": p + "4", "user_id": "111016", "type": "add_to_cart", "ts": 1433221999827,
         "item_id": "459835"},
        {"event_id": p + "5", "user_id": "483648", "type": "purchase", "ts": 1433222276276, "item_id": "11117"},
    ]  # file order is kept, even where time goes back (row 4)
    assert report == ImportReport(rows=4, events=4, skipped={})
    assert_valid(events)


# --- rows that cannot be used are counted, never fatal, never silent ----------------------------------------

MALFORMED = {
    "taobao": (
        "1,2,3,pv,1511658000\n"
        "1,2,3,pv\n"  # wrong column count
        "1,2,3,pv,15116580xx\n"  # bad number
        "1,2,3,like,1511658000\n"  # unknown behaviour
        "\n"  # blank line
        "1,,3,cart,1511658000\n"  # empty item id
        "u1,2,3,buy,1511658000\n"  # non-numeric user id
        "1,2,3,buy,-5\n"  # timestamp before 1970
        "1,2,3,buy,1511658001\n",
        ["taobao-bad.csv-1", "taobao-bad.csv-9"],
        {"wrong_column_count": 1, "bad_timestamp": 2, "unknown_event_type": 1, "empty_line": 1, "bad_id": 2},
    ),
    "rees46": (
        "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
        "2019-10-01 00:00:00 UTC,view,1,2,a.b,x,1.50,9,s\n"
        "2019-10-01 00:00:01 UTC,remove_from_cart,1,2,a.b,x,1.50,9,s\n"
        "2019-10-01 00:00:01 UTC,wishlist,1,2,a.b,x,1.50,9,s\n"
        "2019-10-01 00:00:02 UTC,view,1,2,a.b,x,-1,9,s\n"
        "2019-10-01 00:00:02 UTC,view,1,2,a.b,x,nan,9,s\n"
        "2019-10-01 00:00:02 UTC,view,1,2,a.b,x,cheap,9,s\n"
        "yesterday,view,1,2,a.b,x,1.50,9,s\n"
        "2019-10-01 00:00:03 UTC,view,1,2,a.b,x,1.50,9\n"
        "2019-10-01 00:00:04 UTC,purchase,1,2,,,,9,s\n",  # no category code, no price: still an event
        ["rees46-bad.csv-2", "rees46-bad.csv-10"],
        {"remove_from_cart": 1, "unknown_event_type": 1, "bad_price": 3, "bad_timestamp": 1,
         "wrong_column_count": 1},
    ),
    "yoochoose": (
        "SessionId\tItemId\tTime\n"
        "1\t10\t1396437466.94\n"
        "1\t10\n"
        "x\t10\t1396437466.94\n"
        "1\t10\tnan\n"
        "1\t\t1396437466.94\n"
        "2\t11\t1396437467\n",
        ["yoochoose-bad.csv-2", "yoochoose-bad.csv-7"],
        {"wrong_column_count": 1, "bad_id": 2, "bad_timestamp": 1},
    ),
    "retailrocket": (
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,1,view,2,\n"
        "1433221332117,1,like,2,\n"
        "1433221332.5,1,view,2,\n"
        "1433221332117,1,view\n"
        "1433221332118,1,transaction,3,77\n",
        ["retailrocket-bad.csv-2", "retailrocket-bad.csv-6"],
        {"unknown_event_type": 1, "bad_timestamp": 1, "wrong_column_count": 1},
    ),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_malformed_rows_are_skipped_with_a_reason(tmp_path, fmt):
    text, good_ids, skipped = MALFORMED[fmt]
    events, report = imported(fmt, write(tmp_path, "bad.csv", text))
    assert [e["event_id"] for e in events] == good_ids
    assert report.skipped == skipped
    assert report.rows == report.events + sum(skipped.values()) and report.events == len(good_ids)
    assert set(report.examples) == set(skipped)  # where each reason was first seen, e.g. ".../bad.csv:3"
    assert all(where.startswith(str(tmp_path / "bad.csv") + ":") for where in report.examples.values())
    assert_valid(events)


def test_rees46_category_and_price_are_optional(tmp_path):
    text = MALFORMED["rees46"][0]
    events, _ = imported("rees46", write(tmp_path, "bad.csv", text))
    assert events[1] == {"event_id": "rees46-bad.csv-10", "user_id": "9", "type": "purchase",
                         "ts": 1569888004000, "item_id": "1", "category": "2"}


def test_skipped_rows_are_logged_when_no_report_is_asked_for(tmp_path, caplog):
    src = write(tmp_path, "t.csv", "1,2,3,pv,1511658000\n1,2,3,like,1511658000\n")
    with caplog.at_level(logging.WARNING, logger="stream.importers"):
        assert len(list(iter_import("taobao", src))) == 1
    assert "skipped 1 of 2 rows" in caplog.text and "unknown_event_type" in caplog.text


def test_a_csv_error_is_one_skipped_row(tmp_path):
    import csv

    src = write(tmp_path, "big.csv", "1,2,3,pv,1511658000\n1,2,3,pv," + "9" * 200 + "\n1,2,3,pv,1511658001\n")
    limit = csv.field_size_limit(100)
    try:
        events, report = imported("taobao", src)
    finally:
        csv.field_size_limit(limit)
    assert [e["event_id"] for e in events] == ["taobao-big.csv-1", "taobao-big.csv-3"]
    assert report.skipped == {"csv_error": 1} and report.rows == 3


# --- what is not a dataset of that format -------------------------------------------------------------------


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset format 'amazon'.*taobao, rees46, yoochoose, retailrocket"):
        iter_import("amazon", TAOBAO)
    with pytest.raises(ValueError, match="unknown dataset format"):
        import_dataset("amazon", [TAOBAO], tmp_path / "out.jsonl")


@pytest.mark.parametrize("fmt, src, message", [
    ("taobao", REES46, "first line has 9 column"),
    ("taobao", YOOCHOOSE, "first line has 1 column"),
    ("rees46", TAOBAO, "lacks the column"),
    ("yoochoose", TAOBAO, "has 5 column"),
    ("yoochoose", REES46, "has 9 column"),
    ("retailrocket", TAOBAO, "lacks the column"),
    ("retailrocket", YOOCHOOSE, "lacks the column"),
])
def test_a_file_of_another_format_is_refused(fmt, src, message):
    with pytest.raises(ValueError, match=message):
        list(iter_import(fmt, src))


def test_a_retailrocket_file_is_not_taken_for_taobao(tmp_path):
    # Same column count as Taobao: the first row's behaviour type gives it away.
    src = write(tmp_path, "events.csv", "timestamp,visitorid,event,itemid,transactionid\n1433221332117,1,view,2,\n")
    with pytest.raises(ValueError, match="behaviour type"):
        list(iter_import("taobao", src))


def test_a_taobao_header_line_is_tolerated(tmp_path):
    src = write(tmp_path, "h.csv", "user_id,item_id,category_id,behavior_type,timestamp\n1,2,3,pv,1511658000\n")
    events, report = imported("taobao", src)
    assert [e["event_id"] for e in events] == ["taobao-h.csv-2"] and report.rows == 1


# --- JSON lines out and back ----------------------------------------------------------------------------------


def test_gzip_round_trip(tmp_path):
    gz_in = tmp_path / TAOBAO.name
    gz_in = gz_in.with_name(gz_in.name + ".gz")
    with open(TAOBAO, "rb") as src, gzip.open(gz_in, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain = list(iter_import("taobao", TAOBAO))
    assert list(iter_import("taobao", gz_in)) == plain  # same events, same ids

    out = tmp_path / "taobao.jsonl.gz"
    report = import_dataset("taobao", [gz_in], out)
    assert report == ImportReport(rows=8, events=8, skipped={})
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    assert list(read_events([out])) == plain
    first = out.read_bytes()
    import_dataset("taobao", [gz_in], out)
    assert out.read_bytes() == first  # reproducible output
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_import_dataset_several_sources_in_order_with_progress(tmp_path):
    second = write(tmp_path, "test.txt", "SessionId\tItemId\tTime\n9\t214536502\t1396860669.277\n9\t1\tbad\n")
    out = tmp_path / "yoochoose.jsonl"
    seen: list[int] = []
    report = import_dataset("yoochoose", [YOOCHOOSE, str(second)], out, progress=seen.append)
    assert report == ImportReport(rows=8, events=7, skipped={"bad_timestamp": 1},
                                  examples={"bad_timestamp": f"{second}:3"})
    assert seen[-1] == 8 and seen == sorted(seen)
    back = list(read_events([out]))
    assert [e["event_id"] for e in back] == [f"yoochoose-yoochoose_train_full.txt-{i}" for i in range(2, 8)] + [
        "yoochoose-test.txt-2"]
    assert back[-1] == {"event_id": "yoochoose-test.txt-2", "user_id": 9, "type": "click", "ts": 1396860669277,
                        "item_id": "214536502"}
    assert_valid(back)
    assert all(line.startswith(b"{") for line in out.read_bytes().splitlines())


def test_import_dataset_refuses_colliding_names_and_leaves_nothing_on_failure(tmp_path):
    other = tmp_path / "dir"
    other.mkdir()
    shutil.copy(TAOBAO, other / TAOBAO.name)
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="share the file name"):
        import_dataset("taobao", [TAOBAO, other / TAOBAO.name], out)
    with pytest.raises(ValueError, match="not a taobao"):
        import_dataset("taobao", [TAOBAO, REES46], out)  # fails in the second source
    with pytest.raises(FileNotFoundError):
        import_dataset("taobao", [TAOBAO, tmp_path / "missing.csv"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_read_events_names_a_damaged_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"event_id": "a"}\n\n{"event_id": \n')
    it = read_events([path])
    assert next(it) == {"event_id": "a"}
    with pytest.raises(ValueError, match=r"events\.jsonl:3"):
        next(it)


# --- the real samples, where the shared data is present ---------------------------------------------------


@needs_shared
def test_full_taobao_sample(tmp_path):
    out = tmp_path / "taobao.jsonl"
    report = import_dataset("taobao", [SHARED / "taobao_userbehavior" / "UserBehavior_sample_jasonwang1.csv"], out)
    assert report == ImportReport(rows=110_300, events=110_300, skipped={})
    counts = Counter()
    ts = []
    for e in read_events([out]):
        counts[e["type"]] += 1
        ts.append(e["ts"])
    assert counts == {"click": 98_361 + 3_383, "add_to_cart": 6_063, "purchase": 2_493}  # pv + fav, cart, buy
    assert ts == sorted(ts) and (ts[0], ts[-1]) == (1_511_658_000_000, 1_511_665_811_000)


@needs_shared
def test_full_yoochoose_train_full(tmp_path):
    src = SHARED / "yoochoose_rsc15" / "yoochoose-clicks-100k_train_full.txt"
    out = tmp_path / "yoochoose.jsonl.gz"
    report = import_dataset("yoochoose", [src], out)
    assert report == ImportReport(rows=70_278, events=70_278, skipped={})
    back = list(read_events([out]))
    assert len(back) == 70_278 and len({e["user_id"] for e in back}) == 17_794
    assert_valid(back[:5000])
