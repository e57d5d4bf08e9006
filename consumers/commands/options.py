"""Options shared between commands, each declared once, and the one mapping from options to Settings.

An option that sets a Settings field is named after the field (`--model` fills `model_path`,
`--no-embedding` fills `emit_embedding`), so a command hands its setting options to `settings_from`
as they come: the Kafka group (--bootstrap-servers, --kafka-config, --kafka-config-file) becomes
`Settings.kafka`, every other one the field of its name. Every command that talks to Kafka takes
`kafka_options()`: the same flags, environment variables and help everywhere.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
from typing import Any, Callable

import click

from stream.settings import (
    STATE_DTYPES, KafkaSettings, Settings, parse_kafka_config, read_kafka_config_file, split_kafka_config_env,
)

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def env(flag: str) -> str:
    """The environment variable of a flag: --batch-max-ms -> PROFILES_BATCH_MAX_MS."""
    return "PROFILES_" + flag.lstrip("-").upper().replace("-", "_")


_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_TTL_MS = 100_000 * 86_400_000
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def duration_ms(text: str) -> int:
    """'500ms', '90s', '30m', '24h', '7d' or a plain number of seconds -> milliseconds."""
    match = _DURATION.match(text.lower())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 30m, 24h or 7d")
    return int(float(match.group(1)) * _UNITS_MS[match.group(2) or "s"])


def to_ms(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    return duration_ms(value)


def instant_ms(text: str, option: str) -> int:
    """A point in time on the command line, ISO-8601 (UTC when no zone is given) or epoch milliseconds, as
    epoch ms; `option` names it in an error. Epoch seconds are refused with the number they meant."""
    from stream.events import MIN_TS_MS  # numpy: not for every command's start

    if text.isdigit():
        if int(text) < MIN_TS_MS:  # the contract's own floor, which catches epoch seconds in events too
            meant = f"epoch seconds? (use {int(text) * 1000} or an ISO time)" if int(text) * 1000 >= MIN_TS_MS else (
                "give an ISO time, e.g. 2024-01-31T12:00")
            raise click.BadParameter(f"{text} is before 1973 in epoch milliseconds: {meant}", param_hint=option)
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither ISO-8601 nor epoch milliseconds", param_hint=option) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)


def to_instant_ms(_ctx: click.Context, param: click.Parameter, value: str | tuple[str, ...] | None,
                  ) -> int | list[int] | None:
    """Click callback of a time option (--cut, --until): instant_ms of each value given."""
    option = param.opts[0]
    if isinstance(value, tuple):  # a repeatable option
        return [instant_ms(v, option) for v in value]
    return None if value is None else instant_ms(value, option)


def to_snapshot_start(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """earliest, latest, an ISO time or epoch ms (as epoch ms, a decimal string), or "" (not given)."""
    value = (value or "").strip()
    if value.lower() in ("", "earliest", "latest"):
        return value.lower()
    return str(instant_ms(value, "--snapshot-start"))


def to_seconds(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    return duration_ms(value) / 1000


def to_ttl_ms(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    """A TTL: a duration, or off (0 and off both mean never)."""
    if value.strip().lower() == "off":
        return 0
    try:
        ttl = duration_ms(value)
    except click.BadParameter:
        raise click.BadParameter(f"{value!r} is not a duration like 12h, 30d or 400d (or off)") from None
    if ttl > MAX_TTL_MS:
        raise click.BadParameter(f"{value!r} is longer than event times can tell apart: at most 100000d")
    return ttl


def stack(*decorators: Decorator) -> Decorator:
    """Several option decorators as one; the options appear in --help in the order given."""
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return apply


def setting(flag: str, field: str | None = None, **kwargs: Any) -> Decorator:
    """An option with its environment variable shown in --help (PROFILES_<FLAG>), filling `field`."""
    kwargs.setdefault("envvar", env(flag))
    kwargs.setdefault("show_envvar", True)
    return click.option(flag, *([field] if field else []), **kwargs)


# ----------------------------------------------------------------------------- Kafka connection


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


KAFKA_PARAMS = ("bootstrap_servers", "kafka_config_file", "kafka_config")


def kafka_options(needed_for: str = "", *, embedded_broker: bool = False) -> Decorator:
    """Brokers, librdkafka properties (TLS, SASL, tuning) and the start-up broker check, for every
    command that talks to Kafka. `needed_for` names what needs the brokers where not everything does;
    `embedded_broker`: without --bootstrap-servers (None) the command starts a broker of its own."""
    where = f" Needed for {needed_for} only." if needed_for else ""
    if embedded_broker:
        where += " Without any, an embedded broker is started for the run."
    return stack(
        click.option("--bootstrap-servers", envvar="KAFKA_BOOTSTRAP_SERVERS", show_envvar=True,
                     default=None if embedded_broker else "localhost:9092", show_default=not embedded_broker,
                     callback=check_brokers, help=f"Kafka brokers, host:port[,host:port].{where}"),
        setting("--kafka-config", multiple=True, metavar="KEY=VALUE", type=KafkaConfigEntry(),
                help="librdkafka property for every client, repeatable (e.g. security.protocol=SASL_SSL). In "
                "the environment variable, entries are separated by spaces and quoted as in a shell: "
                "sasl.password=\"a b\". Secret values are never printed."),
        setting("--kafka-config-file", default=None, type=click.Path(dir_okay=False),
                help="librdkafka properties file (key=value lines, # comments), e.g. TLS and SASL settings "
                "mounted from a secret; --kafka-config entries override it."),
        setting("--connect-timeout", default="10s", show_default=True, callback=to_seconds,
                help="Give up with one clear error if no Kafka broker answers at --bootstrap-servers within "
                "this long (e.g. 10s, 1m)."),
    )


def check_brokers(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """host:port[,host:port] (a port optional, a scheme such as SSL:// allowed), or a usage error: librdkafka
    reads 'localhost:notaport' as port 0 and only fails later, at connect time, with a less clear message."""
    for entry in (value or "").split(",") if value else ():
        address = entry.strip().split("://", 1)[-1]
        host, colon, port = address.rpartition(":") if not address.endswith("]") else (address, "", "")
        if not colon:
            host, port = address, ""
        if not host or (colon and not (port.isdigit() and 0 < int(port) < 65536)):
            raise click.BadParameter(f"{entry.strip()!r} is not host:port (e.g. localhost:9092)")
    return value


def kafka_settings(bootstrap_servers: str, config_file: str | None, config: tuple[str, ...]) -> KafkaSettings:
    """Brokers plus librdkafka properties: the file's first, --kafka-config entries over them."""
    return KafkaSettings(bootstrap_servers, (read_kafka_config_file(config_file) if config_file else ())
                         + parse_kafka_config(config))


def kafka_from(params: dict[str, Any]) -> KafkaSettings:
    """The KafkaSettings of kafka_options(), taken out of `params`; a bad entry is a usage error (exit 2)."""
    try:
        return kafka_settings(*(params.pop(name) for name in KAFKA_PARAMS))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf: both pass its comparisons (nan < 0 is false), and then
    trained a whole epoch of nan losses (--lr inf) or silently read as 0 (--invalid-fraction nan)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


# ----------------------------------------------------------------------------- device and threads

device_option = setting(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
    help="auto picks CUDA when present.")

# More threads than any machine has cores only slows the kernels down (10,000 took a 0.2 s replay to 52 s) and,
# far enough, crashes torch's thread pool: refused as a usage error instead.
MAX_THREADS = 1024

thread_options = stack(
    setting("--torch-threads", default=1, show_default=True, type=click.IntRange(0, MAX_THREADS),
            help="CPU threads for the model's kernels (0: torch's default, one per core). One is fastest on "
            "small machines: a second competes with decoding and Kafka I/O."),
    setting("--gru-threads", default=0, show_default=True, type=click.IntRange(0, MAX_THREADS),
            help="CPU threads for the GRU pass over a batch of 4096+ events, the one kernel big enough to gain "
            "from more than --torch-threads (0: every usable core)."),
)

# ----------------------------------------------------------------------------- what profiles hold

MODEL_HELP = "Model checkpoint (or `demo`, the shipped one); without one, an untrained model."


class ModelPath(click.Path):
    """A checkpoint file, or `demo` (the shipped model) whatever the working directory holds: a folder named demo
    there (`profiles demo` writes none, but a checkout or a user may) must not turn the shipped model away."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from models.checkpoint_io import DEMO_MODEL

        return value if value == DEMO_MODEL else super().convert(value, param, ctx)


def model_option(help: str = MODEL_HELP) -> Decorator:  # noqa: A002 (click's word)
    return setting("--model", "model_path", default=None, type=ModelPath(), help=help)


profile_options = stack(
    setting("--no-embedding", "emit_embedding", is_flag=True, callback=lambda _c, _p, v: not v,
            help="Leave the embedding out of profiles."),
    setting("--next-items", default=0, show_default=True, type=click.IntRange(0, 1000),
            help="Add the top-k predicted next item ids to each profile (needs a trained --model; 0 leaves "
            "them out)."),
    setting("--no-stream-calibration", "stream_calibration", is_flag=True, callback=lambda _c, _p, v: not v,
            help="Publish purchase_propensity and churn_risk as the model says them. By default they are "
            "calibrated on the shop's own outcomes (after four to five weeks of its traffic), where that clearly "
            "beats the model's own (docs/model.md)."),
)

expiry_options = stack(
    setting("--state-ttl", "state_ttl_ms", default="off", show_default=True, callback=to_ttl_ms, metavar="DURATION",
            help="Drop users idle this long in event time (e.g. 12h, 30d, 400d) from state, with a changelog "
            "tombstone: a user who comes back starts afresh. Measured against the largest event time read from "
            "the user's input partition, so a replay expires users as the daemon would."),
    setting("--on-expire", default="publish", show_default=True, type=click.Choice(["publish", "drop"]),
            help="publish: a last profile with \"expired\": true for each expired user; drop: publish nothing "
            "(a replay's final profiles leave expired users out)."),
)

max_ahead_option = setting(
    "--max-ahead", "max_ahead_ms", default="1d", show_default=True, callback=to_ms, metavar="DURATION",
    help="Dead-letter events stamped more than this after this machine's clock (reason ahead_of_clock; the "
    "commands that read logs offline leave them out, with a warning; 0 turns this off, e.g. for synthetic logs "
    "stamped in the future): the clock idle times are measured to is the largest event time seen, and one event "
    "stamped years ahead would make every user look long gone.")

max_categories_option = setting(
    "--max-categories", default=Settings.max_categories, show_default=True, type=click.IntRange(min=0),
    help="Dead-letter events whose category would be one more than this many distinct ones in state (reason "
    "too_many_categories; 0: no bound). top_categories scores every user against every category, so a producer "
    "writing, say, product titles as categories would slow every batch without end. Raise it for a larger "
    "catalogue, and replay the dead letters.")

state_dtype_option = setting(
    "--state-dtype", default=Settings.state_dtype, show_default=True, type=click.Choice(STATE_DTYPES),
    help="How each user's model state (GRU hidden state and memory) is stored. float16 (the default) takes half "
    "float32's bytes (160 bytes less per user at the default sizes); the model step computes in float32 either way "
    "and published fields differ by rounding only. A restore reads changelog records and snapshots of either, so "
    "switching keeps the state.")

pseudonymize_option = setting(
    "--pseudonymize-key", default="", help="Replace user ids by HMAC-SHA256(key, id) before they reach state or "
    "outputs. The key is never printed; prefer the environment variable to the flag.")

# ----------------------------------------------------------------------------- the daemon's topics

input_topics_option = setting(
    "--input-topics", default="events", show_default=True,
    callback=lambda _c, _p, v: tuple(t.strip() for t in v.split(",") if t.strip()),
    help="Comma-separated input topics, co-partitioned by user id.")
group_id_option = setting(
    "--group-id", default="profiles", show_default=True,
    help="Kafka consumer group; instances with the same id share the partitions.")
state_topic_option = setting(
    "--state-topic", default="", help="Compacted changelog of every user's state, partition for partition with "
    "the inputs; restored from on assignment. [default: <group-id>.state]")
repartition_option = setting(
    "--repartition", is_flag=True,
    help="Re-key every input record by its user id through an internal topic (<group-id>.repartition), as "
    "Kafka Streams does, so producers that send no key or key by session work. Costs a second trip through "
    "Kafka per event. Without it, a record not keyed by its user id is dead-lettered as wrong_partition.")
topic_option = setting(
    "--topic", envvar=env("output-topic"), default="profiles", show_default=True,
    help="The daemon's output topic (its --output-topic).")


# ----------------------------------------------------------------------------- options -> Settings

SETTINGS_FIELDS = frozenset(f.name for f in dataclasses.fields(Settings))


def settings_from(params: dict[str, Any], validate: bool = True, **fixed: Any) -> Settings:
    """The Settings of a command's setting options (`params`, named after the fields; the Kafka group
    becomes `kafka`) and of `fixed` values; a setting that cannot work is a usage error (exit 2)."""
    params = dict(params)
    kafka = kafka_from(params) if "bootstrap_servers" in params else KafkaSettings()
    unknown = set(params) - SETTINGS_FIELDS
    assert not unknown, f"options without a Settings field: {sorted(unknown)}"
    try:
        settings = Settings(kafka=kafka, **params, **fixed)
        if validate:
            settings.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return settings
