"""Commands against a running deployment's topics: the daemon itself (`run`), erasure (`forget`) and
reading profiles back (`tail`, `get`)."""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

import click

from consumers.commands.base import (
    check_broker, command, exit_130_if_interrupted, install_stop_handlers, kafka_error, log, stdout_closed,
    write_lines,
)
from consumers.commands.options import (
    device_option, expiry_options, group_id_option, input_topics_option, kafka_from, kafka_options, max_ahead_option,
    max_categories_option, model_option, profile_options, pseudonymize_option, repartition_option, setting,
    settings_from,
    state_dtype_option, state_topic_option, thread_options, to_ms, to_snapshot_start, topic_option,
)
from stream.settings import Settings

if TYPE_CHECKING:
    from consumers.daemon import DaemonStats


@command(short_help="The daemon: Kafka events in, profiles out")
@kafka_options()
@input_topics_option
@setting("--output-topic", default="profiles", show_default=True,
         help="Topic the profiles are published to (keyed by user id).")
@setting("--dlq-topic", default="",
         help="Dead-letter topic for records that break the event contract. [default: <output-topic>.dlq]")
@group_id_option
@model_option("Model checkpoint (from `profiles train`), or `demo`: the model shipped with the package, trained "
              "on the generator's shop (for trying the service). Required unless --untrained.")
@setting("--untrained", is_flag=True, help="Serve a freshly initialised model without --model: counters and spend "
         "are exact, the learned fields are not meaningful.")
@device_option
@thread_options
@setting("--batch-max-events", default=5000, show_default=True, type=click.IntRange(min=1),
         help="A micro-batch closes at this many records...")
@setting("--batch-max-ms", default=200, show_default=True, type=click.IntRange(min=1),
         help="...or after this many milliseconds, whichever comes first.")
@setting("--max-event-bytes", default=65536, show_default=True, type=click.IntRange(min=64),
         help="Larger records go to the dead-letter topic.")
@profile_options
@setting("--metrics-port", default=None, type=click.IntRange(min=1, max=65535),
         help="Serve Prometheus /metrics, and /healthz and /readyz for probes, on this port.")
@setting("--metrics-address", default="0.0.0.0", show_default=True, help="Address the metrics endpoint listens on.")
@setting("--restore-from", default=None, type=click.Path(exists=True, file_okay=False),
         help="Start from a state snapshot (`profiles replay --state-out`) and continue each input partition "
         "where the replay stopped, if this group has not committed there yet. Every instance may be given the "
         "same snapshot: each takes only its assigned partitions' users.")
@setting("--snapshot-start", default="", callback=to_snapshot_start, metavar="earliest|latest|ISO",
         help="With --restore-from a snapshot replayed from files (it records no Kafka offsets), where this group "
         "starts on the input topics it has not committed on yet: earliest (the topic holds only events after the "
         "files), latest (events produced from now on), or an ISO time (the first record written at or after "
         "it). Required in that case: the earliest offsets would apply again the files' events the topic holds.")
@expiry_options
@state_dtype_option
@setting("--publish-interval", "publish_interval_ms", default="0", show_default=True, callback=to_ms,
         metavar="DURATION", help="Publish each user at most once per this long (e.g. 1s, 30s; 0: after every batch "
         "that changes it): its latest profile wins, fewer profiles are encoded and published for busy users. "
         "Deferred users are kept in the state changelog and published at shutdown and before a rebalance, so "
         "none is left out. Turning it on or off changes the changelog's record layout: use a new --group-id.")
@setting("--idle-rescore-after", "idle_rescore_after_ms", default="24h", show_default=True, callback=to_ms,
         help="Re-publish users idle this long in event time (e.g. 30m, 24h, 7d; 0 disables), so churn risk "
         "keeps rising for users who went quiet.")
@setting("--session-timeout-ms", default=10000, show_default=True, type=click.IntRange(min=1000),
         help="Consumer group session timeout.")
@setting("--max-poll-interval-ms", default=300_000, show_default=True, type=click.IntRange(min=1000),
         help="The group evicts a member that takes longer than this between polls. Batches shrink "
         "automatically to stay within a quarter of it; restoring an assigned partition's users must fit in it too.")
@max_ahead_option
@max_categories_option
@setting("--dedupe-window", default=8, show_default=True, type=click.IntRange(min=0),
         help="An event whose event_id is among its user's last N events is a duplicate (an upstream re-send) "
         "and is applied once; 0 turns this off.")
@state_topic_option
@repartition_option
@pseudonymize_option
@setting("--guarantee", default="at-least-once", show_default=True,
         type=click.Choice(["at-least-once", "exactly-once"]),
         help="State is exactly-once either way (changelog watermarks). at-least-once: offsets are committed "
         "after the output is acknowledged; a crash re-publishes some identical profiles. exactly-once: each "
         "batch's profiles, changelog records, dead letters and offsets form one Kafka transaction, for "
         "read_committed readers (costs a transaction commit per batch).")
@setting("--transactional-id", default="",
         help="exactly-once: the producer's transactional.id. [default: <group-id>-<random>, new each start]")
def run(untrained: bool, connect_timeout: float, **params: Any) -> None:
    """The always-on daemon: consume events, update profiles, publish them.

    Stops on SIGTERM or SIGINT after finishing, publishing and committing the batch in hand.
    """
    if not params["model_path"] and not untrained:
        events = topic_sources(params.get("input_topics") or ("events",))
        raise click.UsageError(
            f"no --model given. Train one on your events (`profiles train --events {events} --out model.pt`, "
            "minutes), or calibrate the shipped one for your shop (`profiles calibrate --model demo --events "
            f"{events} --out shop.pt`, seconds), then --model FILE; or try the shipped one as it is (--model demo, "
            "trained on generated traffic), or serve an untrained model whose learned fields mean nothing "
            "(--untrained).")
    settings = settings_from(params)
    log.debug("settings: %s", settings.describe())  # before the broker check, secrets masked
    check_broker(settings.kafka, connect_timeout)
    stop = threading.Event()
    received = install_stop_handlers(stop, settings.shutdown_timeout_s)
    stats = run_daemon(settings, stop)
    if received:
        click.echo(f"stopped: {stats.events:,} events applied, {stats.profiles:,} profiles published, "
                   f"{stats.dead_letters:,} dead letters, offsets committed", err=True)
    exit_130_if_interrupted(received)


def topic_sources(topics: tuple[str, ...]) -> str:
    """The daemon's input topics as the --events sources of `profiles train` or `calibrate`."""
    return " --events ".join(f"kafka://{t}" for t in topics)


def run_daemon(settings: Settings, stop: threading.Event) -> DaemonStats:
    """Build the daemon from settings and run it until `stop`; user-facing errors become ClickExceptions.
    Returns the daemon's totals."""
    from confluent_kafka import KafkaException

    from consumers.daemon import ProfileDaemon
    from models.checkpoint_io import DEMO_MODEL
    from models.update_step import load_updater
    from models.profile_model import ModelError
    from stream.kafka import PublishError, StreamError
    from stream.metrics import Health, Metrics, serve

    log.info("settings: %s", settings.describe())
    try:
        updater = load_updater(settings)
        if settings.model_path == DEMO_MODEL:  # the first hour: say how the shipped model is made this shop's
            log.info("serving the shipped model, trained on a generated shop: its probabilities carry that shop's "
                     "rates. Calibrate it on this shop's events in seconds and restart with --model shop.pt (same "
                     "--group-id): profiles calibrate --model demo --events %s --out shop.pt (docs/operations.md)",
                     topic_sources(settings.input_topics))
        metrics, health = Metrics(), Health(settings.stall_after_s)
        if settings.metrics_port:
            try:
                serve(metrics, health, settings.metrics_port, settings.metrics_address)
            except OSError as exc:
                raise click.ClickException(f"cannot serve metrics on --metrics-address {settings.metrics_address} "
                                           f"--metrics-port {settings.metrics_port}: {exc.strerror}") from None
        daemon = ProfileDaemon(settings, updater, metrics, stop, health)
        daemon.run()
        return daemon.stats
    except PublishError as exc:  # the output of the batch in flight: its input offsets were not committed
        raise click.ClickException(
            f"{exc}: the brokers at {settings.kafka.bootstrap_servers} did not take this batch's output "
            "(unreachable, or refusing it); its input offsets were not committed, so a restart re-reads it "
            "and loses nothing") from None
    except (ModelError, StreamError, KafkaException) as exc:
        raise kafka_error(settings.kafka, exc) from None


@command(short_help="Erase users: state, changelog and profiles")
@click.argument("users", nargs=-1, required=True)
@kafka_options()
@input_topics_option
@group_id_option
@state_topic_option
@repartition_option
@pseudonymize_option
@click.option("--wait", "wait", default="0", show_default=True, callback=to_ms,
              help="Wait up to this long (e.g. 60s) until the daemon has erased each user found in state "
              "(its changelog tombstone is written); exit 1 if one is not confirmed in time. 0: do not wait.")
def forget(users: tuple[str, ...], wait: int, connect_timeout: float, **params: Any) -> None:
    """Erase USERS (right to erasure): their state, their changelog records and their profiles.

    Writes a forget record into the input partition that holds each user's state (found in the state
    changelog), so the daemon owning that partition erases the user in order with their events, with
    tombstones on the changelog and output topics. A user not found in state is asked for on every
    partition. Events of the user that arrive after the forget start a new profile. Use the same
    --group-id / --state-topic, --repartition and --pseudonymize-key as the daemon (with --repartition,
    one record keyed by the user, which the daemon forwards to the partition holding the user).
    """
    from confluent_kafka import KafkaException

    from consumers.forget import forget_users
    from stream.events import user_id_problem
    from stream.kafka import StreamError

    for user in users:  # the daemon would dead-letter the forget record: say so before asking any broker
        problem = user_id_problem(user)
        if problem:
            raise click.BadParameter(f"{user[:60]!r} {problem}: no event of it is held, nothing to erase",
                                     param_hint="USERS")
    settings = settings_from(params)
    check_broker(settings.kafka, connect_timeout)
    try:
        requests = forget_users(settings, list(users), wait / 1000.0)
    except (StreamError, KafkaException) as exc:
        raise kafka_error(settings.kafka, exc) from None
    topic, unconfirmed = settings.input_topics[0], 0
    for r in requests:
        where = (f"{topic}[{r.partitions[0]}], re-keyed to the user's partition by the daemon" if settings.repartition
                 else f"{topic}[{r.partitions[0]}], the partition holding its state" if r.in_state else
                 f"all {len(r.partitions)} partitions of {topic} (not found in {settings.changelog_topic})")
        status = ""
        if wait and r.in_state:
            status = "; erased" if r.erased else f"; NOT confirmed within {wait / 1000:g}s"
            unconfirmed += not r.erased
        click.echo(f"{r.user_id}: forget record written to {where}{status}")
    if unconfirmed:
        sys.exit(1)


@command(short_help="Follow the profiles topic as JSON lines")
@topic_option
@click.option("--from-beginning", is_flag=True, help="Start at the first retained profile instead of the end.")
@click.option("--max", "max_records", default=None, type=click.IntRange(min=1),
              help="Stop after this many records (default: follow until Ctrl-C).")
@kafka_options()
def tail(topic: str, from_beginning: bool, max_records: int | None, connect_timeout: float, **params: Any) -> None:
    """Follow the profiles topic: each profile as one JSON line on stdout (an erased user's tombstone as
    {"user_id": ..., "erased": true}). Starts at the end (new profiles only) unless --from-beginning.
    Reads assigned partitions without a consumer group's commits: no side effects. Ctrl-C ends it
    (exit 130) with a one-line count on stderr."""
    from confluent_kafka import KafkaException

    from consumers.readback import tail as follow
    from stream.kafka import StreamError

    kafka = kafka_from(params)
    check_broker(kafka, connect_timeout)
    printed = [0]

    def write(lines: list[bytes]) -> None:
        write_lines(lines)
        printed[0] += len(lines)

    log.debug("following %s from %s", topic, "the beginning" if from_beginning else "the end")
    try:
        follow(kafka, topic, from_beginning, max_records, write)
    except KeyboardInterrupt:
        click.echo(f"tail: {printed[0]:,} record(s) printed from {topic}", err=True)
        sys.exit(130)
    except BrokenPipeError:
        stdout_closed()
    except (StreamError, KafkaException) as exc:
        raise kafka_error(kafka, exc) from None


@command(short_help="Each user's latest published profile, as JSON")
@click.argument("users", nargs=-1, required=True)
@topic_option
@kafka_options()
@pseudonymize_option
def get(users: tuple[str, ...], topic: str, pseudonymize_key: str, connect_timeout: float, **params: Any) -> None:
    """Print each USER's latest published profile as one JSON line ({"user_id": ..., "erased": true}
    for an erased user); exit 1 naming the users with no profile.

    Reads only the partition that holds each user's key (the daemon's partitioner: librdkafka's
    consistent_random unless --kafka-config partitioner=... says otherwise), backwards from its end,
    until the user's latest record is found. With --pseudonymize-key (the daemon's), give raw ids."""
    from confluent_kafka import KafkaException

    from consumers.readback import as_line, get_latest
    from stream.kafka import StreamError
    from stream.pseudonyms import Pseudonymizer

    kafka = kafka_from(params)
    check_broker(kafka, connect_timeout)
    pseudonym = Pseudonymizer(pseudonymize_key).one if pseudonymize_key else None
    keys = {u: pseudonym(u).encode() for u in users} if pseudonym else None
    try:
        result = get_latest(kafka, topic, users, keys)
    except (StreamError, KafkaException) as exc:
        raise kafka_error(kafka, exc) from None
    try:
        write_lines([as_line(u.encode(), result.found[u]) for u in dict.fromkeys(users) if u in result.found])
    except BrokenPipeError:
        stdout_closed()
    log.debug("read %d record(s) of %s", result.records_read, topic)
    if result.missing:
        raise click.ClickException(f"no profile in {topic} for {len(result.missing)} user(s): "
                                   f"{', '.join(result.missing)}")
