"""`profiles evaluate`: the model against popularity, sequential rules and session kNN, fitted and scored in the
same run."""

from __future__ import annotations

import time

import click
import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from consumers.commands.base import reading_sources
from models.dataset import load_events
from models.next_event_evaluation import Sequences, evaluate
from models.next_event_baselines import PopularityBaseline, SequentialRulesBaseline, SessionKNNBaseline
from models.profile_model import resolve_device
from models.checkpoint_io import load_checkpoint
from models.next_event_scorers import GRUScorer, aligned_train, sequences_from_log
from stream.settings import KafkaSettings, Settings


def carried_over(train: Sequences | None, train_users: np.ndarray, test_users: np.ndarray,
                 like: Sequences) -> Sequences | None:
    """`train` re-indexed to the test users' order (empty arrays for users without training events)."""
    if train is None:
        return None
    where = np.searchsorted(train_users, test_users)
    found = (where < len(train_users)) & (train_users[np.minimum(where, len(train_users) - 1)] == test_users)

    def pick(arrays: list[np.ndarray], dtype: type) -> list[np.ndarray]:
        empty = np.empty(0, dtype=dtype)
        return [arrays[w] if f else empty for w, f in zip(where, found)]

    return Sequences(pick(train.items, np.int64), pick(train.categories, np.int64), pick(train.types, np.int64),
                     pick(train.ts, np.int64), like.n_items, like.n_categories)


def run_evaluation(model_path: str, train_files: tuple[str, ...], test_files: tuple[str, ...], device_name: str,
                   k: int, as_json: bool, kafka: KafkaSettings | None = None, *,
                   max_ahead_ms: int = Settings.max_ahead_ms) -> None:
    """`profiles evaluate`; the logs are the replay's sources (files, directories, globs, kafka:// ranges read
    with `kafka`); max_ahead_ms: its --max-ahead."""
    started = time.monotonic()
    device = resolve_device(device_name)
    loaded = load_checkpoint(model_path, device)
    if not loaded.item_vocab:
        raise click.ClickException(f"{model_path} has no next-item head: train it with `profiles train`")
    model = loaded.model
    item_index = {item: i for i, item in enumerate(loaded.item_vocab)}
    with reading_sources(kafka):
        train_log, test_log = (load_events(files, kafka=kafka, max_ahead_ms=max_ahead_ms)
                               for files in (train_files, test_files))
    for log_, option, files in ((train_log, "--train-events", train_files), (test_log, "--events", test_files)):
        if not len(log_):  # without training events every baseline ties everywhere, and ties rank first: 1.0
            raise click.ClickException(f"no usable events in {option} {', '.join(files)}"
                                       + (f" ({log_.invalid:,} invalid lines: see the warning above)"
                                          if log_.invalid else ""))
    train_seq = sequences_from_log(train_log, item_index, model)
    test_seq = sequences_from_log(test_log, item_index, model)
    aligned = aligned_train(train_log, test_log)
    aligned_seq = carried_over(sequences_from_log(aligned, item_index, model) if aligned else None,
                               aligned.users if aligned else np.empty(0), test_log.users, test_seq)

    results: dict[str, dict] = {}
    scorers = [GRUScorer(model, loaded.item_vocab, test_log, aligned, device), PopularityBaseline(),
               SequentialRulesBaseline(), SessionKNNBaseline()]
    names = {"gru": f"gru ({loaded.version})", "popularity": "popularity", "sequential_rules": "sequential rules",
             "session_knn": "session kNN"}
    for scorer in scorers:
        t0 = time.monotonic()
        scorer.fit(train_seq)
        metrics = evaluate(scorer, aligned_seq, test_seq, k=k)
        metrics["seconds"] = round(time.monotonic() - t0, 2)
        results[scorer.name] = metrics
    summary = {
        "model": loaded.version, "train_events": len(train_log), "test_events": len(test_log),
        "test_users": len(test_log.users), "test_users_with_history": 0 if aligned is None else len(aligned.users),
        "items": len(item_index), "seconds": round(time.monotonic() - started, 2), "results": results,
    }
    if as_json:
        click.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())
        return
    table = Table(title=f"next-event evaluation: {len(test_log):,} test events of {len(test_log.users):,} users")
    first = next(iter(results.values()))
    columns = [c for c in first if c not in ("seconds",)]
    table.add_column("scorer")
    for c in columns:
        table.add_column(c, justify="right")
    for key, metrics in results.items():
        table.add_row(names[key], *(_fmt(metrics[c]) for c in columns))
    console = Console()
    if not console.is_terminal:  # piped: room for every column, not rich's 80 (the names were cut to "recal…")
        console = Console(width=max(console.width, 160))
    console.print(table)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.4f}"
    return f"{value:,}"
