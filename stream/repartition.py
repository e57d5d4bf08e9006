"""--repartition: input records re-keyed by their user id through an internal topic, as Kafka Streams does.

The state step needs each user's events on one partition, in order (docs/contracts.md, partitioning).
Producers that send no key, or key by session, break that; with --repartition the daemon reads the
input topics only to forward each valid record, unchanged, to `<group_id>.repartition` keyed by its
user id (the producer's partitioner then puts a user on one partition, always the same one), and
applies what it reads from that topic. Records that break the contract are dead-lettered here, at
their source position. The forwarded records go out with the batch's other output and the input
offsets are committed with them (stream/changelog.py): in one transaction under exactly-once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stream.decode import decode_batch
from stream.events import Control, DeadLetter, RecordBatch, utf8


@dataclass
class Forwarded:
    """Records for the repartition topic: (key = user id, the record's value), in the input's order, with the
    (topic, partition) each came from (an aborted transaction re-sends those of partitions still owned)."""

    keys: list[bytes] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    sources: list[tuple[str, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def __iadd__(self, other: Forwarded) -> Forwarded:
        self.keys += other.keys
        self.values += other.values
        self.sources += other.sources
        return self

    def of_sources(self, owned: set[tuple[str, int]]) -> Forwarded:
        keep = [i for i, source in enumerate(self.sources) if source in owned]
        return Forwarded([self.keys[i] for i in keep], [self.values[i] for i in keep],
                         [self.sources[i] for i in keep])


def split_upstream(records: RecordBatch, repartition_topic: str) -> tuple[RecordBatch, RecordBatch]:
    """(records of the repartition topic: the state step's input, records of the input topics: to forward)."""
    own = np.asarray(records.topics, dtype=object) == repartition_topic
    if own.all():
        return records, RecordBatch.empty()
    if not own.any():
        return RecordBatch.empty(), records
    return records.take(np.flatnonzero(own).tolist()), records.take(np.flatnonzero(~own).tolist())


def rekey(records: RecordBatch, max_event_bytes: int) -> tuple[Forwarded, list[DeadLetter]]:
    """Each valid event and control record of `records`, keyed by its user id (the raw id, as the contract's
    key: UTF-8, integers as their decimal string), and dead letters for the rest. The value is forwarded
    byte for byte: the state step decodes it again (and pseudonymises, where configured)."""
    if not len(records):
        return Forwarded(), []
    controls: list[Control] = []
    events, dead = decode_batch(records, max_event_bytes, controls)
    index = events.record_index.tolist() + [c.record_index for c in controls]
    users = events.user_id.tolist() + [c.user_id for c in controls]
    if controls:  # rare (forget records): back into record order
        order = sorted(range(len(index)), key=index.__getitem__)
        index, users = [index[i] for i in order], [users[i] for i in order]
    keys = list(utf8(users))
    values, topics, partitions = records.values, records.topics, records.partitions
    return Forwarded(keys, [values[i] for i in index], [(topics[i], partitions[i]) for i in index]), dead
