"""A replay's batches decoded ahead in a worker process (stream/decode_ahead.py): the same batches, dead letters
and profiles as a replay that decodes each batch itself, and nothing lost when a worker dies."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import struct

import numpy as np
import orjson
from click.testing import CliRunner

from consumers.cli import main
from consumers.forget import control_record
from consumers.replay import replay
from stream.decode import decode_records
from stream.decode_ahead import DecodeAhead, auto_workers, close_pool, decode_pool
from stream.generator import generate
from stream.malformed import corrupt_some
from stream.settings import Settings
from stream.sources import FileSource
from tests.helpers import DEVICE

SETTINGS = Settings(device=DEVICE)
TAOBAO_ROWS = [b"1,2,3,pv,1511658000", b"1,x,3,buy,1511658100", b"2,3,3,zz,1511658100", b"1,3,3",
               b"2,4,3,cart,1511658200", b"3,5,4,pv,1511658300", b"3,5,4,buy,1511658400"]


def hostile_log(tmp_path, events: int = 1500):
    """Events with malformed records among them and a forget record in the middle."""
    log = generate(users=60, events=events, seed=29).events
    values, bad = corrupt_some(log, fraction=0.05, seed=4)
    target = next(str(e["user_id"]) for i, e in enumerate(log) if i not in bad)
    values.insert(len(values) // 2, control_record(target))
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"".join(v + b"\n" for v in values))
    return path, len(bad)


def test_a_replay_decoded_ahead_writes_what_a_replay_decoding_each_batch_writes(tmp_path, caplog):
    path, bad = hostile_log(tmp_path)
    outputs = {}
    for workers in (0, 1):
        out, dlq = tmp_path / f"p{workers}.jsonl", tmp_path / f"d{workers}.jsonl"
        with caplog.at_level(logging.WARNING, logger="stream.decode_ahead"):
            report = replay(SETTINGS, [str(path)], "jsonl", str(out), None, True, None, str(dlq), 97,
                            show_progress=False, decode_workers=workers)
        updates = [{k: v for k, v in orjson.loads(line).items() if k != "updated_at"}  # (a wall-clock time)
                   for line in out.read_bytes().splitlines()]
        outputs[workers] = (updates, dlq.read_bytes(), report.records, report.events, report.erased)
    assert "decoding ahead stopped" not in caplog.text  # the worker decoded every batch
    assert outputs[1] == outputs[0]
    updates, dead, records, events, erased = outputs[1]
    assert records == 1501 and events == 1500 - bad and erased == 1 and len(dead.splitlines()) == bad
    assert any(update.get("erased") for update in updates)


def test_batches_come_with_their_decoding_and_the_rows_their_format_refused(tmp_path):
    rows = tmp_path / "tb.csv"
    rows.write_bytes(b"".join(row + b"\n" for row in TAOBAO_ROWS))
    plain = FileSource([rows], 2, "taobao", keep_rejected=True)
    pool, refused = decode_pool(1), []
    try:
        ahead = DecodeAhead(FileSource([rows], 2, "taobao", keep_rejected=True), SETTINGS.max_event_bytes, pool)
        while not plain.exhausted:
            batch, expected = plain.next_batch(), plain.take_rejected()
            assert ahead.next_batch() == batch and ahead.take_rejected() == expected
            refused += expected
            decoded, here = ahead.take_decoded(), decode_records(batch, SETTINGS.max_event_bytes)
            if not len(batch):
                assert decoded is None
                continue
            assert decoded.dead_letters == here.dead_letters and decoded.controls == here.controls
            for name in here.events.__dataclass_fields__:
                np.testing.assert_array_equal(getattr(decoded.events, name), getattr(here.events, name))
        assert ahead.exhausted
    finally:
        close_pool(pool)
    assert [d.offset for d in refused] == [2, 3, 4]  # each refused row once, with the batch read with it


def batch_offsets(path, batch_records: int = 50) -> list:
    """The offsets of each batch a plain FileSource reads from the log, in order."""
    plain, offsets = FileSource([path], batch_records), []
    while not plain.exhausted:
        offsets.append(plain.next_batch().offsets)
    return offsets


def test_a_worker_killed_mid_replay_loses_no_batch(tmp_path, caplog):
    path, _ = hostile_log(tmp_path, events=2000)
    expected = batch_offsets(path)
    pool = decode_pool(1)
    try:
        ahead = DecodeAhead(FileSource([path], 50), SETTINGS.max_event_bytes, pool)
        handed, decoded = [ahead.next_batch().offsets], [ahead.take_decoded() is not None]
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(timeout=10)
        with caplog.at_level(logging.WARNING, logger="stream.decode_ahead"):
            while not ahead.exhausted:
                handed.append(ahead.next_batch().offsets)
                decoded.append(ahead.take_decoded() is not None)
    finally:
        close_pool(pool)
    assert handed == expected  # every batch, in order
    assert decoded[0] and not decoded[-1]  # from the kill on, the caller decodes
    assert "decoding ahead stopped" in caplog.text


STUCK: dict = {}  # the pool whose worker die_mid_result runs in (a forked worker sees the parent's globals)


def die_mid_result() -> None:
    """In a pool's worker: the start of a result on the results' pipe (a length that promises a megabyte, and seven
    bytes of it), then death, as a worker killed while sending its result dies."""
    os.write(STUCK["pool"]._result_queue._writer.fileno(), struct.pack("!i", 1 << 20) + b"partial")
    os._exit(1)


def test_a_worker_killed_while_sending_its_result_does_not_hang_the_replay(tmp_path, caplog):
    """The pool's own watch reads a result a worker began to send until it is whole, and never notices the
    worker's death: the loop looks itself, decodes from there, and the pool's thread ends (the interpreter joins it
    at exit)."""
    path, _ = hostile_log(tmp_path, events=600)
    expected = batch_offsets(path)
    pool = decode_pool(1)
    STUCK["pool"] = pool
    try:
        ahead = DecodeAhead(FileSource([path], 50), SETTINGS.max_event_bytes, pool)  # (the worker forks here)
        manager = pool._executor_manager_thread
        batch, rejected, _ = ahead.queue[0]
        ahead.queue[0] = (batch, rejected, pool.submit(die_mid_result))  # its result: the one left half sent
        handed, decoded = [], []
        with caplog.at_level(logging.WARNING, logger="stream.decode_ahead"):
            while not ahead.exhausted:
                handed.append(ahead.next_batch().offsets)
                decoded.append(ahead.take_decoded() is not None)
        manager.join(timeout=60)
        assert not manager.is_alive()
    finally:
        close_pool(pool)
        STUCK.clear()
    assert handed == expected  # every batch, in order
    assert not decoded[0] and decoded[1]  # the first by the loop; the next two were decoded before the worker died
    assert "decoding ahead stopped" in caplog.text and "BrokenProcessPool" in caplog.text


def test_auto_starts_a_worker_for_a_long_log_on_two_cores(tmp_path):
    path, _ = hostile_log(tmp_path)  # about 600 kB: 150 bytes a record says 4,000 records
    assert auto_workers([FileSource([path], 1000)], 1000, cores=2) == 1
    assert auto_workers([FileSource([path], 1000)], 1000, cores=1) == 0  # no core free for it
    assert auto_workers([FileSource([path], 2000)], 2000, cores=2) == 0  # fewer than four batches


def test_decode_workers_must_be_auto_or_a_count(tmp_path):
    path, _ = hostile_log(tmp_path, events=100)
    result = CliRunner().invoke(main, ["replay", str(path), "--out", str(tmp_path / "p.jsonl"),
                                       "--decode-workers", "two"])
    assert result.exit_code == 2 and "'two' is neither auto nor a count of 0 or more" in result.output
