"""Commands that build and judge models, and measure the pipeline: `train`, `calibrate`, `evaluate`,
`evaluate-fields`, `evaluate-synthetic`, `model info` and `bench`."""

from __future__ import annotations

import click

from typing import Any

from consumers.commands.base import check_broker, check_broker_for, command, group, kafka_error
from consumers.commands.options import (
    FiniteRange, ModelPath,
    device_option, kafka_from, kafka_options, max_ahead_option, thread_options, to_instant_ms, to_ms, to_seconds,
    to_ttl_ms,
)
from stream.settings import STATE_DTYPES, KafkaSettings, Settings

# The offline readers take the replay's sources: a team whose events are in Kafka trains, calibrates and judges
# on the topic the daemon reads, without exporting it first.
EVENT_SOURCES = ("files, directories, globs, or kafka://TOPIC?from=ISO&to=ISO (event time in [from, to); needs the "
                 "brokers)")


def kafka_sources(sources: tuple[str, ...], params: dict[str, Any]) -> KafkaSettings:
    """The KafkaSettings of the command's kafka_options(), with the broker checked where a source is a topic."""
    kafka = kafka_from(params)
    check_broker_for(kafka, sources, params["connect_timeout"])
    return kafka


@command(short_help="Train the profile model on event logs")
@click.option("--events", "event_files", required=True, multiple=True,
              help="The JSON-lines event log, e.g. from `profiles import` or `profiles generate` (several: repeat "
                   "--events or list them after it): " + EVENT_SOURCES + ".")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write.")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help="Passes over the log [default: 10 up to 125k events, fewer above (2 at 500k), so that "
                   "training stays within minutes on a laptop].")
@click.option("--hidden-size", default=64, show_default=True, type=click.IntRange(min=4))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1), help="Sequence chunks per step.")
@click.option("--max-len", default=64, show_default=True, type=click.IntRange(min=2), help="Events per chunk.")
@click.option("--lr", default=6e-3, show_default=True, type=FiniteRange(min=0, min_open=True))
@click.option("--dropout", default=0.2, show_default=True, type=FiniteRange(0, 0.9))
@click.option("--unknown-items", default=0.15, show_default=True, type=FiniteRange(0, 0.9),
              help="Share of training events whose item the model reads as unknown, so that it learns what an "
                   "event says without its item: served on items it never saw (new products, another shop, ids "
                   "that name other products there) it reads them as unknown (docs/model.md).")
@click.option("--val-fraction", default=0.1, show_default=True, type=FiniteRange(0.01, 0.5),
              help="The last part of the time span that validates (early stopping).")
@click.option("--patience", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--average-epochs", default=0.0, show_default=True, type=FiniteRange(min=0),
              help="Keep a moving average of the weights over about this many epochs of steps, and validate "
                   "and save it instead of the last step's weights (0: off). Helps where the validation loss "
                   "is noisy from epoch to epoch, e.g. 4 on YOOCHOOSE with --epochs 40 (docs/model.md). Keep it "
                   "several times below the epochs trained: the average starts from the untrained weights.")
@click.option("--refit/--no-refit", default=True, show_default=True,
              help="After early stopping picks the epoch count, train again on all events, validation period included.")
@click.option("--max-items", default=200_000, show_default=True, type=click.IntRange(min=1),
              help="Next-item vocabulary: the most frequent training items.")
@click.option("--item-buckets", default=1 << 17, show_default=True, type=click.IntRange(min=16),
              help="Hash buckets of item ids (smaller: a smaller checkpoint, more collisions).")
@click.option("--category-buckets", default=1 << 14, show_default=True, type=click.IntRange(min=16),
              help="Hash buckets of categories.")
@click.option("--query-buckets", default=1 << 15, show_default=True, type=click.IntRange(min=16),
              help="Hash buckets of query words and trigrams.")
@click.option("--until", default=None, callback=to_instant_ms,
              help="Train on the events at or before this ISO time (or epoch ms) only: the cut of a later "
                   "`profiles evaluate-fields --cut`, so the model never sees what it is judged on.")
@click.option("--seed", default=0, show_default=True, type=int)
@max_ahead_option
@device_option
@kafka_options("kafka:// sources")
def train(event_files: tuple[str, ...], out: str, epochs: int | None, hidden_size: int, batch_size: int, max_len: int,
          lr: float, dropout: float, unknown_items: float, val_fraction: float, patience: int, average_epochs: float,
          refit: bool, max_items: int, item_buckets: int, category_buckets: int, query_buckets: int,
          until: int | None, seed: int, max_ahead_ms: int, device: str, **params: Any) -> None:
    """Train the profile model on event logs, in two stages: the sequence model (next item, next
    category, auxiliary purchase and churn objectives), then the published fields (purchase_propensity,
    churn_risk, top_categories) fitted on profiles taken through the serving path at cuts in the log
    and judged on what followed, calibrated on the latest cuts."""
    kafka = kafka_sources(event_files, params)
    from consumers.training import run_training

    run_training(event_files, out, device, seed=seed, hidden_size=hidden_size, dropout=dropout,
                 unknown_items=unknown_items, until=until, kafka=kafka, max_ahead_ms=max_ahead_ms,
                 buckets=(item_buckets, category_buckets, query_buckets),
                 epochs=epochs, batch_size=batch_size, max_len=max_len, lr=lr, val_fraction=val_fraction,
                 patience=patience, average_epochs=average_epochs, refit=refit, max_items=max_items)


@command(short_help="Calibrate a trained model for another shop")
@click.option("--model", "model_path", required=True, type=ModelPath(),
              help="Trained checkpoint, or `demo` (the shipped model).")
@click.option("--events", "event_files", required=True, multiple=True,
              help="The shop's JSON-lines event log, e.g. from `profiles import` (several: repeat --events or list "
                   "them after it): " + EVENT_SOURCES + ", such as the topic the daemon reads.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write.")
@click.option("--until", default=None, callback=to_instant_ms,
              help="Calibrate on the events at or before this ISO time (or epoch ms) only: the cut of a later "
                   "`profiles evaluate-fields --cut`, so the calibration never sees what it is judged on.")
@click.option("--seed", default=0, show_default=True, type=int)
@max_ahead_option
@device_option
@kafka_options("kafka:// sources")
def calibrate(model_path: str, event_files: tuple[str, ...], out: str, until: int | None, seed: int,
              max_ahead_ms: int, device: str, **params: Any) -> None:
    """Calibrate purchase_propensity and churn_risk of a trained model again on another shop's events, and
    weigh for it what the counting rules read: a model trained in one shop ranks another shop's users well,
    but its probabilities carry the rates of the shop it was trained in, and how much a long silence, carts
    not bought, this week's purchases, or a user's most recent categories against their most frequent say
    about what comes next differs from shop to shop. Takes seconds, where training takes minutes.

    Profiles are taken through the serving path at cuts in the log and judged on what each user did
    next. A probability's new calibration map is kept only if, fitted on the earlier cuts, it predicts
    the latest cut that saw its whole horizon (7 days for purchase_propensity, 14 for churn_risk) better
    than the model's own calibration; it is then fitted on all the cuts, the later ones weighing more.
    Before the maps: churn_risk's fall after a long silence and its weight on idle time, and
    purchase_propensity's weights on carts pending and on the last 7 days' purchases, are moved by the steps
    that rank the earlier cuts' users best (ROC AUC). After them, top_categories' weights on how recently the
    user came to each category (freshness) and on the all-time count, and the repeat gate, are moved by the
    steps that name the earlier cuts' next 7 days best (precision@3). Each move is kept only if it also does
    better on the latest cut that saw its whole horizon.
    Where nothing changes, the model is written unchanged; a log too short to test any of them is an error
    (exit 1).

    The new checkpoint keeps the state of the model it was calibrated from: a daemon switched to it
    (same --group-id) restores the same changelog, and its profiles carry the new model_version."""
    kafka = kafka_sources(event_files, params)
    from consumers.training import run_calibration

    run_calibration(model_path, event_files, out, device, until=until, seed=seed,
                    kafka=kafka, max_ahead_ms=max_ahead_ms)


@command("evaluate", short_help="The model's next item and category against simple rules")
@click.option("--model", "model_path", required=True, type=ModelPath(),
              help="Checkpoint to judge, or `demo` (the shipped model).")
@click.option("--train-events", "train_files", required=True, multiple=True,
              help="Events the baselines are fitted on; test users' state is carried over from them: "
                   + EVENT_SOURCES + ".")
@click.option("--events", "test_files", required=True, multiple=True,
              help="Test events: every next event of every test user is predicted from its prefix (the same "
                   "kinds of source).")
@click.option("--k", default=20, show_default=True, type=click.IntRange(min=1), help="Cut-off of Recall@k and MRR@k.")
@max_ahead_option
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@kafka_options("kafka:// sources")
def evaluate(model_path: str, train_files: tuple[str, ...], test_files: tuple[str, ...], k: int, max_ahead_ms: int,
             device: str, as_json: bool, **params: Any) -> None:
    """Next-item Recall@k and MRR@k (full ranking), next-category accuracy@5 and purchase-propensity
    ROC AUC of the model, and of popularity, sequential-rules and session-kNN baselines fitted in the same run."""
    kafka = kafka_sources(train_files + test_files, params)
    from consumers.next_event_report import run_evaluation

    run_evaluation(model_path, train_files, test_files, device, k, as_json, kafka, max_ahead_ms=max_ahead_ms)


@command("evaluate-fields", short_help="Learned fields against what users do after a cut")
@click.option("--model", "model_path", required=True, type=ModelPath(),
              help="Checkpoint to judge (train it on events before the cut only), or `demo`.")
@click.option("--events", "event_files", required=True, multiple=True,
              help="The JSON-lines event log spanning the cut (several: repeat --events or list them after it): "
                   + EVENT_SOURCES + ".")
@click.option("--cut", "cuts", multiple=True, callback=to_instant_ms,
              help="ISO time T (or epoch ms): profiles at T are judged on what follows. Repeatable: each cut is "
                   "judged, then what they say together. Default: 80% of the log's span.")
@click.option("--cuts", "spread", default=None, type=click.IntRange(2, 50),
              help="Judge at N cuts spread evenly from 50% to 90% of the log's span instead (a short log's one "
                   "cut can mislead: the gap to a rule moves from one cut to the next). Each cut replays the "
                   "log up to it, as one --cut does.")
@max_ahead_option
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Draw reliability diagrams of both probabilities to this PNG (needs matplotlib; one cut).")
@click.option("--no-stream-calibration", "stream_calibration", is_flag=True, flag_value=False, default=True,
              help="Judge the probabilities as the model says them, not as a daemon publishes them (calibrated on "
                   "the shop's own outcomes before the cut, where that clearly beats the model's own).")
@kafka_options("kafka:// sources")
def evaluate_fields(model_path: str, event_files: tuple[str, ...], cuts: list[int], spread: int | None,
                    max_ahead_ms: int, device: str, as_json: bool, plot_path: str | None, stream_calibration: bool,
                    **params: Any) -> None:
    """Judge every learned profile field against what each user does after a cut T, beside the
    strongest simple baselines computed from the same events before T.

    \b
    top_categories       precision@3 against the categories engaged with in the
                         next 7 days, and hit rate of the top future category
    purchase_propensity  a purchase within 7 days: ROC AUC, PR AUC, Brier, ECE
    churn_risk           no event within 14 days: ROC AUC, PR AUC, Brier, ECE

    A log that ends before a horizon cuts the window short; the probabilities are then asked for it.
    With several cuts (--cut repeated, or --cuts N): a line per cut with each field's gap to the best rule,
    then per field the mean gap and at how many cuts the model was ahead, within the noise or behind.
    """
    if cuts and spread:
        raise click.UsageError("give --cut (repeatable) or --cuts N, not both")
    if plot_path and (len(cuts) > 1 or spread):
        raise click.UsageError("--plot draws one cut's reliability diagrams: give one --cut")
    kafka = kafka_sources(event_files, params)
    cuts = list(dict.fromkeys(cuts))  # a cut given twice is judged once (and counted once among the cuts)
    from consumers.field_report import run_field_evaluation

    run_field_evaluation(model_path, event_files, cuts, spread, device, as_json, plot_path, kafka, stream_calibration,
                         max_ahead_ms=max_ahead_ms)


@command("evaluate-synthetic", short_help="Learned fields against the generator's truth")
@click.option("--model", "model_path", required=True, type=ModelPath(),
              help="Checkpoint to judge, or `demo` (the shipped model).")
@click.option("--users", default=2000, show_default=True, type=click.IntRange(min=10))
@click.option("--events", default=100_000, show_default=True, type=click.IntRange(min=100))
@click.option("--seed", default=1, show_default=True, type=int, help="Use a seed the model was not trained on.")
@click.option("--shop-seed", default=None, type=int,
              help="Judge in this structured shop (as `profiles generate --shop-seed`; the shipped model was "
                   "trained in shop 0); default: the classic shop.")
@device_option
def evaluate_synthetic(model_path: str, users: int, events: int, seed: int, shop_seed: int | None,
                       device: str) -> None:
    """Check that learned fields mean what their names say, on generated traffic whose truth is known:
    top_categories vs favourite categories (precision@3), purchase_propensity vs habitual buyers (AUC),
    churn_risk vs users who went quiet (AUC), each beside a counting baseline. Prints JSON.

    These truths are static, and counting over the whole log recovers them best: the check says the fields
    point the right way. `profiles evaluate-fields` judges them against what users do next."""
    import orjson

    from models.profile_model import resolve_device
    from models.checkpoint_io import load_checkpoint
    from models.planted_truth import synthetic_truth_report

    dev = resolve_device(device)
    report = synthetic_truth_report(load_checkpoint(model_path, dev), dev, users, events, seed, shop_seed=shop_seed)
    click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


@group(short_help="Read model checkpoints")
def model() -> None:
    """Read model checkpoints."""


@model.command("info")
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
def model_info(checkpoint: str, as_json: bool) -> None:
    """A checkpoint's version, sizes, vocabularies and training metadata (from `profiles train`).
    CHECKPOINT is a file, or `demo` for the model shipped in the package."""
    import orjson

    from consumers.model_info import checkpoint_info, info_lines
    from models.profile_model import ModelError

    try:
        info = checkpoint_info(checkpoint)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode() if as_json else "\n".join(info_lines(info)))


@command(short_help="Throughput and latency against a plain consumer")
@click.option("--events", default=200_000, show_default=True, type=click.IntRange(min=1000),
              help="Generated events to push through.")
@click.option("--users", default=50_000, show_default=True, type=click.IntRange(min=1), help="Distinct users.")
@click.option("--batch-max-events", default=5000, show_default=True, type=click.IntRange(min=1),
              help="Micro-batch size of the pipeline (and of the raw consumer's consume calls).")
@device_option
@thread_options
@kafka_options(embedded_broker=True)
@click.option("--partitions", default=4, show_default=True, type=click.IntRange(min=1),
              help="Partitions of the benchmark topics.")
@click.option("--offered-rate", default=50_000, show_default=True, type=click.IntRange(min=0),
              help="After the throughput runs, offer this many events/s from another process to the live "
              "daemon and report its batch latency (0 skips it).")
@click.option("--offered-seconds", default=10.0, show_default=True, type=FiniteRange(min=1),
              help="How long the offered load lasts.")
@click.option("--no-broker", is_flag=True,
              help="Time the in-process model step alone (no Kafka), plus the scaling table.")
@click.option("--scaling-users", default="10000,100000,1000000", show_default=True,
              help="With --no-broker: users prefilled in state for each row of the scaling table ('' skips it).")
@click.option("--restore-users", default=0, show_default=True, type=click.IntRange(min=0),
              help="Instead: write this many users' state to a fresh changelog topic and time a restore of it.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--guarantee", default="at-least-once", show_default=True,
              type=click.Choice(["at-least-once", "exactly-once"]), help="The pipeline's delivery guarantee.")
@click.option("--traffic", default="sessions", show_default=True, type=click.Choice(["sessions", "scattered"]),
              help="sessions: the generator's users, who act in sessions (few users per batch); scattered: each "
              "event given to a user drawn at random among --users (high-cardinality traffic: with as many "
              "users as events, about one profile per event).")
@click.option("--publish-interval", "publish_interval_ms", default="0", show_default=True, callback=to_ms,
              metavar="DURATION", help="The pipeline's --publish-interval (each user at most once per interval).")
@click.option("--soak", "soak_seconds", default="0", callback=to_seconds, metavar="DURATION",
              help="Instead: run the daemon this long (e.g. 20m) under churning traffic whose event time covers two "
              "years, with --users arriving over it (each active among the newest twentieth), and report its "
              "memory, users held and expired every --soak-report-every.")
@click.option("--soak-rate", default=2000, show_default=True, type=click.IntRange(min=1),
              help="With --soak: events/s offered.")
@click.option("--soak-ttl", "soak_ttl_ms", default="30d", show_default=True, callback=to_ttl_ms, metavar="DURATION",
              help="With --soak: the daemon's --state-ttl.")
@click.option("--soak-report-every", "soak_report_s", default="5m", show_default=True, callback=to_seconds,
              metavar="DURATION", help="With --soak: how often to report.")
@click.option("--state-dtype", default=Settings.state_dtype, show_default=True, type=click.Choice(STATE_DTYPES),
              help="How the model state is stored (the pipeline's --state-dtype); also for --no-broker and "
              "--restore-users.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def bench(events: int, users: int, batch_max_events: int, device: str, torch_threads: int, gru_threads: int,
          partitions: int, offered_rate: int, offered_seconds: float, no_broker: bool, scaling_users: str,
          restore_users: int, seed: int, guarantee: str, traffic: str, publish_interval_ms: int,
          soak_seconds: float, soak_rate: int,
          soak_ttl_ms: int, soak_report_s: float, state_dtype: str, as_json: bool, connect_timeout: float,
          **params: Any) -> None:
    """Measure throughput and latency in one run: the full pipeline (decode, validate, GRU update,
    profile encode, publish, commit) against the raw ceiling of a plain consumer that only consumes
    and decodes the same events; p50/p99 batch latency; state size; batch latency under an offered load.

    With --no-broker: events/s of the model step alone, and how it scales with the users in state.
    With --bootstrap-servers (and --kafka-config/--kafka-config-file for TLS or SASL) it runs against
    that cluster, on fresh bench-* topics; without, against an embedded broker.
    """
    import orjson

    from consumers.bench import bench_brokers, model_step, restore_time, run_bench
    from stream.kafka import StreamError

    kafka = kafka_from(params)  # no --bootstrap-servers: bench_brokers starts the embedded broker
    if kafka.bootstrap_servers and (restore_users or not no_broker):
        check_broker(kafka, connect_timeout)
    say = (lambda _msg: None) if as_json else (lambda msg: click.echo(msg, err=True))
    if soak_seconds:
        run_soak(kafka, soak_seconds, soak_rate, users, soak_ttl_ms, soak_report_s, partitions, device, seed,
                 as_json, say)
        return
    if restore_users:
        try:
            with bench_brokers(kafka) as brokers:
                result = restore_time(users=restore_users, partitions=partitions, kafka=brokers,
                                      state_dtype=state_dtype, say=say)
        except (StreamError, ValueError) as exc:
            raise kafka_error(kafka, exc) from None
        click.echo(orjson.dumps(result).decode() if as_json else
                   f"restored {result['users']:,} users in {result['restore_seconds']:.1f} s "
                   f"({result['users_per_s']:,.0f} users/s; reading {result['read_seconds']:.1f} s, loading "
                   f"{result['load_seconds']:.1f} s; {result['record_bytes']} bytes per user)")
        return
    try:
        if no_broker:
            sizes = tuple(int(x) for x in scaling_users.split(",") if x.strip())
            report = model_step(events=events, users=users, batch_max_events=batch_max_events, device=device,
                                torch_threads=torch_threads, gru_threads=gru_threads, seed=seed,
                                scaling_users=sizes, traffic=traffic, state_dtype=state_dtype, say=say)
        else:
            with bench_brokers(kafka) as brokers:
                report = run_bench(events=events, users=users, batch_max_events=batch_max_events, device=device,
                                   kafka=brokers, partitions=partitions, offered_rate=offered_rate,
                                   offered_seconds=offered_seconds, torch_threads=torch_threads,
                                   gru_threads=gru_threads, seed=seed, guarantee=guarantee, traffic=traffic,
                                   publish_interval_ms=publish_interval_ms, state_dtype=state_dtype, say=say)
    except (StreamError, ValueError) as exc:
        raise kafka_error(kafka, exc) from None
    if as_json:
        click.echo(report.as_json().decode())
    else:
        click.echo(report.table())


def run_soak(kafka, seconds: float, rate: int, users: int, ttl_ms: int, report_s: float, partitions: int,
             device: str, seed: int, as_json: bool, say) -> None:
    import dataclasses

    import orjson

    from consumers.bench import bench_brokers
    from consumers.soak import soak
    from stream.kafka import StreamError

    try:
        with bench_brokers(kafka) as brokers:
            samples = soak(kafka=brokers, seconds=seconds, rate=rate, users=users, state_ttl_ms=ttl_ms,
                           report_every_s=report_s, partitions=partitions, device=device, seed=seed, say=say)
    except (StreamError, ValueError) as exc:
        raise kafka_error(kafka, exc) from None
    if as_json:
        click.echo(orjson.dumps([dataclasses.asdict(s) for s in samples]).decode())
    elif samples:
        first, last = samples[0], samples[-1]
        click.echo(f"soak: RSS {first.rss_mib:.0f} -> {last.rss_mib:.0f} MiB (peak {max(s.rss_mib for s in samples):.0f})"
                   f", users in state at the end {last.users_in_state:,}, expired {last.users_expired:,}, "
                   f"{last.events:,} events over {last.event_day:.0f} event days")
