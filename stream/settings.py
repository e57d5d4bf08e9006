"""One frozen settings object, built once by the CLI and passed down explicitly.

Secrets (SASL passwords, key material, tokens) live inside `KafkaSettings.extra`
and never appear in `repr()`, logs or error messages: everything that prints a
Kafka config goes through `KafkaSettings.redacted()`.
"""

from __future__ import annotations

import itertools
import logging
import re
import shlex
from dataclasses import dataclass, field

# Property names whose values are never printed: a name containing any of these, in any case and
# with any separator. Generous on purpose: masking a harmless value (ssl.key.location) costs nothing,
# printing a password costs a rotation. "pasw", "passw", "pwd" and "pass" catch misspellings.
_SECRET_MARKERS = ("pass", "pasw", "pwd", "secret", "token", "key", "jaas", "oauthbearer.config", "private",
                   "credential", "auth")
# ...and a name with a part within one edit of these (two for the long ones; a swap of neighbours is one):
# sasl.pasword, client.secert, x.credentails.
_SECRET_WORDS = ("password", "passwd", "secret", "token", "credentials")


def _near(word: str, target: str, limit: int) -> bool:
    """Edit distance of `word` and `target` at most `limit`; a swap of two neighbours is one edit
    (optimal string alignment; names are short: plain DP)."""
    if abs(len(word) - len(target)) > limit:
        return False
    before, row = None, list(range(len(target) + 1))
    for i in range(1, len(word) + 1):
        current = [i] + [0] * len(target)
        for j in range(1, len(target) + 1):
            cost = word[i - 1] != target[j - 1]
            current[j] = min(row[j] + 1, current[j - 1] + 1, row[j - 1] + cost)
            if before is not None and i > 1 and j > 1 and word[i - 1] == target[j - 2] and word[i - 2] == target[j - 1]:
                current[j] = min(current[j], before[j - 2] + 1)
        before, row = row, current
    return row[-1] <= limit


def is_secret_key(key: str) -> bool:
    """True for properties that carry, or may carry, secret material, known to librdkafka or not."""
    k = key.lower()
    if any(marker in k for marker in _SECRET_MARKERS):
        return True
    return any(len(part) >= 4 and _near(part, word, 2 if len(word) >= 8 else 1)
               for part in re.split(r"[._\-]", k) for word in _SECRET_WORDS)


def split_kafka_config_env(text: str) -> list[str]:
    """The entries of PROFILES_KAFKA_CONFIG: KEY=VALUE entries separated by whitespace, quoted as in a
    POSIX shell where a value holds spaces (sasl.password="a b"). Errors never echo the text."""
    try:
        return shlex.split(text)
    except ValueError:
        raise ValueError("PROFILES_KAFKA_CONFIG: unbalanced quotes (quote values with spaces as in a shell: "
                         "key=\"a b\")") from None


def parse_kafka_config(pairs: tuple[str, ...] | list[str]) -> tuple[tuple[str, str], ...]:
    """Parse repeated `KEY=VALUE` strings. Error messages name the key, never the value."""
    parsed: list[tuple[str, str]] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            # The whole string may be a secret typed without '=': do not echo it.
            raise ValueError("--kafka-config expects KEY=VALUE (got an entry without '=')")
        parsed.append((key, value))
    return tuple(parsed)


def read_kafka_config_file(path: str) -> tuple[tuple[str, str], ...]:
    """librdkafka properties from a Java-style properties file (`key=value` lines, `#` comments), the
    form Kafka clients are usually configured with; mount it from a Kubernetes Secret. Values may
    contain spaces and '='. Error messages name the line number, never a value."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read --kafka-config-file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # a keystore or other binary file given by mistake
        raise ValueError(f"--kafka-config-file {path} is not UTF-8 text of key=value lines (byte {exc.start} "
                         "is not UTF-8)") from None
    parsed: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--kafka-config-file {path}, line {number}: expected key=value")
        parsed.append((key.strip(), value.strip()))
    return tuple(parsed)


# librdkafka's own log goes through Python logging instead of straight to stderr (levels and rate
# limit: stream.kafka.configure_librdkafka_log).
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = "localhost:9092"
    # Extra librdkafka properties (TLS, SASL, tuning), applied to every client.
    extra: tuple[tuple[str, str], ...] = ()

    def client_config(self, defaults: dict[str, object] | None = None, **overrides: object) -> dict[str, object]:
        """The librdkafka config for one client: bootstrap, the caller's tuning defaults, user extras, then
        the caller's overrides.

        The caller's overrides are the settings the pipeline's correctness depends on
        (e.g. enable.auto.commit=false), so they win over user extras; its defaults are tuning a user may
        change (--kafka-config), so user extras win over them.
        """
        conf: dict[str, object] = {"bootstrap.servers": self.bootstrap_servers, "logger": LIBRDKAFKA_LOG,
                                   **(defaults or {})}
        conf.update(dict(self.extra))
        conf.update(overrides)
        return conf

    def max_message_bytes(self) -> int:
        """The producer's record size limit: the user's message.max.bytes, else librdkafka's default."""
        try:
            return int(dict(self.extra).get("message.max.bytes", 1_000_000))
        except ValueError:
            return 1_000_000  # librdkafka refuses the value itself, with its own message

    def redacted(self) -> dict[str, str]:
        conf = {"bootstrap.servers": self.bootstrap_servers}
        for key, value in self.extra:
            conf[key] = "***" if is_secret_key(key) else value
        return conf

    def scrub(self, text: str) -> str:
        """`text` (an error message) with every secret value, and each word of one, replaced by ***."""
        values = {v for k, v in self.extra if is_secret_key(k) and v}
        values |= {word for v in values for word in v.split() if len(word) >= 3}
        for value in sorted(values, key=len, reverse=True):  # whole values before their parts
            text = text.replace(value, "***")
        return text

    def __repr__(self) -> str:  # never leak secrets through a stray print or log
        return f"KafkaSettings({self.redacted()!r})"

    __str__ = __repr__


GUARANTEES = ("at-least-once", "exactly-once")
STATE_DTYPES = ("float32", "float16")  # how the model state may be stored (--state-dtype)
ON_EXPIRE = ("publish", "drop")


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    input_topics: tuple[str, ...] = ("events",)
    output_topic: str = "profiles"
    dlq_topic: str = ""  # empty: derived as "<output_topic>.dlq"
    group_id: str = "profiles"
    model_path: str | None = None
    device: str = "auto"
    # CPU threads for torch's kernels. 1 by default: the per-batch ops are small, and a second
    # thread mostly competes with decoding and librdkafka (500k-event replay: 3.5 s with 1, 5.1 s with 2).
    torch_threads: int = 1
    # ...except the GRU over a batch of 4096+ events, the one kernel big enough to use more: 0 = every
    # usable core (500k-event replay on 2 cores: the GRU pass 0.79 s -> 0.4 s).
    gru_threads: int = 0
    batch_max_events: int = 5000
    batch_max_ms: int = 200
    max_event_bytes: int = 65536
    emit_embedding: bool = True
    # Calibrate the published probabilities on the shop's own outcomes (models/stream_calibration.py).
    stream_calibration: bool = True
    next_items: int = 0  # top-k next item ids in each profile (needs a trained model); 0 leaves them out
    # Publish a user at most once per this much wall-clock time (its latest profile; 0: after every batch).
    publish_interval_ms: int = 0
    # Re-publish users idle this long in event time (their churn risk has moved); 0 disables.
    idle_rescore_after_ms: int = 24 * 3600 * 1000
    # Events stamped more than this after the machine's clock are dead-lettered (ahead_of_clock); 0: never.
    max_ahead_ms: int = 24 * 3600 * 1000
    # Events that would make the table name more distinct categories than this are dead-lettered
    # (too_many_categories); 0: no bound.
    max_categories: int = 100_000
    restore_from: str | None = None  # a state snapshot directory (from `profiles replay --state-out`)
    # Where a group starts on an input topic the snapshot records no offsets for (a replay of files):
    # "" (refuse to guess), "earliest", "latest", or epoch ms (the first record written at or after it).
    snapshot_start: str = ""
    # Drop users idle this long in event time from state, with a changelog tombstone (0: never; stream/expiry.py)...
    state_ttl_ms: int = 0
    # ...after publishing a last profile that says "expired": true (publish), or publishing nothing (drop).
    on_expire: str = "publish"
    # How the model state is stored per user: float16 (half float32's bytes; see docs/operations.md), or float32.
    state_dtype: str = "float16"
    metrics_port: int | None = None
    metrics_address: str = "0.0.0.0"
    # Kafka consumer group session timeout. The broker evicts a member that is silent this long.
    session_timeout_ms: int = 10000
    # The group evicts a member that does not poll for this long. Batches are paced to a quarter of it
    # (see BatchPacer); a partition restore on assignment must also fit in it.
    max_poll_interval_ms: int = 300_000
    # /healthz turns false when the main loop has not come round for this long (a batch's work included).
    stall_after_s: float = 60.0
    # Events whose event_id is among the user's last this-many events are duplicates: applied once.
    dedupe_window: int = 8
    # Compacted topic holding each user's state, partition for partition with the inputs ("" = <group_id>.state).
    state_topic: str = ""
    # Replace user ids by HMAC-SHA256(key, id) before they reach state or outputs ("" = off).
    pseudonymize_key: str = field(default="", repr=False)
    # at-least-once: offsets committed after the output is acknowledged; exactly-once: output, changelog
    # and offsets in one Kafka transaction per batch. State is exactly-once either way (watermarks).
    guarantee: str = "at-least-once"
    transactional_id: str = ""  # exactly-once: "" = <group_id>-<random>, fresh per start
    # Re-key every input record by its user id through an internal topic (<group_id>.repartition), as
    # Kafka Streams does, so producers that send no key (or key by session) work: stream/repartition.py.
    repartition: bool = False
    # Upper bound on how long a SIGTERM/SIGINT shutdown may take before we give up flushing.
    shutdown_timeout_s: float = 30.0

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.output_topic}.dlq"

    @property
    def changelog_topic(self) -> str:
        return self.state_topic or f"{self.group_id}.state"

    @property
    def repartition_topic(self) -> str:
        """The internal topic input records are re-keyed through (--repartition)."""
        return f"{self.group_id}.repartition"

    @property
    def state_topics(self) -> tuple[str, ...]:
        """The topics whose records the state step applies (its watermarks' slots, the changelog's partitions):
        the inputs, or with --repartition the internal topic they are re-keyed into."""
        return (self.repartition_topic,) if self.repartition else self.input_topics

    @property
    def subscribed_topics(self) -> tuple[str, ...]:
        return (*self.input_topics, self.repartition_topic) if self.repartition else self.input_topics

    def describe(self) -> dict[str, object]:
        """Printable view of the settings (secrets redacted)."""
        return {
            "kafka": self.kafka.redacted(),
            "input_topics": list(self.input_topics),
            "output_topic": self.output_topic,
            "dlq_topic": self.dead_letter_topic,
            "state_topic": self.changelog_topic,
            "repartition": self.repartition_topic if self.repartition else "off",
            "group_id": self.group_id,
            "model": self.model_path or "(untrained, freshly initialised)",
            "device": self.device,
            "torch_threads": self.torch_threads or "torch's default",
            "gru_threads": self.gru_threads or "usable cores",
            "batch_max_events": self.batch_max_events,
            "batch_max_ms": self.batch_max_ms,
            "max_event_bytes": self.max_event_bytes,
            "embedding": self.emit_embedding,
            "next_items": self.next_items,
            "stream_calibration": self.stream_calibration,
            "publish_interval": f"{self.publish_interval_ms / 1000:g}s" if self.publish_interval_ms else "every batch",
            "idle_rescore_after": f"{self.idle_rescore_after_ms / 3_600_000:g}h" if self.idle_rescore_after_ms else "off",
            "metrics": f"{self.metrics_address}:{self.metrics_port}" if self.metrics_port else "off",
            "restore_from": self.restore_from or "-",
            "state_ttl": f"{self.state_ttl_ms / 86_400_000:g}d (on expiry: {self.on_expire})" if self.state_ttl_ms
            else "off",
            "pseudonymize": "on (key not shown)" if self.pseudonymize_key else "off",
            "dedupe_window": self.dedupe_window,
            "state_dtype": self.state_dtype,
            "guarantee": self.guarantee,
            "max_poll_interval_ms": self.max_poll_interval_ms,
        }

    def validate(self) -> None:
        """Raise ValueError with a user-facing message for settings that cannot work."""
        if not self.input_topics or any(not t for t in self.input_topics):
            raise ValueError("--input-topics must name at least one topic")
        if self.batch_max_events < 1:
            raise ValueError("--batch-max-events must be >= 1")
        if self.batch_max_ms < 1:
            raise ValueError("--batch-max-ms must be >= 1")
        if self.max_event_bytes < 64:
            raise ValueError("--max-event-bytes must be >= 64")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError("--device must be auto, cpu or cuda")
        if self.guarantee not in GUARANTEES:
            raise ValueError(f"--guarantee must be one of {', '.join(GUARANTEES)}")
        if self.dedupe_window < 0:
            raise ValueError("--dedupe-window must be >= 0")
        if self.torch_threads < 0:
            raise ValueError("--torch-threads must be >= 0")
        if self.gru_threads < 0:
            raise ValueError("--gru-threads must be >= 0")
        if self.max_poll_interval_ms < self.session_timeout_ms:
            raise ValueError("--max-poll-interval-ms must be >= --session-timeout-ms (a Kafka client rule)")
        if self.publish_interval_ms < 0:
            raise ValueError("--publish-interval must be >= 0")
        if self.idle_rescore_after_ms < 0:
            raise ValueError("--idle-rescore-after must be >= 0")
        if self.state_ttl_ms < 0:
            raise ValueError("--state-ttl must be a positive duration, or off")
        if self.on_expire not in ON_EXPIRE:
            raise ValueError(f"--on-expire must be one of {', '.join(ON_EXPIRE)}")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"--state-dtype must be one of {', '.join(STATE_DTYPES)}")
        if {self.output_topic, self.dead_letter_topic, self.changelog_topic} & set(self.subscribed_topics):
            raise ValueError("the output, dead-letter and state topics must differ from the input topics")
        # One topic for two of them would mix raw dead letters or changelog records into the profiles readers
        # take as profiles (`profiles get` printed a dead letter as a user's profile).
        named = {"--output-topic": self.output_topic, "--dlq-topic": self.dead_letter_topic,
                 "--state-topic": self.changelog_topic}
        for (a, ta), (b, tb) in itertools.combinations(named.items(), 2):
            if ta == tb:
                raise ValueError(f"{a} and {b} are both {ta!r}: the output, dead-letter and state topics must "
                                 "be three different topics")
        if self.repartition and self.restore_from:
            raise ValueError("--restore-from cannot be combined with --repartition (a snapshot's users are placed "
                             "by the input partitions, re-keyed users by the repartition topic's): start without it")

