"""`profiles bench --soak DURATION`: the daemon's memory over a long run of users who come and go.

An always-on daemon must not grow with every user it has ever seen: with `--state-ttl`, users idle
longer than the TTL in event time leave the state. The soak runs the real daemon (in a thread, on the
brokers `profiles bench` uses) while another process offers generated traffic whose event time covers
`span_days` (two years by default) and whose users arrive, stay active for a while and never return;
every `report_every_s` it reports the process's resident memory, the users held and expired, and the
event time reached. Flat memory with a rising expired count is the pass.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from dataclasses import dataclass

from consumers.daemon import ProfileDaemon
from consumers.loadgen import offer_churning
from consumers.bench import run_daemon_until
from models.update_step import load_updater
from stream.kafka import admin_client, ensure_topics
from stream.metrics import resident_bytes
from stream.settings import KafkaSettings, Settings

SOAK_START_TS_MS = 1_640_995_200_000  # 2022-01-01: event time runs from here over the span


@dataclass
class SoakSample:
    seconds: float  # since the load started
    rss_mib: float
    users_in_state: int
    users_expired: int
    events: int
    event_day: float  # event time reached, in days since the start of the span

    def line(self) -> str:
        return (f"{self.seconds / 60:6.1f} min  RSS {self.rss_mib:7.1f} MiB  users in state {self.users_in_state:>8,}"
                f"  expired {self.users_expired:>9,}  events {self.events:>10,}  event time day {self.event_day:6.1f}")


def soak(*, kafka: KafkaSettings, seconds: float, rate: int, users: int, state_ttl_ms: int, span_days: float = 730.0,
         report_every_s: float = 300.0, partitions: int = 4, device: str = "cpu", seed: int = 0,
         say=print) -> list[SoakSample]:
    """Run the soak; returns the samples (the first at the start, then every `report_every_s`, the last at
    the end of the load, once the daemon has found the input quiet). `users` arrive over the span, each active
    among the newest twentieth of them."""
    if state_ttl_ms <= 0:
        raise ValueError("the soak needs a state TTL (--soak-ttl): without one the state grows by design")
    run_id = uuid.uuid4().hex[:8]
    topic = f"soak-events-{run_id}"
    settings = Settings(kafka=kafka, input_topics=(topic,), output_topic=f"soak-profiles-{run_id}",
                        group_id=f"soak-{run_id}", device=device, session_timeout_ms=6000,
                        state_ttl_ms=state_ttl_ms, emit_embedding=False)
    ensure_topics(admin_client(kafka), {topic: partitions})
    active = max(1, users // 20)
    say(f"soak: {rate:,} events/s for {seconds / 60:g} min, event time over {span_days:g} days, {users:,} users "
        f"arriving (each active among the newest {active:,}), --state-ttl {state_ttl_ms / 86_400_000:g}d")
    ctx = multiprocessing.get_context("spawn")
    go, sent = ctx.Event(), ctx.Value("q", 0)
    loader = ctx.Process(target=offer_churning, daemon=True, args=(
        kafka, topic, rate, seconds, users, active, span_days, SOAK_START_TS_MS, seed, go, sent))
    loader.start()
    samples: list[SoakSample] = []
    clock = {"started": None, "next": 0.0, "quiet_from": None}
    total = int(rate * seconds)

    def sample(d: ProfileDaemon) -> None:
        newest = max(int(d.updater.expiry.clock.max()), SOAK_START_TS_MS)  # the partitions' event-time clocks
        samples.append(SoakSample(
            seconds=time.monotonic() - clock["started"], rss_mib=resident_bytes() / 2**20,
            users_in_state=len(d.updater.state),
            users_expired=int(d.metrics.registry.get_sample_value("profiles_users_expired_total") or 0),
            events=d.stats.events, event_day=(newest - SOAK_START_TS_MS) / 86_400_000))
        say(samples[-1].line())

    def progress(d: ProfileDaemon) -> bool:
        if clock["started"] is None:
            if not d.health.ready:
                return False
            go.set()
            clock["started"] = time.monotonic()
            sample(d)
            clock["next"] = report_every_s
        # Done once the daemon has read all the load and then found the input quiet: the state has settled (the
        # users the last batch's event time left idle past the TTL expired), as it rests after the load. Sampled
        # straight after the last batch, it held them too, as many as that batch's event time spans (on a busy
        # machine, whose batches are bigger, 1,015 users where the settled state holds 270).
        if clock["quiet_from"] is None and not loader.is_alive() and d.stats.records >= sent.value:
            clock["quiet_from"] = d.stats.quiet_polls
        done = clock["quiet_from"] is not None and d.stats.quiet_polls > clock["quiet_from"]
        if done or time.monotonic() - clock["started"] >= clock["next"]:
            sample(d)
            clock["next"] += report_every_s
        return done

    run_daemon_until(settings, load_updater(settings), progress, timeout_s=seconds * 2 + 300)
    loader.join(30)
    if sent.value < total:
        say(f"the load process sent {sent.value:,} of {total:,} events")
    return samples
