"""Commands over event logs and synthetic traffic: `replay`, `inspect`, `generate`, `import`, `split`
and `demo` (everything on one machine)."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import click

from consumers.commands.base import (
    check_broker, check_broker_for, command, exit_130_if_interrupted, install_stop_handlers,
)
from consumers.commands.options import (
    FiniteRange,
    device_option, expiry_options, kafka_from, kafka_options, max_ahead_option, max_categories_option, model_option,
    profile_options, pseudonymize_option, settings_from, state_dtype_option, thread_options, to_ms,
)

# JSON Lines and the importers' formats (stream/import_formats.py, which imports numpy: too slow a start
# for --help and shell completion). tests/test_cli.py checks that the two lists agree.
FORMATS = ["jsonl", "taobao", "rees46", "yoochoose", "retailrocket"]


def decode_workers_value(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    """--decode-workers: "auto" (None) or a count of 0 or more."""
    if value == "auto":
        return None
    try:
        workers = int(value)
    except ValueError:
        workers = -1
    if workers < 0:
        raise click.BadParameter(f"{value!r} is neither auto nor a count of 0 or more")
    return workers


@command(short_help="Event logs through the daemon's pipeline")
@click.argument("sources", nargs=-1, required=True)
@click.option("--format", "fmt", default="jsonl", show_default=True, type=click.Choice(FORMATS),
              help="jsonl: the event contract, one JSON object per line (plain or gzip); others are converted "
              "on the fly like `profiles import`.")
@model_option()
@click.option("--out", type=click.Path(dir_okay=False), help="Write profiles as JSON lines here (.gz compresses; "
              "'-': standard output). Written to a temporary file, renamed when complete; Ctrl-C keeps "
              "<out>.partial.")
@click.option("--output-topic", help="Publish profiles to this Kafka topic instead (or as well).")
@kafka_options("--output-topic and kafka:// sources")
@click.option("--every-update", is_flag=True,
              help="Write each user's profile after every batch that changed it, as the daemon publishes it, not "
              "only the final one (--batch-events 1: after every event).")
@click.option("--state-out", type=click.Path(file_okay=False), help="Save the final state here (a snapshot directory).")
@click.option("--dead-letters", "dead_letters_path", default=None, type=click.Path(dir_okay=False),
              help="Where records that break the contract go (JSON lines with reason, source, line and the "
              "record in base64). [default: <out>.dlq.jsonl when --out is a file, else replay.dlq.jsonl]")
@click.option("--batch-events", default=50_000, show_default=True, type=click.IntRange(min=1),
              help="Records per batch (the final profiles do not depend on it, but for the model state's float16 "
              "rounding; --every-update writes one profile per user and batch).")
@click.option("--decode-workers", default="auto", show_default=True, metavar="auto|N", callback=decode_workers_value,
              help="Processes that decode the next batches while one is applied (0: the replay decodes each batch "
              "itself). auto: one where there are two cores or more and the sources hold four batches or more.")
@device_option
@thread_options
@profile_options
@expiry_options
@max_ahead_option
@max_categories_option
@state_dtype_option
@pseudonymize_option
def replay(sources: tuple[str, ...], fmt: str, out: str | None, output_topic: str | None, every_update: bool,
           state_out: str | None, dead_letters_path: str | None, batch_events: int, decode_workers: int | None,
           connect_timeout: float, **params: Any) -> None:
    """Replay event logs through the daemon's pipeline: files, directories and globs (no broker needed),
    or Kafka topics as kafka://TOPIC?from=ISO&to=ISO (seeks by write time, then keeps the events whose
    event time is in [from, to)).

    Writes the final profile of every user (or every update), and optionally a state snapshot.
    """
    if not out and not output_topic:
        raise click.UsageError("give --out FILE and/or --output-topic TOPIC")
    settings = settings_from(params, validate=False)
    check_broker_for(settings.kafka, sources, connect_timeout, writes_topic=bool(output_topic))
    from consumers.outfiles import OutputError, default_dead_letters
    from consumers.replay import replay as run_replay
    from models.profile_model import ModelError
    from stream.kafka import StreamError
    from stream.sources import SourceError

    dlq = dead_letters_path or default_dead_letters(out, "replay.dlq.jsonl")
    try:
        report = run_replay(settings, list(sources), fmt, out, output_topic, every_update, state_out, dlq,
                            batch_events, show_progress=sys.stderr.isatty(), decode_workers=decode_workers)
    except (SourceError, ModelError, StreamError, OutputError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(report.summary(dlq), err=True)
    if report.records == 0:  # an empty file, or a kafka:// range of none: said, not an error (a quiet day's log)
        click.echo(f"warning: {', '.join(sources)} held no records: nothing was replayed", err=True)
    if state_out:
        click.echo(f"state snapshot of {report.users:,} users written to {state_out}", err=True)


@command(short_help="One user's events beside how each field moved")
@click.argument("user")
@click.option("--events", "sources", required=True, multiple=True,
              help="Event source(s), as for `profiles replay`: files, directories, globs, kafka://TOPIC?from=&to=.")
@click.option("--format", "fmt", default="jsonl", show_default=True, type=click.Choice(FORMATS))
@model_option()
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Also draw the fields to this PNG.")
@click.option("--idle-rescore-after", "idle_rescore_after_ms", default="24h", show_default=True, callback=to_ms,
              help="Also show the profiles the daemon re-publishes while the user is idle, this long apart in "
              "event time (as in `profiles run`; 0: none).")
@max_ahead_option
@kafka_options("kafka:// sources")
@device_option
def inspect(user: str, sources: tuple[str, ...], fmt: str, plot_path: str | None, connect_timeout: float,
            **params: Any) -> None:
    """One user's event timeline beside how each profile field moved (a table; --plot for a picture).

    Besides the profile after each event: the idle re-scores between events and after the last one
    (churn risk rises while a user is quiet), and the final profile a replay of the same sources writes,
    computed at the log's last event time."""
    # max_ahead_ms stays among params: a Settings field, which bounds both the reading and the updater's replay.
    settings = settings_from(params, validate=False, emit_embedding=False)
    check_broker_for(settings.kafka, sources, connect_timeout)
    from consumers.inspect import InspectError, run_inspect
    from models.profile_model import ModelError
    from stream.sources import SourceError

    try:
        run_inspect(settings, list(sources), fmt, user, plot_path)
    except (InspectError, SourceError, ModelError) as exc:
        raise click.ClickException(str(exc)) from None


SPAN_OFF = 0.85  # a log whose events span less than this share of --span-days, or more than its inverse: said so


@command(short_help="Synthetic traffic, to a file or a topic")
@click.option("--users", default=1000, show_default=True, type=click.IntRange(1, 100_000_000), help="Distinct users.")
@click.option("--events", default=20000, show_default=True, type=click.IntRange(min=1), help="Events to write.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same traffic.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write JSON lines here (.gz compresses; '-': "
              "standard output), through a temporary file renamed when complete.")
@click.option("--topic", help="Produce to this Kafka topic instead (key = user id).")
@kafka_options("--topic")
@click.option("--partitions", default=4, show_default=True, type=click.IntRange(min=1),
              help="Partitions of --topic if it has to be created.")
@click.option("--invalid-fraction", default=0.0, show_default=True, type=FiniteRange(0, 1),
              help="Share of records replaced by malformed ones of every kind (to exercise the dead-letter path).")
@click.option("--span-days", default=30.0, show_default=True, type=FiniteRange(0.01, 1000),
              help="Event-time span the session rates are set for (it starts 2023-11-14; at most 1000 days, so "
                   "that it ends before today: the daemon and every command refuse events stamped after the "
                   "machine's clock). A structured shop's rates are set by simulating its users over the span, two "
                   "thirds of whom arrive along it (29-31 of 30 days for shops 0-11 with the defaults). The "
                   "command says the days written.")
@click.option("--shop-seed", default=None, type=int,
              help="A structured shop with parameters drawn from this seed (segments of users, what follows a "
                   "purchase, carts that bring users back, churn that slows users down first, visits that pause "
                   "for minutes and check out after the break); default: the classic shop. Train in one shop, "
                   "judge in another.")
@click.option("--replenish-share", default=0.0, show_default=True, type=FiniteRange(0, 1),
              help="Share of users who rebuy a staple of their favourite category on a cycle of their own (7 to 35 "
                   "days): a purchase rhythm that no count or recency shows. In any shop; 0 leaves its logs as they "
                   "were.")
def generate(users: int, events: int, seed: int, out: str | None, topic: str | None, partitions: int,
             invalid_fraction: float, span_days: float, shop_seed: int | None, replenish_share: float,
             connect_timeout: float, **params: Any) -> None:
    """Synthetic traffic with sessions, funnels, favourite categories, price levels and users who go quiet."""
    import dataclasses

    from stream.generator import ShopParams

    shop = ShopParams.of_seed(shop_seed)
    if replenish_share:
        shop = dataclasses.replace(shop or ShopParams(), replenish_share=replenish_share)
    if bool(out) == bool(topic):
        raise click.UsageError("give exactly one of --out FILE or --topic TOPIC")
    from consumers.loadgen import EventSpan, generate_to_file, generate_to_topic

    span = EventSpan()
    if out:
        n = generate_to_file(out, users, events, seed, invalid_fraction, span_days, shop, span)
        click.echo(f"wrote {n:,} records to {'standard output' if out == '-' else out}, {span.days:.1f} days of "
                   "event time", err=True)
    else:
        kafka = kafka_from(params)
        check_broker(kafka, connect_timeout)
        n = generate_to_topic(kafka, topic, partitions, users, events, seed, invalid_fraction, span_days, shop, span)
        click.echo(f"produced {n} records to {topic}, {span.days:.1f} days of event time", err=True)
    if not SPAN_OFF * span_days <= span.days <= span_days / SPAN_OFF:
        future = span.last_ts is not None and span.last_ts > time.time() * 1000
        click.echo(span_note(span.days, span_days, shop is not None and shop.structured, future), err=True)


def span_note(days: float, asked: float, structured: bool, future: bool = False) -> str:
    """What `profiles generate` says of a log whose events span other than the --span-days asked (`future`: its
    last events are stamped after this machine's clock)."""
    if days > asked:  # the rates' floor: fewer events than the users' first visits hold
        return (f"note: the log runs {days:.1f} days, past the {asked:g} asked: there are too few events for these "
                "users to come back within it, so the last visits come later. More --events or fewer --users keep "
                "it within the span."
                + (" Its last events are stamped after this machine's clock: the daemon and the other commands "
                   "dead-letter them (ahead_of_clock) unless given --max-ahead 0." if future else ""))
    # A structured shop's rates are simulated to fill the span (stream/generator.py): its logs end within a day or
    # two of it (200 users, 4000 events: 29-33 days of 30 for shops 0-11, session 72). Not where a user's events
    # are fewer than a first visit holds (100,000 users, 200,000 events: the third there from the start use them
    # up in 1.4 days), nor with a handful of users, where each one's draws decide (1 user of shop 3: 8.1 days).
    # The classic shop's session model is exact (stream/generator.py): it ends early only where there are fewer
    # events than the users' first visits hold (1,000 users, 200 events: 0.1 days), with or without replenishers.
    return (f"note: the events ran out after {days:.1f} of the {asked:g} days asked"
            + (": in this shop a visit holds many events, and with few events per user (a third of the users come "
               "in the span's first days) or few users, the first visits and where users go quiet decide where "
               "the log ends, not the session rates. The log is valid, only shorter" if structured else
               ": there are too few events per user for more than their first visits. More --events or fewer "
               "--users fill the span")
            + ". Evaluations cut a log where its events are (`profiles evaluate-fields --cuts`).")


@command(short_help="Everything on one machine, with a live view")
@click.option("--duration", default=None, type=FiniteRange(min=1), help="Stop after this many seconds "
              "(default: run until Ctrl-C).")
@click.option("--users", default=500, show_default=True, type=click.IntRange(min=1), help="Synthetic users.")
@click.option("--rate", default=3000, show_default=True, type=click.IntRange(min=1), help="Events per second.")
@click.option("--seed", default=0, show_default=True, type=int)
def demo(duration: float | None, users: int, rate: int, seed: int) -> None:
    """Everything on this machine: an embedded broker, synthetic traffic, the daemon and a live view."""
    from consumers.demo import run_demo

    stop = threading.Event()
    received = install_stop_handlers(stop, grace_s=30.0)
    run_demo(stop, duration=duration, users=users, rate=rate, seed=seed)
    exit_130_if_interrupted(received)


@command("import", short_help="Public datasets into the event contract")
@click.option("--format", "fmt", required=True, type=click.Choice(FORMATS[1:]), help="Layout of the source files.")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON lines to write (.gz compresses; "
              "'-': standard output), through a temporary file renamed when complete.")
def import_(fmt: str, sources: tuple[str, ...], out: str) -> None:
    """Convert public e-commerce datasets into the event contract. SOURCES: files, or directories (every file
    under them, in name order), as `profiles replay --format` reads them.

    Taobao pv/fav -> click, cart -> add_to_cart, buy -> purchase; YOOCHOOSE sessions become users;
    REES46 keeps prices and category codes. Rows that cannot be converted are counted by reason.
    """
    from rich.console import Console
    from rich.progress import Progress

    from consumers.outfiles import Interrupted, OutputFile
    from stream.importers import import_dataset
    from stream.sources import expand_paths

    try:  # a directory's files; refuses an --out that is one of the sources
        paths = expand_paths(list(sources), {"--out": out})
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    sink = OutputFile(out, compresslevel=6)  # level 6: a third of level 9's time, a few percent larger
    try:
        with Progress(transient=True, console=Console(stderr=True), disable=not sys.stderr.isatty()) as bar:
            task = bar.add_task(f"importing {fmt}", total=None)
            report = import_dataset(fmt, paths, sink, progress=lambda n: bar.update(task, completed=n))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: partial output kept in {sink.keep_partial()}") from None
    except ValueError as exc:
        sink.discard()
        raise click.ClickException(str(exc)) from None
    except BaseException:
        sink.discard()
        raise
    sink.commit()
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items())) or "none"
    click.echo(f"{report.events} events from {report.rows} rows written to "
               f"{'standard output' if out == '-' else out} (skipped: {skipped})", err=True)
    if report.rows == 0:
        click.echo(f"warning: {', '.join(sources)} held no rows: the output holds no events", err=True)


def file_not_topic(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """split's SOURCE: an existing file. A kafka:// topic needs no copy: its ranges are the two parts."""
    if value.startswith("kafka://"):
        raise click.BadParameter(
            "split copies a file; a topic is cut by its ranges instead: give the commands "
            "'kafka://TOPIC?to=CUT' (training) and 'kafka://TOPIC?from=CUT' (test), or `profiles train --until CUT` "
            "and `profiles evaluate-fields --cut CUT` on the whole topic (docs/operations.md)", ctx, param)
    return click.Path(exists=True, dir_okay=False).convert(value, param, ctx)


@command(short_help="Cut an event log by event time, for evaluation")
@click.argument("source", callback=file_not_topic)
@click.option("--test-fraction", default=0.2, show_default=True, type=FiniteRange(0.01, 0.99),
              help="Share of the events, the latest by event time, that becomes the test part.")
@click.option("--train-out", required=True, type=click.Path(dir_okay=False), help="'-': standard output.")
@click.option("--test-out", required=True, type=click.Path(dir_okay=False), help="'-': standard output.")
@max_ahead_option
def split(source: str, test_fraction: float, train_out: str, test_out: str, max_ahead_ms: int) -> None:
    """Split a JSON-lines event log by event time: the latest --test-fraction of the events is the test part.

    Lines are copied byte for byte; lines that break the event contract stay in the training part.
    Both files are written to temporary files and renamed when complete.
    """
    if os.path.abspath(train_out) == os.path.abspath(test_out):
        raise click.UsageError("--train-out and --test-out cannot both be '-' (standard output)" if train_out == "-"
                               else f"--train-out and --test-out are the same file, {train_out}")
    from consumers.outfiles import atomic_paths
    from models.dataset import split_lines_by_time
    from stream.sources import SourceError, expand_paths

    try:
        expand_paths([source], {"--train-out": train_out, "--test-out": test_out})  # an output that is the source
        with atomic_paths(train_out, test_out, flag="--train-out/--test-out") as (train_tmp, test_tmp):
            n_train, n_test, cutoff = split_lines_by_time(source, test_fraction, train_tmp, test_tmp,
                                                          max_ahead_ms=max_ahead_ms)
    except SourceError as exc:  # also a log without one event: no time to cut at (nothing written)
        raise click.ClickException(str(exc)) from None
    named = {path: "standard output" if path == "-" else path for path in (train_out, test_out)}
    click.echo(f"{n_train:,} events up to {cutoff} -> {named[train_out]}; {n_test:,} later events -> "
               f"{named[test_out]}", err=True)
