"""What every `profiles` command shares: help that is never cut at a hyphen, one-line errors, the
stop signals, the broker check, writing to a stdout that may close."""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator

import click

from stream.settings import KafkaSettings

log = logging.getLogger("profiles")

# Repeatable options that name event sources: several may follow one of them (ProfilesCommand).
SOURCE_OPTIONS = ("--events", "--train-events")

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
    """A command; `--events a.jsonl b.jsonl` (what a shell glob gives) reads as `--events a.jsonl --events b.jsonl`
    where the command's own arguments (inspect's USER) were given before it."""

    context_class = ProfilesContext

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self._sources_spread(args))

    def _sources_spread(self, args: list[str]) -> list[str]:
        arguments = [p for p in self.params if isinstance(p, click.Argument)]
        if any(a.nargs < 0 for a in arguments):  # replay's SOURCE...: every bare word is one already
            return args
        options = [p for p in self.params if isinstance(p, click.Option)]
        repeatable = {opt for p in options if p.multiple for opt in p.opts if opt in SOURCE_OPTIONS}
        with_value = {opt for p in options if not p.is_flag and not p.count for opt in p.opts}
        out: list[str] = []
        bare, spreading, value_next = 0, None, False
        for i, arg in enumerate(args):
            if arg == "--":
                return out + args[i:]
            if value_next:  # an option's own value, as given
                out.append(arg)
                value_next = False
                continue
            if not arg.startswith("-"):
                if spreading:
                    out += [spreading, arg]
                else:
                    out.append(arg)
                    bare += 1
                continue
            out.append(arg)
            option = arg.split("=", 1)[0]
            value_next = option in with_value and "=" not in arg
            given = bare >= sum(a.nargs for a in arguments)
            spreading = option if option in repeatable and given else None
        return out


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
        except BrokenPipeError:  # `--out - | head`: the reader has what it wanted
            stdout_closed()
        except Exception as exc:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            ours = type(exc).__module__.split(".")[0] in ("stream", "consumers", "models")
            message = str(exc) if ours else f"{type(exc).__name__}: {exc} (--log-level debug shows where)"
            raise click.ClickException(message.replace("\n", " ")) from None


# The decorators the command modules use, so that each command formats its help as the group does.
command = functools.partial(click.command, cls=ProfilesCommand)
group = functools.partial(click.group, cls=ProfilesGroup)


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


def check_broker(kafka: KafkaSettings, connect_timeout_s: float) -> None:
    """One line and exit 1 for an unreachable broker, before any other client starts retrying."""
    from stream.kafka import BrokerUnreachable, check_reachable

    try:
        check_reachable(kafka, connect_timeout_s)
    except BrokerUnreachable as exc:
        raise click.ClickException(str(exc)) from None


def check_broker_for(kafka: KafkaSettings, sources: tuple[str, ...] | list[str], connect_timeout_s: float,
                     writes_topic: bool = False) -> None:
    """check_broker where a command reads a kafka:// source or writes to a topic (files need no broker).
    Called before the model's imports, which take seconds: a broker that is down shows at once."""
    from stream.sources import SourceError, parse_kafka_uri

    for source in sources:  # a mistyped address is the mistake to name, whether or not a broker answers
        if source.startswith("kafka://"):
            try:
                parse_kafka_uri(source)
            except SourceError as exc:
                raise click.ClickException(str(exc)) from None
    if writes_topic or any(s.startswith("kafka://") for s in sources):
        check_broker(kafka, connect_timeout_s)


def kafka_error(kafka: KafkaSettings, exc: Exception) -> click.ClickException:
    """A StreamError or KafkaException as one line for the user, with secret values scrubbed."""
    from confluent_kafka import KafkaException

    text = f"Kafka error: {exc.args[0].str()}" if isinstance(exc, KafkaException) else str(exc)
    return click.ClickException(kafka.scrub(text))


@contextlib.contextmanager
def reading_sources(kafka: KafkaSettings | None) -> Iterator[None]:
    """Around reading event logs (models.dataset.read_records): a source that cannot be read (SourceError, or a
    kafka:// source's StreamError) becomes one Error line, secrets scrubbed where it was read with Kafka settings."""
    from stream.kafka import StreamError
    from stream.sources import SourceError

    try:
        yield
    except (SourceError, StreamError) as exc:
        raise (kafka_error(kafka, exc) if kafka is not None else click.ClickException(str(exc))) from None


def write_lines(lines: list[bytes]) -> None:
    sys.stdout.buffer.write(b"".join(lines))
    sys.stdout.buffer.flush()


def stdout_closed() -> None:
    """`profiles tail | head`: the reader went away; end quietly, as kcat and cat do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's final flush must not raise again
    sys.exit(0)
