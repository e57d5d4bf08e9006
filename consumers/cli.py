"""The `profiles` command line.

Every `run` flag has an environment fallback (shown in --help): KAFKA_BOOTSTRAP_SERVERS
for the brokers, PROFILES_<OPTION> for the rest. The flags build one frozen
Settings object, which is passed down explicitly.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import signal
import sys
import threading
from typing import TYPE_CHECKING

import click

from stream.settings import (
    KafkaSettings, Settings, parse_kafka_config, read_kafka_config_file, split_kafka_config_env,
)

if TYPE_CHECKING:
    from consumers.daemon import DaemonStats

log = logging.getLogger("profiles")


def _env(name: str) -> str:
    return f"PROFILES_{name.upper().replace('-', '_')}"


def _setup_logging(level: str) -> None:
    from stream.kafka import configure_librdkafka_log

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    configure_librdkafka_log(debug=level.lower() == "debug")


_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def _duration_ms(text: str) -> int:
    """'500ms', '90s', '30m', '24h', '7d' or a plain number of seconds -> milliseconds."""
    match = _DURATION.match(text.lower())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 30m, 24h or 7d")
    return int(float(match.group(1)) * _UNITS_MS[match.group(2) or "s"])


def install_stop_handlers(stop: threading.Event, grace_s: float) -> list[int]:
    """SIGTERM/SIGINT set `stop`: the loop finishes the batch in hand, publishes, commits and exits
    (0 after SIGTERM, 130 after Ctrl-C: the caller reads the returned list of signals received).
    If that takes longer than `grace_s`, or a second signal arrives, exit at once (code 1): the
    uncommitted batch is simply re-read after restart."""
    received: list[int] = []

    def handle(signum: int, _frame: object) -> None:
        received.append(signum)
        if stop.is_set():
            log.error("second %s: exiting without finishing the batch", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        stop.set()
        timer = threading.Timer(grace_s, _give_up, args=(grace_s,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    # SIGUSR1 prints every thread's stack to stderr: where a stuck daemon is stuck, without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return received


def exit_130_if_interrupted(received: list[int]) -> None:
    """Ctrl-C (SIGINT) ends with the shell's code for it, 130; SIGTERM (an orchestrator's stop) with 0."""
    if signal.SIGINT in received:
        sys.exit(130)


def _give_up(grace_s: float) -> None:
    log.error("shutdown did not finish within %.0fs: exiting without a final commit", grace_s)
    os._exit(1)


_NO_BREAK_HYPHEN = "\u2011"
_INNER_HYPHEN = re.compile(r"(?<=\S)-(?=\S)")


class HelpFormatter(click.HelpFormatter):
    """Help wrapped at spaces only: `--from-beginning`, `<group-id>` or `at-least-once` is never cut
    at a hyphen across two lines (textwrap's default). Inner hyphens are wrapped as non-breaking ones,
    and given back as plain hyphens in the text."""

    def write_text(self, text: str) -> None:
        super().write_text(_INNER_HYPHEN.sub(_NO_BREAK_HYPHEN, text))

    def write_dl(self, rows, col_max: int = 30, col_spacing: int = 2) -> None:  # type: ignore[no-untyped-def]
        super().write_dl([(term, _INNER_HYPHEN.sub(_NO_BREAK_HYPHEN, text)) for term, text in rows],
                         col_max, col_spacing)

    def getvalue(self) -> str:
        return super().getvalue().replace(_NO_BREAK_HYPHEN, "-")


class ProfilesContext(click.Context):
    formatter_class = HelpFormatter


class ProfilesCommand(click.Command):
    context_class = ProfilesContext


class ProfilesGroup(click.Group):
    """The command group: --log-level anywhere on the line; Ctrl-C ends with exit 130 and a one-line
    summary; an unexpected error is one line and exit 1 (the traceback with --log-level debug).
    Commands list a short help that fits 80 columns, and no help text is cut at a hyphen."""

    context_class = ProfilesContext
    command_class = ProfilesCommand
    group_class = type  # `profiles model` is one of these too

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _log_level_first(args))

    def invoke(self, ctx: click.Context) -> object:
        from consumers.outfiles import Interrupted

        try:
            return super().invoke(ctx)
        except Interrupted as exc:
            click.echo(str(exc), err=True)
            ctx.exit(130)
        except KeyboardInterrupt:  # click would print "Aborted!" and exit 1
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            ours = type(exc).__module__.split(".")[0] in ("stream", "consumers", "models")
            message = str(exc) if ours else f"{type(exc).__name__}: {exc} (--log-level debug shows where)"
            raise click.ClickException(message.replace("\n", " ")) from None


def _log_level_first(args: list[str]) -> list[str]:
    """Move --log-level X / --log-level=X from after the subcommand to the front, where click takes it."""
    args = list(args)
    end = args.index("--") if "--" in args else len(args)
    for i, arg in enumerate(args[:end]):
        if arg == "--log-level" and i + 1 < end:
            return [arg, args[i + 1]] + args[:i] + args[i + 2:]
        if arg.startswith("--log-level="):
            return [arg] + args[:i] + args[i + 1:]
    return args


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("profiles")
    except PackageNotFoundError:
        return "unknown (not installed)"


@click.group(cls=ProfilesGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(_version(), "--version", prog_name="profiles", message="%(prog)s %(version)s")
@click.option("--log-level", default="info", show_default=True, envvar="PROFILES_LOG_LEVEL", show_envvar=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              help="Also accepted after the subcommand. debug: librdkafka's own log and tracebacks too.")
def main(log_level: str) -> None:
    """Real-time e-commerce user profiles: Kafka events in, GRU-updated profiles out.

    Start with `profiles demo` to see it work on an embedded broker.
    """
    _setup_logging(log_level)


GRU_THREADS_OPTION = click.option(
    "--gru-threads", envvar=_env("gru-threads"), show_envvar=True, default=0, show_default=True,
    type=click.IntRange(min=0), help="CPU threads for the GRU pass over a batch of 4096+ events, the one kernel "
    "big enough to gain from more than --torch-threads (0: every usable core).")

CONNECT_TIMEOUT_OPTION = click.option(
    "--connect-timeout", envvar=_env("connect-timeout"), show_envvar=True, default="10s", show_default=True,
    callback=lambda _c, _p, v: _duration_ms(v) / 1000, help="Give up with one clear error if no Kafka broker "
    "answers at --bootstrap-servers within this long (e.g. 10s, 1m).")


def check_broker(kafka: KafkaSettings, connect_timeout_s: float) -> None:
    """One line and exit 1 for an unreachable broker, before any other client starts retrying."""
    from stream.kafka import BrokerUnreachable, check_reachable

    try:
        check_reachable(kafka, connect_timeout_s)
    except BrokerUnreachable as exc:
        raise click.ClickException(str(exc)) from None


# Options shared by the commands that talk to the daemon's topics (`run`, `forget`).
BOOTSTRAP_OPTION = click.option(
    "--bootstrap-servers", envvar="KAFKA_BOOTSTRAP_SERVERS", show_envvar=True, default="localhost:9092",
    show_default=True, help="Kafka brokers, host:port[,host:port].")
INPUT_TOPICS_OPTION = click.option(
    "--input-topics", envvar=_env("input-topics"), show_envvar=True, default="events", show_default=True,
    help="Comma-separated input topics, co-partitioned by user id.")
GROUP_ID_OPTION = click.option(
    "--group-id", envvar=_env("group-id"), show_envvar=True, default="profiles", show_default=True,
    help="Kafka consumer group; instances with the same id share the partitions.")
class KafkaConfigEntry(click.ParamType):
    """A KEY=VALUE string; from the environment, entries are split as a shell splits words, so a quoted
    value may contain spaces (never on every space, which printed a password's tail as an entry)."""

    name = "KEY=VALUE"

    def split_envvar_value(self, rv: str) -> list[str]:
        try:
            return split_kafka_config_env(rv)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        return value


KAFKA_CONFIG_OPTION = click.option(
    "--kafka-config", envvar=_env("kafka-config"), show_envvar=True, multiple=True, metavar="KEY=VALUE",
    type=KafkaConfigEntry(),
    help="librdkafka property for every client, repeatable (e.g. security.protocol=SASL_SSL). In the "
    "environment variable, entries are separated by spaces and quoted as in a shell: "
    "sasl.password=\"a b\". Secret values are never printed.")
KAFKA_CONFIG_FILE_OPTION = click.option(
    "--kafka-config-file", envvar=_env("kafka-config-file"), show_envvar=True, default=None,
    type=click.Path(dir_okay=False), help="librdkafka properties file (key=value lines, # comments), "
    "e.g. TLS and SASL settings mounted from a secret; --kafka-config entries override it.")
STATE_TOPIC_OPTION = click.option(
    "--state-topic", envvar=_env("state-topic"), show_envvar=True, default="",
    help="Compacted changelog of every user's state, partition for partition with the inputs; "
    "restored from on assignment. [default: <group-id>.state]")
PSEUDONYMIZE_OPTION = click.option(
    "--pseudonymize-key", envvar=_env("pseudonymize-key"), show_envvar=True, default="",
    help="Replace user ids by HMAC-SHA256(key, id) before they reach state or outputs. The key is "
    "never printed; prefer the environment variable to the flag.")


@main.command(short_help="The daemon: Kafka events in, profiles out")
@BOOTSTRAP_OPTION
@INPUT_TOPICS_OPTION
@click.option("--output-topic", envvar=_env("output-topic"), show_envvar=True, default="profiles",
              show_default=True, help="Topic the profiles are published to (keyed by user id).")
@click.option("--dlq-topic", envvar=_env("dlq-topic"), show_envvar=True, default="",
              help="Dead-letter topic for records that break the event contract. [default: <output-topic>.dlq]")
@GROUP_ID_OPTION
@click.option("--model", "model_path", envvar=_env("model"), show_envvar=True, default=None,
              type=click.Path(dir_okay=False), help="Model checkpoint (from `profiles train`), or `demo`: the "
              "model shipped with the package, trained on the generator's shop (for trying the service). "
              "Required unless --untrained.")
@click.option("--untrained", envvar=_env("untrained"), show_envvar=True, is_flag=True,
              help="Serve a freshly initialised model without --model: counters and spend are exact, the learned "
                   "fields are not meaningful.")
@click.option("--device", envvar=_env("device"), show_envvar=True, default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda"]), help="auto picks CUDA when present.")
@click.option("--torch-threads", envvar=_env("torch-threads"), show_envvar=True, default=1, show_default=True,
              type=click.IntRange(min=0), help="CPU threads for the model's kernels (0: torch's default, one per "
              "core). One is fastest on small machines: a second competes with decoding and Kafka I/O.")
@GRU_THREADS_OPTION
@click.option("--batch-max-events", envvar=_env("batch-max-events"), show_envvar=True, default=5000,
              show_default=True, type=click.IntRange(min=1), help="A micro-batch closes at this many records...")
@click.option("--batch-max-ms", envvar=_env("batch-max-ms"), show_envvar=True, default=200, show_default=True,
              type=click.IntRange(min=1), help="...or after this many milliseconds, whichever comes first.")
@click.option("--max-event-bytes", envvar=_env("max-event-bytes"), show_envvar=True, default=65536,
              show_default=True, type=click.IntRange(min=64), help="Larger records go to the dead-letter topic.")
@click.option("--no-embedding", envvar=_env("no-embedding"), show_envvar=True, is_flag=True,
              help="Leave the embedding out of published profiles.")
@click.option("--next-items", envvar=_env("next-items"), show_envvar=True, default=0, show_default=True,
              type=click.IntRange(0, 1000), help="Add the top-k predicted next item ids to each profile "
              "(needs a trained --model; 0 leaves them out).")
@click.option("--metrics-port", envvar=_env("metrics-port"), show_envvar=True, default=None,
              type=click.IntRange(min=1, max=65535), help="Serve Prometheus /metrics, and /healthz and /readyz for probes, on this port.")
@click.option("--metrics-address", envvar=_env("metrics-address"), show_envvar=True, default="0.0.0.0",
              show_default=True, help="Address the metrics endpoint listens on.")
@KAFKA_CONFIG_OPTION
@click.option("--restore-from", envvar=_env("restore-from"), show_envvar=True, default=None,
              type=click.Path(exists=True, file_okay=False),
              help="Start from a state snapshot (`profiles replay --state-out`) and continue each input "
              "partition where the replay stopped, if this group has not committed there yet. Every "
              "instance may be given the same snapshot: each takes only its assigned partitions' users.")
@click.option("--idle-rescore-after", envvar=_env("idle-rescore-after"), show_envvar=True, default="24h",
              show_default=True, callback=lambda _c, _p, v: _duration_ms(v),
              help="Re-publish users idle this long in event time (e.g. 30m, 24h, 7d; 0 disables), "
              "so churn risk keeps rising for users who went quiet.")
@click.option("--session-timeout-ms", envvar=_env("session-timeout-ms"), show_envvar=True, default=10000,
              show_default=True, type=click.IntRange(min=1000), help="Consumer group session timeout.")
@click.option("--max-poll-interval-ms", envvar=_env("max-poll-interval-ms"), show_envvar=True, default=300_000,
              show_default=True, type=click.IntRange(min=1000), help="The group evicts a member that takes longer "
              "than this between polls. Batches shrink automatically to stay within a quarter of it; restoring "
              "an assigned partition's users must fit in it too.")
@KAFKA_CONFIG_FILE_OPTION
@click.option("--dedupe-window", envvar=_env("dedupe-window"), show_envvar=True, default=8, show_default=True,
              type=click.IntRange(min=0), help="An event whose event_id is among its user's last N events is a "
              "duplicate (an upstream re-send) and is applied once; 0 turns this off.")
@STATE_TOPIC_OPTION
@PSEUDONYMIZE_OPTION
@click.option("--guarantee", envvar=_env("guarantee"), show_envvar=True, default="at-least-once", show_default=True,
              type=click.Choice(["at-least-once", "exactly-once"]),
              help="State is exactly-once either way (changelog watermarks). at-least-once: offsets are "
              "committed after the output is acknowledged; a crash re-publishes some identical profiles. "
              "exactly-once: each batch's profiles, changelog records, dead letters and offsets form one "
              "Kafka transaction, for read_committed readers (costs a transaction commit per batch).")
@click.option("--transactional-id", envvar=_env("transactional-id"), show_envvar=True, default="",
              help="exactly-once: the producer's transactional.id. [default: <group-id>-<random>, new each start]")
@CONNECT_TIMEOUT_OPTION
def run(bootstrap_servers: str, input_topics: str, output_topic: str, dlq_topic: str, group_id: str,
        model_path: str | None, untrained: bool, device: str, torch_threads: int, gru_threads: int,
        batch_max_events: int, batch_max_ms: int,
        max_event_bytes: int, no_embedding: bool, next_items: int, metrics_port: int | None, metrics_address: str, kafka_config: tuple[str, ...],
        restore_from: str | None, idle_rescore_after: int, session_timeout_ms: int, max_poll_interval_ms: int,
        kafka_config_file: str | None, dedupe_window: int, state_topic: str, pseudonymize_key: str, guarantee: str, transactional_id: str,
        connect_timeout: float) -> None:
    """The always-on daemon: consume events, update profiles, publish them.

    Stops on SIGTERM or SIGINT after finishing, publishing and committing the batch in hand.
    """
    if not model_path and not untrained:
        raise click.UsageError(
            "no --model given. Train one on your events (`profiles train --events events.jsonl --out model.pt`, "
            "then --model model.pt), try the shipped one trained on generated traffic (--model demo), or serve "
            "an untrained model whose learned fields mean nothing (--untrained).")
    try:
        settings = Settings(
            kafka=kafka_settings(bootstrap_servers, kafka_config_file, kafka_config),
            input_topics=tuple(t.strip() for t in input_topics.split(",") if t.strip()),
            output_topic=output_topic, dlq_topic=dlq_topic, group_id=group_id, model_path=model_path,
            device=device, torch_threads=torch_threads, gru_threads=gru_threads, batch_max_events=batch_max_events,
            batch_max_ms=batch_max_ms, max_event_bytes=max_event_bytes, emit_embedding=not no_embedding,
            metrics_port=metrics_port,
            metrics_address=metrics_address, session_timeout_ms=session_timeout_ms,
            max_poll_interval_ms=max_poll_interval_ms,
            idle_rescore_after_ms=idle_rescore_after, next_items=next_items, restore_from=restore_from,
            pseudonymize_key=pseudonymize_key, dedupe_window=dedupe_window, state_topic=state_topic,
            guarantee=guarantee, transactional_id=transactional_id,
        )
        settings.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    log.debug("settings: %s", settings.describe())  # before the broker check, secrets masked
    check_broker(settings.kafka, connect_timeout)
    stop = threading.Event()
    received = install_stop_handlers(stop, settings.shutdown_timeout_s)
    stats = run_daemon(settings, stop)
    if received:
        click.echo(f"stopped: {stats.events:,} events applied, {stats.profiles:,} profiles published, "
                   f"{stats.dead_letters:,} dead letters, offsets committed", err=True)
    exit_130_if_interrupted(received)


def kafka_settings(bootstrap_servers: str, config_file: str | None, config: tuple[str, ...]) -> KafkaSettings:
    """Brokers plus librdkafka properties: the file's first, --kafka-config entries over them."""
    return KafkaSettings(bootstrap_servers, (read_kafka_config_file(config_file) if config_file else ())
                         + parse_kafka_config(config))


def run_daemon(settings: Settings, stop: threading.Event) -> DaemonStats:
    """Build the daemon from settings and run it until `stop`; user-facing errors become ClickExceptions.
    Returns the daemon's totals."""
    from confluent_kafka import KafkaException

    from consumers.daemon import ProfileDaemon
    from models.update_step import load_updater
    from models.profile_model import ModelError
    from stream.kafka import StreamError
    from stream.metrics import Health, Metrics, serve

    log.info("settings: %s", settings.describe())
    try:
        updater = load_updater(settings)
        metrics, health = Metrics(), Health(settings.stall_after_s)
        if settings.metrics_port:
            serve(metrics, health, settings.metrics_port, settings.metrics_address)
        daemon = ProfileDaemon(settings, updater, metrics, stop, health)
        daemon.run()
        return daemon.stats
    except (ModelError, StreamError) as exc:
        raise click.ClickException(settings.kafka.scrub(str(exc))) from None
    except KafkaException as exc:
        raise click.ClickException(settings.kafka.scrub(f"Kafka error: {exc.args[0].str()}")) from None


@main.command(short_help="Erase users: state, changelog and profiles")
@click.argument("users", nargs=-1, required=True)
@BOOTSTRAP_OPTION
@INPUT_TOPICS_OPTION
@GROUP_ID_OPTION
@STATE_TOPIC_OPTION
@PSEUDONYMIZE_OPTION
@KAFKA_CONFIG_OPTION
@KAFKA_CONFIG_FILE_OPTION
@click.option("--wait", "wait", default="0", show_default=True, callback=lambda _c, _p, v: _duration_ms(v),
              help="Wait up to this long (e.g. 60s) until the daemon has erased each user found in state "
              "(its changelog tombstone is written); exit 1 if one is not confirmed in time. 0: do not wait.")
@CONNECT_TIMEOUT_OPTION
def forget(users: tuple[str, ...], bootstrap_servers: str, input_topics: str, group_id: str, state_topic: str,
           pseudonymize_key: str, kafka_config: tuple[str, ...], kafka_config_file: str | None, wait: int,
           connect_timeout: float) -> None:
    """Erase USERS (right to erasure): their state, their changelog records and their profiles.

    Writes a forget record into the input partition that holds each user's state (found in the state
    changelog), so the daemon owning that partition erases the user in order with their events, with
    tombstones on the changelog and output topics. A user not found in state is asked for on every
    partition. Events of the user that arrive after the forget start a new profile. Use the same
    --group-id / --state-topic and --pseudonymize-key as the daemon.
    """
    from confluent_kafka import KafkaException

    from consumers.forget import forget_users
    from stream.kafka import StreamError

    try:
        settings = Settings(kafka=kafka_settings(bootstrap_servers, kafka_config_file, kafka_config),
                            input_topics=tuple(t.strip() for t in input_topics.split(",") if t.strip()),
                            group_id=group_id, state_topic=state_topic, pseudonymize_key=pseudonymize_key)
        settings.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    check_broker(settings.kafka, connect_timeout)
    try:
        requests = forget_users(settings, list(users), wait / 1000.0)
    except StreamError as exc:
        raise click.ClickException(settings.kafka.scrub(str(exc))) from None
    except KafkaException as exc:
        raise click.ClickException(settings.kafka.scrub(f"Kafka error: {exc.args[0].str()}")) from None
    topic, unconfirmed = settings.input_topics[0], 0
    for r in requests:
        where = (f"{topic}[{r.partitions[0]}], the partition holding its state" if r.in_state else
                 f"all {len(r.partitions)} partitions of {topic} (not found in {settings.changelog_topic})")
        status = ""
        if wait and r.in_state:
            status = "; erased" if r.erased else f"; NOT confirmed within {wait / 1000:g}s"
            unconfirmed += not r.erased
        click.echo(f"{r.user_id}: forget record written to {where}{status}")
    if unconfirmed:
        sys.exit(1)


TOPIC_OPTION = click.option(
    "--topic", envvar=_env("output-topic"), show_envvar=True, default="profiles", show_default=True,
    help="The daemon's output topic (its --output-topic).")


def _write_lines(lines: list[bytes]) -> None:
    sys.stdout.buffer.write(b"".join(lines))
    sys.stdout.buffer.flush()


def _stdout_closed() -> None:
    """`profiles tail | head`: the reader went away; end quietly, as kcat and cat do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's final flush must not raise again
    sys.exit(0)


@main.command(short_help="Follow the profiles topic as JSON lines")
@TOPIC_OPTION
@click.option("--from-beginning", is_flag=True, help="Start at the first retained profile instead of the end.")
@click.option("--max", "max_records", default=None, type=click.IntRange(min=1),
              help="Stop after this many records (default: follow until Ctrl-C).")
@BOOTSTRAP_OPTION
@KAFKA_CONFIG_OPTION
@KAFKA_CONFIG_FILE_OPTION
@CONNECT_TIMEOUT_OPTION
def tail(topic: str, from_beginning: bool, max_records: int | None, bootstrap_servers: str,
         kafka_config: tuple[str, ...], kafka_config_file: str | None, connect_timeout: float) -> None:
    """Follow the profiles topic: each profile as one JSON line on stdout (an erased user's tombstone as
    {"user_id": ..., "erased": true}). Starts at the end (new profiles only) unless --from-beginning.
    Reads assigned partitions without a consumer group's commits: no side effects. Ctrl-C ends it
    (exit 130) with a one-line count on stderr."""
    from confluent_kafka import KafkaException

    from consumers.readback import tail as follow
    from stream.kafka import StreamError

    try:
        kafka = kafka_settings(bootstrap_servers, kafka_config_file, kafka_config)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    check_broker(kafka, connect_timeout)
    printed = [0]

    def write(lines: list[bytes]) -> None:
        _write_lines(lines)
        printed[0] += len(lines)

    log.debug("following %s from %s", topic, "the beginning" if from_beginning else "the end")
    try:
        follow(kafka, topic, from_beginning, max_records, write)
    except KeyboardInterrupt:
        click.echo(f"tail: {printed[0]:,} record(s) printed from {topic}", err=True)
        sys.exit(130)
    except BrokenPipeError:
        _stdout_closed()
    except StreamError as exc:
        raise click.ClickException(kafka.scrub(str(exc))) from None
    except KafkaException as exc:
        raise click.ClickException(kafka.scrub(f"Kafka error: {exc.args[0].str()}")) from None


@main.command(short_help="Each user's latest published profile, as JSON")
@click.argument("users", nargs=-1, required=True)
@TOPIC_OPTION
@BOOTSTRAP_OPTION
@PSEUDONYMIZE_OPTION
@KAFKA_CONFIG_OPTION
@KAFKA_CONFIG_FILE_OPTION
@CONNECT_TIMEOUT_OPTION
def get(users: tuple[str, ...], topic: str, bootstrap_servers: str, pseudonymize_key: str,
        kafka_config: tuple[str, ...], kafka_config_file: str | None, connect_timeout: float) -> None:
    """Print each USER's latest published profile as one JSON line ({"user_id": ..., "erased": true}
    for an erased user); exit 1 naming the users with no profile.

    Reads only the partition that holds each user's key (the daemon's partitioner: librdkafka's
    consistent_random unless --kafka-config partitioner=... says otherwise), backwards from its end,
    until the user's latest record is found. With --pseudonymize-key (the daemon's), give raw ids."""
    from confluent_kafka import KafkaException

    from consumers.readback import get_latest
    from stream.kafka import StreamError
    from stream.pseudonyms import Pseudonymizer

    try:
        kafka = kafka_settings(bootstrap_servers, kafka_config_file, kafka_config)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    check_broker(kafka, connect_timeout)
    pseudonym = Pseudonymizer(pseudonymize_key).one if pseudonymize_key else None
    keys = {u: pseudonym(u).encode() for u in users} if pseudonym else None
    try:
        result = get_latest(kafka, topic, users, keys)
    except StreamError as exc:
        raise click.ClickException(kafka.scrub(str(exc))) from None
    except KafkaException as exc:
        raise click.ClickException(kafka.scrub(f"Kafka error: {exc.args[0].str()}")) from None
    from consumers.readback import as_line

    try:
        _write_lines([as_line(u.encode(), result.found[u]) for u in dict.fromkeys(users) if u in result.found])
    except BrokenPipeError:
        _stdout_closed()
    log.debug("read %d record(s) of %s", result.records_read, topic)
    if result.missing:
        raise click.ClickException(f"no profile in {topic} for {len(result.missing)} user(s): "
                                   f"{', '.join(result.missing)}")


@main.command(short_help="Synthetic traffic, to a file or a topic")
@click.option("--users", default=1000, show_default=True, type=click.IntRange(min=1), help="Distinct users.")
@click.option("--events", default=20000, show_default=True, type=click.IntRange(min=1), help="Events to write.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same traffic.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write JSON lines here (.gz compresses; '-': "
              "standard output), through a temporary file renamed when complete.")
@click.option("--topic", help="Produce to this Kafka topic instead (key = user id).")
@click.option("--bootstrap-servers", envvar="KAFKA_BOOTSTRAP_SERVERS", show_envvar=True, default="localhost:9092",
              show_default=True, help="Kafka brokers, for --topic.")
@click.option("--partitions", default=4, show_default=True, type=click.IntRange(min=1),
              help="Partitions of --topic if it has to be created.")
@click.option("--invalid-fraction", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Share of records replaced by malformed ones of every kind (to exercise the dead-letter path).")
@click.option("--span-days", default=30.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Event-time span of the log.")
@click.option("--shop-seed", default=None, type=int,
              help="A structured shop with parameters drawn from this seed (segments of users, what follows a "
                   "purchase, carts that bring users back, churn that slows users down first); default: the "
                   "classic shop. Train in one shop, judge in another.")
@click.option("--kafka-config", multiple=True, metavar="KEY=VALUE", help="librdkafka property, repeatable.")
@CONNECT_TIMEOUT_OPTION
def generate(users: int, events: int, seed: int, out: str | None, topic: str | None, bootstrap_servers: str,
             partitions: int, invalid_fraction: float, span_days: float, shop_seed: int | None,
             kafka_config: tuple[str, ...], connect_timeout: float) -> None:
    """Synthetic traffic with sessions, funnels, favourite categories, price levels and users who go quiet."""
    from stream.generator import ShopParams

    shop = ShopParams.draw(shop_seed) if shop_seed is not None else None
    if bool(out) == bool(topic):
        raise click.UsageError("give exactly one of --out FILE or --topic TOPIC")
    from consumers.loadgen import generate_to_file, generate_to_topic

    if out:
        n = generate_to_file(out, users, events, seed, invalid_fraction, span_days, shop)
        click.echo(f"wrote {n:,} records to {'standard output' if out == '-' else out}", err=True)
    else:
        try:
            kafka = KafkaSettings(bootstrap_servers, parse_kafka_config(kafka_config))
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        check_broker(kafka, connect_timeout)
        n = generate_to_topic(kafka, topic, partitions, users, events, seed, invalid_fraction, span_days, shop)
        click.echo(f"produced {n} records to {topic}", err=True)


@main.command(short_help="Everything on one machine, with a live view")
@click.option("--duration", default=None, type=click.FloatRange(min=1), help="Stop after this many seconds "
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


@main.command("import", short_help="Public datasets into the event contract")
@click.option("--format", "fmt", required=True, type=click.Choice(["taobao", "rees46", "yoochoose", "retailrocket"]),
              help="Layout of the source files.")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON lines to write (.gz compresses).")
def import_(fmt: str, sources: tuple[str, ...], out: str) -> None:
    """Convert public e-commerce datasets into the event contract.

    Taobao pv/fav -> click, cart -> add_to_cart, buy -> purchase; YOOCHOOSE sessions become users;
    REES46 keeps prices and category codes. Rows that cannot be converted are counted by reason.
    """
    from rich.progress import Progress

    from stream.importers import import_dataset

    with Progress(transient=True) as bar:
        task = bar.add_task(f"importing {fmt}", total=None)
        try:
            report = import_dataset(fmt, list(sources), out, progress=lambda n: bar.update(task, completed=n))
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items())) or "none"
    click.echo(f"{report.events} events from {report.rows} rows written to {out} (skipped: {skipped})", err=True)


@main.command(short_help="Cut an event log by event time, for evaluation")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--test-fraction", default=0.2, show_default=True, type=click.FloatRange(0.01, 0.99),
              help="Share of the events, the latest by event time, that becomes the test part.")
@click.option("--train-out", required=True, type=click.Path(dir_okay=False))
@click.option("--test-out", required=True, type=click.Path(dir_okay=False))
def split(source: str, test_fraction: float, train_out: str, test_out: str) -> None:
    """Split a JSON-lines event log by event time: the latest --test-fraction of the events is the test part.

    Lines are copied byte for byte; lines that break the event contract stay in the training part.
    Both files are written to temporary files and renamed when complete.
    """
    from consumers.outfiles import atomic_paths
    from models.dataset import split_lines_by_time

    with atomic_paths(train_out, test_out, flag="--train-out/--test-out") as (train_tmp, test_tmp):
        n_train, n_test, cutoff = split_lines_by_time(source, test_fraction, train_tmp, test_tmp)
    click.echo(f"{n_train:,} events up to {cutoff} -> {train_out}; {n_test:,} later events -> {test_out}", err=True)


@main.command(short_help="Train the profile model on event logs")
@click.option("--events", "event_files", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON-lines event files (repeatable), e.g. from `profiles import` or `profiles generate`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write.")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help="Passes over the log [default: 10 up to 125k events, fewer above (2 at 500k), so that "
                   "training stays within minutes on a laptop].")
@click.option("--hidden-size", default=64, show_default=True, type=click.IntRange(min=4))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1), help="Sequence chunks per step.")
@click.option("--max-len", default=64, show_default=True, type=click.IntRange(min=2), help="Events per chunk.")
@click.option("--lr", default=6e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--dropout", default=0.2, show_default=True, type=click.FloatRange(0, 0.9))
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0.01, 0.5),
              help="The last part of the time span that validates (early stopping).")
@click.option("--patience", default=2, show_default=True, type=click.IntRange(min=1))
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
@click.option("--until", default=None,
              help="Train on the events at or before this ISO time (or epoch ms) only: the cut of a later "
                   "`profiles evaluate-fields --cut`, so the model never sees what it is judged on.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def train(event_files: tuple[str, ...], out: str, epochs: int | None, hidden_size: int, batch_size: int, max_len: int,
          lr: float, dropout: float, val_fraction: float, patience: int, refit: bool, max_items: int,
          item_buckets: int, category_buckets: int, query_buckets: int, until: str | None, seed: int,
          device: str) -> None:
    """Train the profile model on event logs, in two stages: the sequence model (next item, next
    category, auxiliary purchase and churn objectives), then the published fields (purchase_propensity,
    churn_risk, top_categories) fitted on profiles taken through the serving path at cuts in the log
    and judged on what followed, calibrated on the latest cuts."""
    from consumers.field_report import parse_cut
    from consumers.training import run_training

    run_training(event_files, out, device, seed=seed, hidden_size=hidden_size, dropout=dropout, until=parse_cut(until),
                 buckets=(item_buckets, category_buckets, query_buckets),
                 epochs=epochs, batch_size=batch_size, max_len=max_len, lr=lr, val_fraction=val_fraction,
                 patience=patience, refit=refit, max_items=max_items)


@main.group(short_help="Read model checkpoints")
def model() -> None:
    """Read model checkpoints."""


@model.command("info")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
def model_info(checkpoint: str, as_json: bool) -> None:
    """A checkpoint's version, sizes, vocabularies and training metadata (from `profiles train`)."""
    import orjson

    from consumers.model_info import checkpoint_info, info_lines
    from models.profile_model import ModelError

    try:
        info = checkpoint_info(checkpoint)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode() if as_json else "\n".join(info_lines(info)))


@main.command("evaluate", short_help="The model's next item and category against simple rules")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--train-events", "train_files", required=True, multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Events the baselines are fitted on; test users' state is carried over from them.")
@click.option("--events", "test_files", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Test events: every next event of every test user is predicted from its prefix.")
@click.option("--k", default=20, show_default=True, type=click.IntRange(min=1), help="Cut-off of Recall@k and MRR@k.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def evaluate_(model_path: str, train_files: tuple[str, ...], test_files: tuple[str, ...], k: int, device: str,
              as_json: bool) -> None:
    """Next-item Recall@k and MRR@k (full ranking), next-category accuracy@5 and purchase-propensity
    ROC AUC of the model, and of popularity and sequential-rules baselines fitted in the same run."""
    from consumers.evaluation import run_evaluation

    run_evaluation(model_path, train_files, test_files, device, k, as_json)


@main.command(short_help="Event logs through the daemon's pipeline")
@click.argument("sources", nargs=-1, required=True)
@click.option("--format", "fmt", default="jsonl", show_default=True,
              type=click.Choice(["jsonl", "taobao", "rees46", "yoochoose", "retailrocket"]),
              help="jsonl: the event contract, one JSON object per line (plain or gzip); others are converted "
              "on the fly like `profiles import`.")
@click.option("--model", "model_path", envvar=_env("model"), show_envvar=True, default=None,
              type=click.Path(dir_okay=False), help="Model checkpoint (or `demo`, the shipped one); without one, an untrained model.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write profiles as JSON lines here (.gz compresses; "
              "'-': standard output). Written to a temporary file, renamed when complete; Ctrl-C keeps "
              "<out>.partial.")
@click.option("--output-topic", help="Publish profiles to this Kafka topic instead (or as well).")
@click.option("--bootstrap-servers", envvar="KAFKA_BOOTSTRAP_SERVERS", show_envvar=True, default="localhost:9092",
              show_default=True, help="Kafka brokers, for --output-topic.")
@click.option("--kafka-config", multiple=True, metavar="KEY=VALUE", help="librdkafka property, repeatable.")
@click.option("--every-update", is_flag=True, help="Write every profile update, not only each user's final profile.")
@click.option("--state-out", type=click.Path(file_okay=False), help="Save the final state here (a snapshot directory).")
@click.option("--dead-letters", "dead_letters_path", default=None, type=click.Path(dir_okay=False),
              help="Where records that break the contract go (JSON lines with reason, source, line and the "
              "record in base64). [default: <out>.dlq.jsonl when --out is a file, else replay.dlq.jsonl]")
@click.option("--batch-events", default=50_000, show_default=True, type=click.IntRange(min=1),
              help="Records per batch (the result does not depend on it).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--torch-threads", default=1, show_default=True, type=click.IntRange(min=0),
              help="CPU threads for the model's kernels (0: torch's default).")
@GRU_THREADS_OPTION
@click.option("--no-embedding", is_flag=True, help="Leave the embedding out of profiles.")
@click.option("--next-items", default=0, show_default=True, type=click.IntRange(0, 1000),
              help="Top-k predicted next item ids in each profile (trained models).")
@click.option("--pseudonymize-key", envvar=_env("pseudonymize-key"), show_envvar=True, default="",
              help="Replace user ids by HMAC-SHA256(key, id), as `profiles run` does with the same key.")
@CONNECT_TIMEOUT_OPTION
def replay(sources: tuple[str, ...], fmt: str, model_path: str | None, out: str | None, output_topic: str | None,
           bootstrap_servers: str, kafka_config: tuple[str, ...], every_update: bool, state_out: str | None,
           dead_letters_path: str | None, batch_events: int, device: str, torch_threads: int, gru_threads: int,
           no_embedding: bool, next_items: int, pseudonymize_key: str, connect_timeout: float) -> None:
    """Replay event logs through the daemon's pipeline: files, directories and globs (no broker needed),
    or Kafka topics as kafka://TOPIC?from=ISO&to=ISO (seeks by write time, then keeps the events whose
    event time is in [from, to)).

    Writes the final profile of every user (or every update), and optionally a state snapshot.
    """
    if not out and not output_topic:
        raise click.UsageError("give --out FILE and/or --output-topic TOPIC")
    try:
        settings = Settings(kafka=KafkaSettings(bootstrap_servers, parse_kafka_config(kafka_config)),
                            model_path=model_path, device=device, torch_threads=torch_threads,
                            gru_threads=gru_threads, emit_embedding=not no_embedding, next_items=next_items,
                            pseudonymize_key=pseudonymize_key)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if output_topic or any(s.startswith("kafka://") for s in sources):
        check_broker(settings.kafka, connect_timeout)  # before the model's imports: fast
    from consumers.outfiles import OutputError, default_dead_letters
    from consumers.replay import replay as run_replay
    from models.profile_model import ModelError
    from stream.kafka import StreamError
    from stream.sources import SourceError

    dlq = dead_letters_path or default_dead_letters(out, "replay.dlq.jsonl")
    try:
        report = run_replay(settings, list(sources), fmt, out, output_topic, every_update, state_out, dlq,
                            batch_events, show_progress=sys.stderr.isatty())
    except (SourceError, ModelError, StreamError, OutputError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(report.summary(dlq), err=True)


@main.command(short_help="One user's events beside how each field moved")
@click.argument("user")
@click.option("--events", "sources", required=True, multiple=True,
              help="Event source(s), as for `profiles replay`: files, directories, globs, kafka://TOPIC?from=&to=.")
@click.option("--format", "fmt", default="jsonl", show_default=True,
              type=click.Choice(["jsonl", "taobao", "rees46", "yoochoose", "retailrocket"]))
@click.option("--model", "model_path", envvar=_env("model"), show_envvar=True, default=None,
              type=click.Path(dir_okay=False), help="Model checkpoint (or `demo`, the shipped one); without one, an untrained model.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Also draw the fields to this PNG.")
@click.option("--idle-rescore-after", default="24h", show_default=True, callback=lambda _c, _p, v: _duration_ms(v),
              help="Also show the profiles the daemon re-publishes while the user is idle, this long apart in "
              "event time (as in `profiles run`; 0: none).")
@click.option("--bootstrap-servers", envvar="KAFKA_BOOTSTRAP_SERVERS", show_envvar=True, default="localhost:9092",
              show_default=True, help="Kafka brokers, for kafka:// sources.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@CONNECT_TIMEOUT_OPTION
def inspect(user: str, sources: tuple[str, ...], fmt: str, model_path: str | None, plot_path: str | None,
            idle_rescore_after: int, bootstrap_servers: str, device: str, connect_timeout: float) -> None:
    """One user's event timeline beside how each profile field moved (a table; --plot for a picture).

    Besides the profile after each event: the idle re-scores between events and after the last one
    (churn risk rises while a user is quiet), and the final profile a replay of the same sources writes,
    computed at the log's last event time."""
    settings = Settings(kafka=KafkaSettings(bootstrap_servers), model_path=model_path, device=device,
                        emit_embedding=False, idle_rescore_after_ms=idle_rescore_after)
    if any(s.startswith("kafka://") for s in sources):
        check_broker(settings.kafka, connect_timeout)  # before the model's imports: fast
    from consumers.inspect import InspectError, run_inspect
    from models.profile_model import ModelError
    from stream.sources import SourceError

    try:
        run_inspect(settings, list(sources), fmt, user, plot_path)
    except (InspectError, SourceError, ModelError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command("evaluate-fields", short_help="Learned fields against what users do after a cut")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint to judge (train it on events before the cut only), or `demo`.")
@click.option("--events", "event_files", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON-lines event log(s) spanning the cut (repeatable).")
@click.option("--cut", default=None, help="ISO time T (or epoch ms): profiles at T are judged on what follows. "
              "Default: 80% of the log's span.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Draw reliability diagrams of both probabilities to this PNG (needs matplotlib).")
def evaluate_fields(model_path: str, event_files: tuple[str, ...], cut: str | None, device: str, as_json: bool,
                    plot_path: str | None) -> None:
    """Judge every learned profile field against what each user does after a cut T, beside the
    strongest simple baselines computed from the same events before T.

    \b
    top_categories       precision@3 against the categories engaged with in the
                         next 7 days, and hit rate of the top future category
    purchase_propensity  a purchase within 7 days: ROC AUC, PR AUC, Brier, ECE
    churn_risk           no event within 14 days: ROC AUC, PR AUC, Brier, ECE

    A log that ends before a horizon cuts the window short; the probabilities are then asked for it.
    """
    from consumers.field_report import run_field_evaluation

    run_field_evaluation(model_path, event_files, cut, device, as_json, plot_path)


@main.command("evaluate-synthetic", short_help="Learned fields against the generator's truth")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--users", default=2000, show_default=True, type=click.IntRange(min=10))
@click.option("--events", default=100_000, show_default=True, type=click.IntRange(min=100))
@click.option("--seed", default=1, show_default=True, type=int, help="Use a seed the model was not trained on.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def evaluate_synthetic(model_path: str, users: int, events: int, seed: int, device: str) -> None:
    """Check that learned fields mean what their names say, on generated traffic whose truth is known:
    top_categories vs favourite categories (precision@3), purchase_propensity vs habitual buyers (AUC),
    churn_risk vs users who went quiet (AUC), each beside a counting baseline. Prints JSON."""
    import orjson

    from models.profile_model import load_checkpoint, resolve_device
    from models.truth import synthetic_truth_report

    dev = resolve_device(device)
    report = synthetic_truth_report(load_checkpoint(model_path, dev), dev, users, events, seed)
    click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


@main.command(short_help="Throughput and latency against a plain consumer")
@click.option("--events", default=200_000, show_default=True, type=click.IntRange(min=1000),
              help="Generated events to push through.")
@click.option("--users", default=50_000, show_default=True, type=click.IntRange(min=1), help="Distinct users.")
@click.option("--batch-max-events", default=5000, show_default=True, type=click.IntRange(min=1),
              help="Micro-batch size of the pipeline (and of the raw consumer's consume calls).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--torch-threads", default=1, show_default=True, type=click.IntRange(min=0),
              help="CPU threads for the model's kernels (0: torch's default).")
@GRU_THREADS_OPTION
@click.option("--bootstrap-servers", default=None,
              help="Benchmark against this Kafka cluster (fresh topics are created). [default: an embedded broker]")
@click.option("--partitions", default=4, show_default=True, type=click.IntRange(min=1),
              help="Partitions of the benchmark topics.")
@click.option("--offered-rate", default=50_000, show_default=True, type=click.IntRange(min=0),
              help="After the throughput runs, offer this many events/s from another process to the live "
              "daemon and report its batch latency (0 skips it).")
@click.option("--offered-seconds", default=10.0, show_default=True, type=click.FloatRange(min=1),
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def bench(events: int, users: int, batch_max_events: int, device: str, torch_threads: int, gru_threads: int,
          bootstrap_servers: str | None, partitions: int, offered_rate: int, offered_seconds: float, no_broker: bool,
          scaling_users: str, restore_users: int, seed: int, guarantee: str, as_json: bool) -> None:
    """Measure throughput and latency in one run: the full pipeline (decode, validate, GRU update,
    profile encode, publish, commit) against the raw ceiling of a plain consumer that only consumes
    and decodes the same events; p50/p99 batch latency; state size; batch latency under an offered load.

    With --no-broker: events/s of the model step alone, and how it scales with the users in state.
    """
    import orjson

    from consumers.bench import model_step, restore_time, run_bench
    from stream.kafka import StreamError

    say = (lambda _msg: None) if as_json else (lambda msg: click.echo(msg, err=True))
    if restore_users:
        result = restore_time(users=restore_users, partitions=partitions, bootstrap_servers=bootstrap_servers,
                              say=say)
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
                                scaling_users=sizes, say=say)
        else:
            report = run_bench(events=events, users=users, batch_max_events=batch_max_events, device=device,
                               bootstrap_servers=bootstrap_servers, partitions=partitions, offered_rate=offered_rate,
                               offered_seconds=offered_seconds, torch_threads=torch_threads,
                               gru_threads=gru_threads, seed=seed,
                               guarantee=guarantee, say=say)
    except (StreamError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(report.as_json().decode())
    else:
        click.echo(report.table())


if __name__ == "__main__":  # pragma: no cover
    main()
