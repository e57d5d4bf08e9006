"""`profiles forget`: erase users (right to erasure) through the input, in order with their events.

The command does not touch state itself: the daemon that owns the user does. It writes a control
record, {"control": "forget", "user_id": ...}, into the input partition the user's state lives in
(found in the state changelog). The owning daemon reaches it in offset order, after every earlier
event of the user, drops the user's state and writes tombstones to the changelog and output topics
in the same flush its offsets wait for: erasure is ordered, survives crashes (a re-read forget
erases again; one below the user's watermark is skipped) and needs no second channel to the daemon.
Replays of the input honour the same records, so a rebuilt profile topic does not bring users back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson

from stream.kafka import Publisher, StreamError, admin_client, partition_counts, read_latest
from stream.pseudonyms import Pseudonymizer
from stream.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ForgetRequest:
    user_id: str
    state_key: str  # the user's key in state and on the output topics (its pseudonym under a key)
    partitions: list[int]  # input partitions the forget record went to
    in_state: bool  # found in the changelog (one partition) or not (every partition)
    erased: bool = False  # the changelog shows the tombstone (only checked with a wait)


def control_record(user_id: str) -> bytes:
    return orjson.dumps({"control": "forget", "user_id": user_id, "requested_at": int(time.time() * 1000)})


def forget_users(settings: Settings, users: list[str], wait_s: float = 0.0) -> list[ForgetRequest]:
    """Write one forget record per user to the first input topic; optionally wait until the owning
    daemon has written the user's changelog tombstone. Raises StreamError on Kafka trouble."""
    topic, changelog = settings.input_topics[0], settings.changelog_topic
    counts = partition_counts(admin_client(settings.kafka), [topic, changelog])
    if topic not in counts:
        raise StreamError(f"input topic {topic} does not exist")
    pseudonym = Pseudonymizer(settings.pseudonymize_key).one if settings.pseudonymize_key else (lambda u: u)
    keys = {user: pseudonym(user) for user in users}
    where = _partitions_holding(settings, changelog, counts.get(changelog, 0), set(keys.values()))
    publisher = Publisher(settings.kafka)
    requests = []
    for user in users:
        found = where.get(keys[user])
        # Unknown to the changelog: the user may still have events in flight, on a partition we
        # cannot name (the producers' partitioner is theirs): ask every partition; only the one
        # that ends up holding the user acts on it.
        # With --repartition the daemon forwards it by key to the user's partition: one record, anywhere.
        partitions = [0] if settings.repartition else [found] if found is not None else list(range(counts[topic]))
        publisher.produce_to_partitions(topic, [user.encode("utf-8", "surrogatepass")] * len(partitions),
                                        [control_record(user)] * len(partitions), partitions)
        requests.append(ForgetRequest(user, keys[user], partitions, found is not None))
    publisher.flush()
    if wait_s > 0:
        _wait_for_tombstones(settings, changelog, requests, wait_s)
    return requests


def _partitions_holding(settings: Settings, changelog: str, partitions: int, keys: set[str]) -> dict[str, int]:
    """key -> the changelog partition whose latest record for it is live state."""
    if not partitions:
        return {}
    latest = read_latest(settings.kafka, changelog, range(partitions))
    wanted = {k.encode("utf-8", "surrogatepass"): k for k in keys}
    return {wanted[key]: p for p, records in latest.items() for key, value in records.items()
            if key in wanted and value is not None}


def _wait_for_tombstones(settings: Settings, changelog: str, requests: list[ForgetRequest], wait_s: float) -> None:
    """Poll the changelog (with a deadline) until every user found in state has its tombstone."""
    deadline = time.monotonic() + wait_s
    pending = {r.state_key.encode("utf-8", "surrogatepass"): r for r in requests if r.in_state}
    while pending and time.monotonic() < deadline:
        latest = read_latest(settings.kafka, changelog, {p for r in pending.values() for p in r.partitions})
        for key in list(pending):
            if any(key in records and records[key] is None for records in latest.values()):
                pending.pop(key).erased = True
        if pending:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
