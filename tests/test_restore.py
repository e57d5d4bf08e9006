"""A restore is exact: random changelogs of upserts, tombstones and meta records, several records per key and
several partitions, restore to what the reference reading gives (partition by partition in ascending order,
the latest record of each key), however the consumer interleaves and batches the partitions' records."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from stream.changelog import Changelog
from stream.changelog_records import CHANGELOG_FORMAT, META_KEY, READABLE_FORMATS, RefusedRecords, record_dtype
from stream.kafka import Publisher, StreamError, admin_client, ensure_topics
from stream.log_reader import read_to_end
from stream.metrics import Metrics
from stream.state import StateTable
from tests.helpers import DEVICE

PARTITIONS = 3
# Ids that a batch decode must get right: non-ASCII, a newline (the batch decode's separator), a lone surrogate.
ODD_IDS = ["ü-émoji-🙂", "with\nnewline", "\udcff-surrogate", ""]

Log = list[tuple[int, bytes, bytes | None]]  # (partition, key, value) in the order written


def table() -> StateTable:
    return StateTable(8, torch.device(DEVICE), watermark_slots=1, dedupe_window=4)


def random_record(rng: np.random.Generator, dtype: np.dtype) -> bytes:
    record = np.zeros(1, dtype=dtype)
    for name in dtype.names:
        field = record[name]
        if np.issubdtype(field.dtype, np.floating):
            record[name] = rng.standard_normal(field.shape)
        else:
            info = np.iinfo(field.dtype)
            record[name] = rng.integers(max(info.min, -2**40), min(info.max, 2**40), field.shape, dtype=field.dtype)
    record["format"] = CHANGELOG_FORMAT
    return record.tobytes()


def random_log(seed: int, users: int = 30, writes: int = 400, bad: float = 0.0) -> Log:
    """Users mostly on a home partition (sometimes another: a partition that changed), upserts, tombstones
    (also of users never written), meta records, and with `bad`, records of another size."""
    rng = np.random.default_rng(seed)
    dtype = table().record_dtype()
    ids = [f"user-{i}" for i in range(users)] + ODD_IDS
    home = {u: int(rng.integers(PARTITIONS)) for u in ids}
    log: Log = []
    for _ in range(writes):
        kind = rng.random()
        if kind < 0.05:
            p = int(rng.integers(PARTITIONS))
            names = {str(b): f"cat-{int(rng.integers(5))}-{b}" for b in rng.choice(20, 3, replace=False).tolist()}
            log.append((p, META_KEY, orjson.dumps({"model_version": "m1", "format": CHANGELOG_FORMAT, "category_names": names})))
            continue
        user = ids[int(rng.integers(len(ids)))]
        p = home[user] if rng.random() > 0.1 else int(rng.integers(PARTITIONS))
        if kind < 0.25:
            value = None
        elif kind < 0.25 + bad:
            value = random_record(rng, dtype)[: -int(rng.integers(1, 9))]
        else:
            value = random_record(rng, dtype)
        log.append((p, user.encode("utf-8", "surrogatepass"), value))
    return log


def reference(log: Log, before: dict[str, bytes]) -> tuple[dict[str, bytes], dict[int, bytes]]:
    """Users -> record after restoring `log` over a table holding `before`; each partition's latest meta."""
    latest: dict[int, dict[bytes, bytes | None]] = {p: {} for p in range(PARTITIONS)}
    metas: dict[int, bytes] = {}
    for p, key, value in log:
        if key == META_KEY:
            metas[p] = value
        else:
            latest[p][key] = value
    users = dict(before)
    for p in sorted(latest):
        for key, value in latest[p].items():
            user = key.decode("utf-8", "surrogatepass")
            if value is None:
                users.pop(user, None)
            else:
                users[user] = value
    return users, metas


def held(state: StateTable) -> dict[str, bytes]:
    """Each user's record, as the table would write it now."""
    return dict(zip(state.user_ids, state.changelog_values(np.arange(len(state)))))


def prefilled(seed: int) -> StateTable:
    """A table already holding users (some of which the log writes again or erases)."""
    rng = np.random.default_rng(seed + 1000)
    state = table()
    for user in [f"user-{i}" for i in range(0, 40, 3)] + ["only-before"]:
        state.load_changelog({user.encode(): random_record(rng, state.record_dtype())})
    return state


def interleaved(log: Log, rng: np.random.Generator) -> list[Log]:
    """The log as a consumer may deliver it: partitions interleaved at random (each in its own order), in
    batches of random sizes."""
    queues = {p: [r for r in log if r[0] == p] for p in range(PARTITIONS)}
    order = rng.permutation(np.repeat(np.arange(PARTITIONS), [len(queues[p]) for p in range(PARTITIONS)]))
    taken = {p: 0 for p in queues}
    merged = []
    for p in order.tolist():
        merged.append(queues[p][taken[p]])
        taken[p] += 1
    cuts = np.cumsum(rng.integers(1, 60, len(merged)))
    return [merged[a:b] for a, b in zip([0, *cuts.tolist()], cuts.tolist()) if a < len(merged)]


@pytest.mark.parametrize("seed", range(12))
def test_the_loader_restores_exactly_whatever_the_batches(seed):
    rng = np.random.default_rng(seed)
    log = random_log(seed)
    state = prefilled(seed) if seed % 2 else table()
    want, metas = reference(log, held(state))
    clock = state.max_event_ts
    loader = state.changelog_loader()
    for batch in interleaved(log, rng):
        loader.add([k for _, k, _ in batch], [v for _, _, v in batch], np.array([p for p, _, _ in batch]))
    assert loader.finish() == sum(1 for _, v in reference(log, {})[0].items())  # the log's live users
    assert held(state) == want
    assert {p: m for p, m in loader.metas.items()} == metas
    live = [np.frombuffer(v, dtype=state.record_dtype())["last_ts"][0] for v in reference(log, {})[0].values()]
    assert state.max_event_ts == max([clock, *map(int, live)])
    assert len(state._index.rows(list(want))) == len(want) and (state._index.rows(list(want)) >= 0).all()


@pytest.mark.parametrize("seed", range(8))
def test_a_record_of_another_layout_is_refused_only_while_it_is_its_users_latest(seed):
    rng = np.random.default_rng(seed)
    log = random_log(seed, bad=0.05)
    final = {}
    for p in range(PARTITIONS):
        for q, key, value in log:
            if q == p and key != META_KEY:
                final[key] = value
    refused = any(v is not None and len(v) != table().record_dtype().itemsize for v in final.values())
    state = table()
    loader = state.changelog_loader()
    for batch in interleaved(log, rng):
        loader.add([k for _, k, _ in batch], [v for _, _, v in batch], np.array([p for p, _, _ in batch]))
    if refused:
        with pytest.raises(RefusedRecords, match="changelog records of .* bytes, expected"):
            loader.finish()
    else:
        loader.finish()
        assert held(state) == reference(log, {})[0]


def test_records_of_another_format_and_keyless_records():
    state = table()
    good = random_record(np.random.default_rng(0), state.record_dtype())
    loader = state.changelog_loader()
    loader.add([b"a", None, b"b"], [good, good, bytes([CHANGELOG_FORMAT + 1]) + good[1:]],
               np.zeros(3, dtype=np.int64))
    assert loader.keyless == 1
    with pytest.raises(RefusedRecords, match=f"format \\[{CHANGELOG_FORMAT + 1}\\] is not"):
        loader.finish()
    loader.add([b"b"], [None], np.zeros(1, dtype=np.int64))  # erased since: nothing refused any more
    assert loader.finish() == 1 and state.user_ids == ["a"]


@pytest.mark.parametrize("form", sorted(READABLE_FORMATS))
@pytest.mark.parametrize("state_dtype", [torch.float16, torch.float32])
def test_a_record_of_an_earlier_readable_format_restores_and_what_it_lacks_starts_afresh(state_dtype, form):
    """A format-8 record (without the habit over two-day spans and the latest visit's counts) or a format-9 one
    (without the latter) loads into every column it has; the columns it lacks take their initial values, also in a
    row that held a user before. A record of that layout that says another format is refused."""
    state = StateTable(8, torch.device(DEVICE), watermark_slots=1, dedupe_window=4, state_dtype=state_dtype)
    rng = np.random.default_rng(3)
    full = np.frombuffer(random_record(rng, state.record_dtype()), dtype=state.record_dtype())
    lacks = READABLE_FORMATS[form]
    layout = record_dtype(state.state_size, {k: v for k, v in state.spec.items() if k not in lacks}, state_dtype)
    old = np.zeros(1, dtype=layout)
    for name in layout.names:
        old[name] = full[name]
    old["format"] = form
    state.load_changelog({b"a": full.tobytes()})  # a row holding every column, written again by the old record
    assert state.columns[lacks[1]][0].any()
    state.load_changelog({b"a": old.tobytes(), b"b": old.tobytes()})
    for row in (state.row("a"), state.row("b")):
        for name in state.spec:
            expected = state.spec[name][2] if name in lacks else full[name][0]
            np.testing.assert_array_equal(state.columns[name][row], expected, err_msg=name)
        assert torch.equal(state.states[row].cpu(), torch.from_numpy(full["hidden"][0].copy()).to(state_dtype))
    old["format"] = CHANGELOG_FORMAT
    loader = state.changelog_loader()
    loader.add([b"c"], [old.tobytes()], np.zeros(1, dtype=np.int64))
    with pytest.raises(RefusedRecords, match=f"format \\[{CHANGELOG_FORMAT}\\] is not"):
        loader.finish()


@pytest.fixture
def changelog_topic(kafka, unique):
    ensure_topics(admin_client(kafka), {unique("state"): PARTITIONS}, compacted=[unique("state")])
    return unique("state")


def write(kafka, topic: str, log: Log) -> None:
    publisher = Publisher(kafka)
    publisher.produce_to_partitions(topic, [k for _, k, _ in log], [v for _, _, v in log], [p for p, _, _ in log])
    publisher.flush()


@pytest.mark.parametrize("seed", [0, 1])
def test_a_restore_from_the_broker_is_exact(kafka, changelog_topic, seed):
    log = random_log(seed, users=200, writes=3000)
    write(kafka, changelog_topic, log)
    state = prefilled(seed) if seed else table()
    want, metas = reference(log, held(state))
    ticks = []
    changelog = Changelog(kafka, state, Publisher(kafka), Metrics(), topic=changelog_topic, model_version="m1")
    restored = changelog.restore(list(range(PARTITIONS)), on_progress=lambda: ticks.append(1))
    assert restored.users == len(reference(log, {})[0]) and held(state) == want
    assert ticks, "a restore ticks /healthz as records arrive"
    names: dict[int, str] = {}
    for meta in metas.values():
        for bucket, name in orjson.loads(meta)["category_names"].items():
            names[int(bucket)] = min(name, names.get(int(bucket), name))
    assert state.category_names == names


def test_a_restore_of_some_partitions_reads_only_those(kafka, changelog_topic):
    log = random_log(5, users=50, writes=500)
    write(kafka, changelog_topic, log)
    state = table()
    Changelog(kafka, state, Publisher(kafka), Metrics(), topic=changelog_topic, model_version="m1").restore([0, 2])
    assert held(state) == reference([r for r in log if r[0] in (0, 2)], {})[0]


def test_a_transaction_left_open_is_read_on_uncommitted_after_the_stall(kafka, changelog_topic, unique):
    """A dead producer's open transaction holds read_committed readers back on a broker that never aborts it
    (Tansu): past the stall, the reader takes the partition on uncommitted, the open transaction's records too."""
    write(kafka, changelog_topic, [(0, b"before", b"1")])
    zombie = Publisher(kafka, transactional_id=unique("zombie"))
    zombie.init_transactions()
    zombie.begin()
    zombie.produce_to_partitions(changelog_topic, [b"in-the-open-transaction"], [b"2"], [0])
    zombie.flush_briefly()
    seen: list[bytes] = []
    read_to_end(kafka, changelog_topic, [0], lambda messages, _: seen.extend(m.key() for m in messages), stall_s=2)
    assert b"before" in seen and b"in-the-open-transaction" in seen


def test_a_restore_refuses_records_of_another_layout_naming_the_partition(kafka, changelog_topic):
    write(kafka, changelog_topic, [(2, b"u", b"\x02too short")])
    changelog = Changelog(kafka, table(), Publisher(kafka), Metrics(), topic=changelog_topic, model_version="m1")
    with pytest.raises(StreamError, match=f"{changelog_topic}\\[2\\]: changelog records of \\[10\\] bytes"):
        changelog.restore(list(range(PARTITIONS)))


def test_a_changelog_of_the_previous_format_restores_from_the_broker(kafka, changelog_topic):
    """A daemon upgraded in place: its topic holds format-9 records and meta records (written before the latest
    visit's counts), one user written again in this format since. Every user restores, the category names with them;
    what format 9 lacks starts afresh. A meta record of an older format still stops the restore, saying so."""
    rng = np.random.default_rng(5)
    state = table()
    previous = CHANGELOG_FORMAT - 1
    lacks = READABLE_FORMATS[previous]
    layout = record_dtype(state.state_size, {k: v for k, v in state.spec.items() if k not in lacks},
                          state.state_dtype)
    old = np.zeros(3, dtype=layout)
    for name in layout.names:
        old[name] = np.frombuffer(b"".join(random_record(rng, layout) for _ in range(3)), dtype=layout)[name]
    old["format"] = previous
    new = random_record(rng, state.record_dtype())
    meta = orjson.dumps({"model_version": "m1", "format": previous, "category_names": {"7": "hats"}})
    write(kafka, changelog_topic, [(0, META_KEY, meta), (0, b"a", old[0].tobytes()), (1, b"b", old[1].tobytes()),
                                   (1, b"c", old[2].tobytes()), (1, b"c", new)])
    changelog = Changelog(kafka, state, Publisher(kafka), Metrics(), topic=changelog_topic, model_version="m1")
    assert changelog.restore(list(range(PARTITIONS))).users == 3
    assert state.category_names == {7: "hats"}
    for user, record in (("a", old[0]), ("b", old[1])):
        row = state.row(user)
        for name in state.spec:
            expected = state.spec[name][2] if name in lacks else record[name]
            np.testing.assert_array_equal(state.columns[name][row], expected, err_msg=name)
    assert held(state)["c"] == new
    write(kafka, changelog_topic, [(2, META_KEY, orjson.dumps({"model_version": "m1", "format": 7}))])
    again = Changelog(kafka, table(), Publisher(kafka), Metrics(), topic=changelog_topic, model_version="m1")
    with pytest.raises(StreamError, match="holds state of changelog format 7, this release writes"):
        again.restore(list(range(PARTITIONS)))


def test_a_restore_from_a_topic_with_binary_keys_says_it_is_not_a_state_topic(kafka, changelog_topic):
    write(kafka, changelog_topic, [(1, b"\xff\xfe", b"\x00" * 40)])
    changelog = Changelog(kafka, table(), Publisher(kafka), Metrics(), topic=changelog_topic, model_version="m1")
    with pytest.raises(StreamError, match="keys are not UTF-8 user ids: not this daemon's state topic"):
        changelog.restore(list(range(PARTITIONS)))
