"""A replay's next batches decoded in worker processes while the current one is applied.

A replay's loop is one thread, and decoding (JSON to checked columns: stream/decode.py) was a fifth of it: 0.8 s
of a 4.1 s replay of bench500k on two cores. Decoding is a pure function of the records, so it can run ahead
elsewhere. Not in a thread: msgspec's parse and the building of the columns hold the GIL (a thread gained 5%;
docs/model-journal.md, session 63). A worker process gets each batch's records and sends back its
`DecodedRecords`, the very result the loop would have computed; the loop applies batch k while the worker decodes
k + 1 (docs/benchmarks.md, session 75).

What the loop sees does not change: the same batches in the same order, each with what decode_batch says of
it. Where a worker fails (killed, or a batch it cannot send back), the loop decodes that batch itself and every
later one: slower, nothing lost.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

from stream.decode import DecodedRecords, decode_records
from stream.events import DeadLetter, RecordBatch
from stream.sources import BatchSource, FileSource, TimeRange

log = logging.getLogger(__name__)

# "auto" starts a worker only where a replay is long enough to pay for it (the batches' records and results are
# pickled: a third of what decoding them costs) and a core is free for it. A file's records are counted by its
# size (bench500k's are 140 bytes, the generator's structured shops' up to 400).
AUTO_MIN_BATCHES = 4
BYTES_PER_RECORD = 150
# How often the loop, waiting for a batch's decoding, looks whether a worker has died. The pool's own watch misses
# one killed while it was sending a result: CPython's ProcessPoolExecutor then reads the result's rest, which never
# comes, and the loop waited on it for ever (a CI run: test_a_worker_killed_mid_replay_loses_no_batch).
WORKER_WATCH_SECONDS = 0.5


def auto_workers(sources: list[BatchSource], batch_records: int, cores: int) -> int:
    """Decode workers for `--decode-workers auto`: one where there are two cores or more, processes can be forked
    and the sources hold AUTO_MIN_BATCHES batches or more (files: by their size, BYTES_PER_RECORD a record); else
    none."""
    if cores < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return 0
    records = 0
    for source in sources:
        done, total = source.progress()
        records += (total - done) // BYTES_PER_RECORD if isinstance(source, FileSource) else total - done
    return 1 if records >= AUTO_MIN_BATCHES * batch_records else 0


def decode_pool(workers: int) -> ProcessPoolExecutor | None:
    """`workers` decoding processes (None for 0, or where processes cannot be forked). Forked, as PyTorch's data
    loader forks its workers on Linux: a worker runs only decode_records, and it is forked at the first batch,
    before the model is loaded and torch starts threads. Spawned ones would import the caller's main module again,
    which runs a script that does not guard its work with `if __name__ == "__main__"` a second time. Stop them
    with close_pool."""
    if workers <= 0:
        return None
    if "fork" not in multiprocessing.get_all_start_methods():
        log.warning("--decode-workers: this platform cannot fork processes; each batch is decoded in the replay")
        return None
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_worker_ignores_interrupts)


def close_pool(pool: ProcessPoolExecutor | None) -> None:
    """Stop the workers: a batch being decoded is finished, none waiting is started (a replay interrupted or
    failed does not wait for them)."""
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def worker_processes(pool: ProcessPoolExecutor) -> list:
    """The pool's worker processes (CPython's private `_processes`; none where it is missing or none started)."""
    return list((getattr(pool, "_processes", None) or {}).values())


def worker_died(pool: ProcessPoolExecutor) -> bool:
    """Whether one of the pool's worker processes has exited (a pool with none started yet: no)."""
    return any(process.exitcode is not None for process in worker_processes(pool))


def release_stuck(pool: ProcessPoolExecutor) -> None:
    """A worker died while sending a result, and the pool's manager thread waits for the rest of it: end the
    other workers and close this process's end of the results' pipe, so that its read ends (EOF), the pool marks
    itself broken and its thread exits (the interpreter joins it at exit: left blocked, a replay would never
    return). The pool's attributes are CPython's (3.11-3.13); where they are not, nothing is done."""
    writer = getattr(getattr(pool, "_result_queue", None), "_writer", None)
    for process in worker_processes(pool):
        if process.exitcode is None:
            process.kill()
            process.join(timeout=10)
    if writer is not None:
        writer.close()


class DecodeAhead:
    """A BatchSource around `source` that reads up to `ahead` batches past the one handed out, each decoded in
    `pool` (None: not decoded ahead, the caller decodes). After each next_batch, take_decoded() is that batch's
    DecodedRecords (None: decode it yourself) and take_rejected() the rows an import format refused while
    reading it."""

    def __init__(self, source: BatchSource, max_event_bytes: int, pool: ProcessPoolExecutor | None,
                 ahead: int = 2) -> None:
        self.source = source
        self.name = source.name
        self.max_event_bytes = max_event_bytes
        self.pool = pool
        self.watched = pool  # (kept once the pool is given up: futures it took may still be pending)
        self.ahead = max(ahead, 1)
        self.queue: deque[tuple[RecordBatch, list[DeadLetter], Future | None]] = deque()
        self._decoded: DecodedRecords | None = None
        self._rejected: list[DeadLetter] = []
        self.fill()  # the first batches go out now: a worker starts while the caller loads its model

    @property
    def time_range(self) -> TimeRange | None:
        return self.source.time_range

    @property
    def exhausted(self) -> bool:
        return self.source.exhausted and not self.queue

    def positions(self) -> dict[str, dict[int, int]]:
        return self.source.positions()  # read once exhausted: every batch read has been handed out

    def progress(self) -> tuple[int, int]:
        return self.source.progress()

    def fill(self) -> None:
        """Read batches until `ahead` wait beyond the next one (or the source ends), each sent to a worker."""
        while len(self.queue) <= self.ahead and not self.source.exhausted:
            batch = self.source.next_batch()
            rejected = self.source.take_rejected() if isinstance(self.source, FileSource) else []
            future = self.submit(batch)
            self.queue.append((batch, rejected, future))

    def submit(self, batch: RecordBatch) -> Future | None:
        if self.pool is None or not len(batch):
            return None
        try:
            return self.pool.submit(decode_records, batch, self.max_event_bytes)
        except RuntimeError as exc:  # the pool broke earlier (a worker was killed): decode here from now on
            self.give_up(exc)
            return None

    def next_batch(self, stop: threading.Event | None = None) -> RecordBatch:
        if not self.queue:  # (fill keeps it full until the source ends: asked past the end)
            return RecordBatch.of([])
        batch, self._rejected, future = self.queue.popleft()
        self.fill()  # the next ones are decoded while this one is applied
        self._decoded = None
        if future is not None:
            try:
                self._decoded = self.result_of(future)
            except Exception as exc:  # noqa: BLE001 (any failure there: the loop decodes the batch, and says why)
                self.give_up(exc)
        return batch

    def result_of(self, future: Future) -> DecodedRecords:
        """The future's result, or BrokenProcessPool where a worker has died and the result has not come."""
        while True:
            try:
                return future.result(timeout=WORKER_WATCH_SECONDS)
            except FutureTimeout:
                if self.watched is not None and worker_died(self.watched) and not future.done():
                    release_stuck(self.watched)
                    raise BrokenProcessPool("a decode worker died before its batch's result came whole") from None

    def take_decoded(self) -> DecodedRecords | None:
        """The latest batch's decoding (None: not decoded ahead); once."""
        decoded, self._decoded = self._decoded, None
        return decoded

    def take_rejected(self) -> list[DeadLetter]:
        """Rows the latest batch's import format could not convert (FileSource.take_rejected); once."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def give_up(self, exc: BaseException) -> None:
        """Decode in the loop from now on: a worker failed (its pool cannot be trusted with the next batch)."""
        if self.pool is not None:
            log.warning("decoding ahead stopped (%s: %s); the replay decodes each batch itself from here",
                        type(exc).__name__, exc)
            close_pool(self.pool)
            self.pool = None  # the batches it decoded before it failed are used; the others fail and are decoded here


def _worker_ignores_interrupts() -> None:
    """Ctrl-C reaches the whole process group: the replay handles it (keeps its partial output) and stops the
    workers; a worker's own traceback would only clutter the terminal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
