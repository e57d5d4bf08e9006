"""`profiles replay`: event logs through the daemon's own pipeline, in large batches, without a broker.

The loop is the daemon's: next batch -> ProfileUpdater.process (decode, validate, GRU, heads)
-> profiles and dead letters out. Only the source (files) and the sinks (files or a topic) differ.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from consumers.outfiles import Interrupted, OutputFile, check_distinct, check_output_tree, is_regular_path
from models.update_step import ProfileUpdater, load_updater
from stream.decode_ahead import DecodeAhead, auto_workers, close_pool, decode_pool
from stream.events import DeadLetter
from stream.kafka import Publisher
from stream.runtime import tune_garbage_collector, usable_cores
from stream.settings import Settings
from stream.sources import SourceError, no_usable_events, open_sources, parse_kafka_uri
from stream.snapshot_files import SNAPSHOT_FILES, write_snapshot
from stream.state import StateTable

log = logging.getLogger(__name__)


@dataclass
class ReplayReport:
    records: int = 0
    events: int = 0
    dead_letters: int = 0
    out_of_range: int = 0  # valid events outside a kafka:// source's event-time range
    duplicates: int = 0  # valid events whose event_id was among their user's recent ones: skipped
    replayed: int = 0  # valid events at or below their user's watermark (read twice): skipped
    profiles: int = 0
    erased: int = 0  # users erased by forget records in the log
    expired: int = 0  # users whose state expired (--state-ttl), a returning user once per expiry
    users: int = 0
    seconds: float = 0.0
    partial: list[str] = field(default_factory=list)  # where an interrupted run left its output
    reasons: Counter[str] = field(default_factory=Counter)  # dead letters by reason
    examples: dict[str, DeadLetter] = field(default_factory=dict)  # the first dead letter of each reason

    def add_dead_letters(self, dead: list[DeadLetter]) -> None:
        self.dead_letters += len(dead)
        self.reasons.update(d.reason for d in dead)
        for d in dead:
            self.examples.setdefault(d.reason, d)

    def summary(self, dead_letters_path: str) -> str:
        """The one line printed at the end (or at Ctrl-C)."""
        skipped = "".join(f", {n:,} {what}" for n, what in (
            (self.out_of_range, "outside the time range"), (self.duplicates, "duplicates skipped"),
            (self.replayed, "already applied, skipped")) if n)
        erased = f"; {self.erased:,} user(s) erased by forget records" if self.erased else ""
        erased += (f"; {self.expired:,} user state(s) expired, {self.users:,} user(s) left in state"
                   if self.expired else "")
        dead = f"{self.dead_letters:,} dead letters" + (f" -> {dead_letters_path}" if self.dead_letters else "")
        # The users in state at the end: all the log's users, unless some expired (then said below, not here).
        users = "" if self.expired else f" of {self.users:,} users"
        return (f"{self.records:,} records ({self.events:,} events, {dead}{skipped}){users} in "
                f"{self.seconds:.1f}s ({self.events_per_second:,.0f} records/s); {self.profiles:,} profiles written"
                f"{erased}{self.dead_letter_reasons()}")

    def dead_letter_reasons(self, top: int = 3) -> str:
        """The most frequent reasons, with one example each: what to fix in the log, without opening the file."""
        if not self.reasons:
            return ""
        parts = [f"{reason} {n:,} (e.g. {self.examples[reason].topic}:{self.examples[reason].offset}: "
                 f"{_shortened(self.examples[reason].detail)})" for reason, n in self.reasons.most_common(top)]
        more = len(self.reasons) - top
        return f"; dead letters by reason: {', '.join(parts)}" + (f" and {more} more reason(s)" if more > 0 else "")

    def top_example(self) -> DeadLetter | None:
        return self.examples[self.reasons.most_common(1)[0][0]] if self.reasons else None

    @property
    def events_per_second(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


def _shortened(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ProfileSink:
    """Profiles to a JSON-lines file (.gz compresses; written atomically, see OutputFile) or to a Kafka topic."""

    def __init__(self, path: str | None, topic: str | None, settings: Settings) -> None:
        self.topic = topic
        self.out = OutputFile(path) if path else None
        self.publisher = Publisher(settings.kafka) if topic else None

    def write(self, profiles: list[tuple[bytes, bytes]]) -> None:
        if self.out is not None:
            self.out.write(b"".join(value + b"\n" for _key, value in profiles))
        if self.publisher is not None:
            for key, value in profiles:
                self.publisher.produce(self.topic, key, value)
            self.publisher.poll()

    def erase(self, users: list[str]) -> None:
        """Erased users (forget records in the log): a tombstone on the topic, an `erased` line in the file,
        so a reader of every update drops the profiles it had for them."""
        if self.out is not None:
            self.out.write(b"".join(orjson.dumps({"user_id": u, "erased": True}) + b"\n" for u in users))
        if self.publisher is not None:
            for user in users:
                self.publisher.produce(self.topic, user.encode("utf-8", "surrogatepass"), None)

    def close(self) -> None:
        """Complete: the file replaces --out, the topic's records are acknowledged."""
        if self.out is not None:
            self.out.commit()
        if self.publisher is not None:
            self.publisher.flush()

    def keep_partial(self) -> list[str]:
        """Interrupted: the file written so far is kept as <out>.partial; what was produced is sent
        (briefly: Ctrl-C should end the command in seconds). Returns the partial file's name."""
        if self.publisher is not None:
            self.publisher.flush_briefly()
        return [self.out.keep_partial()] if self.out is not None else []

    def discard(self) -> None:
        """Failed: no half-written file replaces an earlier --out."""
        if self.out is not None:
            self.out.discard()


class LastExpired:
    """The last profile of each user whose state expired (--on-expire publish), held until the end of a
    replay that writes final profiles: one whose user came back is replaced by the user's final profile."""

    def __init__(self) -> None:
        self.profiles: dict[bytes, bytes] = {}

    def add(self, profiles: list[tuple[bytes, bytes]], erased: list[tuple[str, int]]) -> None:
        self.profiles.update(profiles)
        for user, _ in erased:  # erased after it expired: nothing of the user is written
            self.profiles.pop(user.encode("utf-8", "surrogatepass"), None)

    def of_users_not_in(self, state: StateTable) -> list[tuple[bytes, bytes]]:
        return [(key, value) for key, value in self.profiles.items()
                if state.row(key.decode("utf-8", "surrogatepass")) is None]


def dead_letter_line(dead: DeadLetter) -> bytes:
    """One JSON line per dead letter: the reason, where it came from, and the record byte for byte (base64)."""
    return orjson.dumps({
        "reason": dead.reason, "detail": dead.detail, "source": dead.topic, "line": dead.offset,
        "value_base64": base64.b64encode(dead.value or b"").decode(),
    }) + b"\n"


def replay(settings: Settings, sources: list[str], fmt: str, out: str | None, output_topic: str | None,
           every_update: bool, state_out: str | None, dead_letters_path: str, batch_records: int,
           show_progress: bool = True, updater: ProfileUpdater | None = None, decode_workers: int | None = None,
           ) -> ReplayReport:
    """Replay `sources`; write every update or the final profile of every user; optionally a state snapshot.
    `decode_workers`: processes decoding the next batches while one is applied (stream/decode_ahead.py; None:
    one where the sources are long enough and a core is free for it).

    Raises SourceError when records were read but every one was a dead letter (no event applied): the
    outputs are then discarded, as on any error."""
    started = time.monotonic()
    # The sources and outputs are checked before the model loads (seconds): a mistake shows at once.
    check_distinct({"--out": out, "--dead-letters": dead_letters_path})
    if state_out:  # written last, after minutes of work: where it cannot be, say so now
        check_output_tree(state_out, "--state-out")
    opened = open_sources(settings.kafka, sources, fmt, batch_records, keep_rejected=True,
                          outputs={"--out": out, "--dead-letters": dead_letters_path,
                                   # an earlier run's snapshot in a directory replayed again is no event log
                                   **({f"--state-out ({name})": os.path.join(state_out, name)
                                       for name in SNAPSHOT_FILES} if state_out else {})})
    sink = ProfileSink(out, output_topic, settings)
    try:
        dlq = OutputFile(dead_letters_path, "--dead-letters")
    except OSError:
        sink.discard()
        raise
    workers = auto_workers(opened, batch_records, usable_cores()) if decode_workers is None else decode_workers
    pool = decode_pool(workers)
    try:
        opened = [DecodeAhead(source, settings.max_event_bytes, pool) for source in opened]
        # Topics replayed are the updater's input topics: their users' state records the partition and
        # offset of their events, so a daemon started from the snapshot knows which member owns whom.
        topics = tuple(dict.fromkeys(parse_kafka_uri(s)[0] for s in sources if s.startswith("kafka://")))
        updater = updater or load_updater(replace(settings, input_topics=topics or settings.input_topics))
    except BaseException:
        close_pool(pool)
        sink.discard()
        dlq.discard()
        raise
    report = ReplayReport()
    last_expired = LastExpired()
    tune_garbage_collector()
    positions: dict[str, dict[int, int]] = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), disable=not show_progress, transient=True,
        console=Console(stderr=True),
    ) as bar:
        try:
            for source in opened:
                task = bar.add_task(f"replay {source.name}", total=source.progress()[1] or 1, rate="")
                first_after: dict[int, int] = {}
                while not source.exhausted:
                    batch = source.next_batch()
                    # Rows a dataset format could not convert are dead letters too, never silently dropped.
                    rejected = source.take_rejected()
                    if rejected:
                        dlq.write(b"".join(dead_letter_line(d) for d in rejected))
                        report.records += len(rejected)
                        report.add_dead_letters(rejected)
                    if not len(batch):
                        continue
                    # The daemon's batch step (the batch decoded ahead where a worker did it)
                    result = updater.process(batch, source.time_range, profiles=every_update,
                                             ahead=source.take_decoded())
                    for partition, offset in result.first_after_range.items():
                        first_after[partition] = min(first_after.get(partition, offset), offset)
                    report.erased += result.forgotten
                    report.expired += len(result.expired)
                    if every_update:
                        sink.write(result.expired.profiles)  # expired before the batch's events, or at a return
                        report.profiles += len(result.expired.profiles)
                        if result.erased:  # before the batch's profiles: a user re-created after it wins
                            sink.erase([user for user, _ in result.erased])
                        sink.write(result.profiles)
                        report.profiles += len(result.profiles)
                    else:
                        last_expired.add(result.expired.profiles, result.erased)
                    if result.dead_letters:
                        dlq.write(b"".join(dead_letter_line(d) for d in result.dead_letters))
                    report.records += len(batch)
                    report.events += len(result.events)
                    report.out_of_range += result.out_of_range
                    report.duplicates += result.duplicates
                    report.replayed += result.replayed
                    report.add_dead_letters(result.dead_letters)
                    rate = report.records / (time.monotonic() - started)
                    bar.update(task, completed=source.progress()[0], rate=f"{rate:,.0f} records/s")
                for topic, read in source.positions().items():  # kafka:// sources (files have none)
                    # A daemon started from the snapshot continues where the replay stopped applying:
                    # at the first event past the range's end where there was one (the ones after it
                    # that the replay did apply are at or below their user's watermark, and skipped).
                    positions[topic] = {p: min(o, first_after.get(p, o)) for p, o in read.items()}
            if report.dead_letters and not report.events:  # a log in the wrong layout, not a log of events
                raise SourceError(f"{no_usable_events(sources, report.reasons, report.top_example())}; "
                                  "nothing written")
            while expired := updater.expire_idle(force=True):  # users idle past the TTL at the log's end
                report.expired += len(expired)
                if every_update:
                    sink.write(expired.profiles)
                    report.profiles += len(expired.profiles)
                else:
                    last_expired.add(expired.profiles, [])
            if not every_update:
                final = last_expired.of_users_not_in(updater.state)
                sink.write(final)
                report.profiles += len(final)
                for profiles in updater.all_profiles():
                    sink.write(profiles)
                    report.profiles += len(profiles)
        except KeyboardInterrupt:
            report.users, report.seconds = len(updater.state), time.monotonic() - started
            report.partial = sink.keep_partial()
            if report.dead_letters:
                report.partial.append(dlq.keep_partial())
            else:
                dlq.discard()  # no dead letters: no empty file of them
            raise Interrupted(f"interrupted: {report.summary(dead_letters_path)}; partial output kept in "
                              f"{', '.join(report.partial)}") from None
        except BaseException:
            sink.discard()
            dlq.discard()
            raise
        finally:
            close_pool(pool)
    if state_out:  # before the profiles are committed: a snapshot that cannot be written leaves --out as it was
        meta = {"model_version": updater.state_version, "sources": sources, "records": report.records,
                "input_topics": list(updater.topic_slot),  # the watermark slots, in order
                "user_ids": updater.user_ids,  # raw, or pseudonyms under the key's fingerprint
                # Where a daemon started from this state continues: per topic, partition -> next offset.
                "kafka_offsets": {t: {str(p): o for p, o in parts.items()} for t, parts in positions.items()},
                "created_at": time.time()}
        try:
            write_snapshot(state_out, updater.state.snapshot(), meta)
        except BaseException:
            sink.discard()
            dlq.discard()
            raise
    sink.close()
    if report.dead_letters or not is_regular_path(dead_letters_path) or os.path.lexists(dead_letters_path):
        dlq.commit()  # an earlier run's dead letters at the path are replaced: they are not this output's
    else:
        dlq.discard()  # no dead letters: no empty file beside the output
    report.users = len(updater.state)
    report.seconds = time.monotonic() - started
    return report

