"""The shop's pace (stream/tempo.py): the geometric mean of the gaps within its users' visits, counted exactly
over the users in state whatever the batches, erasures and restores; and the heads' session processes, which
read idle time in it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consumers.model_info import checkpoint_info, info_lines
from models.checkpoint_io import load_checkpoint, save_checkpoint, untrained
from models.field_heads import FieldInputs, HazardHead
from models.profile_model import ModelConfig
from models.update_step import ProfileUpdater
from stream.statistics import HEAD_FEATURES, USER_FEATURES
from stream.tempo import DEFAULT_STEP_MINUTES, ShopTempo
from tests.helpers import DEVICE, as_older_checkpoint, updater_fed

T0 = 1_700_000_000_000
MINUTE = 60_000


def visits() -> list[dict]:
    """a: gaps of 0.5 and 1 minute, a new session two hours later (not a step), then 2 minutes; b: 4 minutes;
    c: one event (no gap); d: two events in the same millisecond (a step of the 1-second floor)."""
    at = {"a": [0, 30_000, 90_000, 90_000 + 120 * MINUTE, 90_000 + 122 * MINUTE], "b": [0, 4 * MINUTE], "c": [0],
          "d": [0, 0]}
    events = [{"user_id": user, "type": "click", "ts": T0 + t, "item_id": "i1", "category": "tents"}
              for user, times in at.items() for t in times]
    events.sort(key=lambda e: e["ts"])
    return [{"event_id": f"e{n}", **e} for n, e in enumerate(events)]


def rebuilt(updater: ProfileUpdater) -> tuple[float, int]:
    fresh = ShopTempo()
    fresh.rebuild(updater.state.columns, len(updater.state))
    return fresh.log_minutes, fresh.steps


def test_the_shops_pace_is_the_geometric_mean_of_its_in_visit_gaps_whatever_the_batches():
    steps = [0.5, 1.0, 2.0, 4.0, 1 / 60]
    expected = float(np.exp(np.mean(np.log(steps))))
    for size in (100, 3, 1):
        updater = updater_fed(visits(), [size])
        tempo = updater.state.tempo
        assert tempo.steps == len(steps), size
        assert tempo.step_minutes == pytest.approx(expected, rel=1e-5), size
        assert (tempo.log_minutes, tempo.steps) == pytest.approx(rebuilt(updater), rel=1e-6)
    # Erased users take their gaps with them; a restore counts the rows again.
    updater.state.forget(["b", "d"])
    assert updater.state.tempo.steps == 3 and updater.state.tempo.step_minutes == pytest.approx(1.0, rel=1e-5)
    restored = ProfileUpdater(untrained(), torch.device(DEVICE), max_event_bytes=65536, emit_embedding=False)
    restored.state.restore(updater.state.snapshot())
    assert restored.state.tempo.steps == 3 and restored.state.tempo.step_minutes == pytest.approx(1.0, rel=1e-5)
    assert ShopTempo().step_minutes == DEFAULT_STEP_MINUTES  # no visit of two events yet


def test_users_who_expire_or_start_afresh_after_the_ttl_take_their_gaps_with_them():
    """With --state-ttl of an hour, event by event: a's return two hours later starts its row afresh and b, c and
    d expire, so the only gap left is a's 2 minutes after its return. (In one batch, a's return is no return: the
    gaps are counted as the rows hold them either way.)"""
    for size in (1, 100):
        updater = updater_fed(visits(), [size], state_ttl_ms=60 * MINUTE)
        tempo = updater.state.tempo
        assert (tempo.log_minutes, tempo.steps) == pytest.approx(rebuilt(updater), rel=1e-6)
        if size == 1:
            assert tempo.steps == 1 and tempo.step_minutes == pytest.approx(2.0, rel=1e-5)


def test_the_heads_read_idle_time_in_the_shops_pace():
    updater = updater_fed(visits(), [100])
    rows = np.arange(len(updater.state))
    now = T0 + 90_000 + 152 * MINUTE
    inputs = updater.field_inputs(rows, now)
    idle_minutes = (now - updater.state.last_ts[rows]) / MINUTE
    assert inputs.idle_steps.cpu().numpy() == pytest.approx(idle_minutes / updater.state.tempo.step_minutes, rel=1e-4)
    assert np.expm1(inputs.user[:, USER_FEATURES.index("log_idle_minutes")].cpu().numpy()) == pytest.approx(
        idle_minutes, rel=1e-4)


def test_the_session_process_fades_with_idle_time_in_the_shops_pace_and_not_before_format_13(tmp_path):
    """Two users alike but for their idle time in the shop's pace: within the next half hour the one idle for
    more steps is less likely to come back. Heads of an earlier checkpoint have no such term, and keep reading
    what they were fitted on when saved again."""
    model = untrained(ModelConfig(hidden_size=4, memory_size=4, item_buckets=64, category_buckets=64,
                                  query_buckets=64)).model
    head = model.fields.event
    with torch.no_grad():
        head.linear.bias.fill_(-30.0)  # no return process: the session going on alone
        head.session.bias.fill_(0.0)
        head.log_step_scale.fill_(float(np.log(2.0)))
    x, s, window = torch.zeros(2, HEAD_FEATURES), torch.zeros(2, 8), torch.full((2,), 0.5)
    idle_steps = torch.tensor([1.0, 10.0])
    with torch.no_grad():
        p = HazardHead.probability(head.log_hazard(x, s, window, idle_steps, torch.zeros(2)))
    assert p[0] > p[1] + 0.1
    save_checkpoint(tmp_path / "now.pt", model, "v13")
    as_older_checkpoint(tmp_path / "now.pt", tmp_path / "old.pt", 12,
                        drop=("fields.purchase.idle_decay", "fields.purchase.log_step_scale",
                              "fields.event.idle_decay", "fields.event.log_step_scale"))
    save_checkpoint(tmp_path / "again.pt", load_checkpoint(tmp_path / "old.pt").model, "v12-again")
    for name, fades in (("now.pt", True), ("old.pt", False), ("again.pt", False)):
        loaded = load_checkpoint(tmp_path / name).model.fields.event
        with torch.no_grad():
            q = HazardHead.probability(loaded.log_hazard(x, s, window, idle_steps, torch.zeros(2)))
        assert (q[0] > q[1] + 0.1) == fades, name
        if not fades:
            assert float(q[0]) == pytest.approx(float(q[1]))
    # `profiles model info` says which fields read the pace.
    assert checkpoint_info(str(tmp_path / "now.pt"))["pace_decay"] == {"purchase_propensity": pytest.approx(30.0),
                                                                         "churn_risk": pytest.approx(2.0)}
    assert checkpoint_info(str(tmp_path / "old.pt"))["pace_decay"] == {"purchase_propensity": None, "churn_risk": None}
    assert any("not read" in line for line in info_lines(checkpoint_info(str(tmp_path / "old.pt"))))
    inputs = FieldInputs.from_idle(torch.tensor([2.0]))
    assert float(inputs.idle_steps[0]) == pytest.approx(120 / DEFAULT_STEP_MINUTES)


def test_the_session_odds_fall_as_a_power_of_the_idle_steps_and_exponentially_in_format_13(tmp_path):
    """Format 14's fade: the session process's odds fall as (1 + steps / scale) ** -power, so ten times the
    steps past the scale cost about a factor of ten at power 1, as the real logs' chance of an event falls
    with idle minutes. A format 13 checkpoint keeps the exponential fade it was fitted with, exp(-steps / scale),
    saved again or not; `profiles model info` says which."""
    model = untrained(ModelConfig(hidden_size=4, memory_size=4, item_buckets=64, category_buckets=64,
                                  query_buckets=64)).model
    for head in (model.fields.purchase, model.fields.event):
        with torch.no_grad():
            head.linear.bias.fill_(-60.0)  # no return process: the session going on alone
            head.session.bias.fill_(0.0)
            head.log_step_scale.fill_(0.0)  # a scale of one step
    x, s, window = torch.zeros(4, HEAD_FEATURES), torch.zeros(4, 8), torch.full((4,), 0.5)
    idle_steps = torch.tensor([1.0, 5.0, 9.0, 99.0])

    def log_l(fields) -> torch.Tensor:
        with torch.no_grad():
            return fields.event.log_hazard(x, s, window, idle_steps, torch.zeros(4))

    now = log_l(model.fields)
    assert float(now[0] - now[1]) == pytest.approx(np.log(6 / 2), abs=1e-4)
    assert float(now[2] - now[3]) == pytest.approx(np.log(100 / 10), abs=1e-4)
    save_checkpoint(tmp_path / "now.pt", model, "v14")
    as_older_checkpoint(tmp_path / "now.pt", tmp_path / "v13.pt", 13,
                        drop=("fields.purchase.power_fade", "fields.purchase.log_fade_power",
                              "fields.event.power_fade", "fields.event.log_fade_power"))
    save_checkpoint(tmp_path / "again.pt", load_checkpoint(tmp_path / "v13.pt").model, "v13-again")
    for name in ("v13.pt", "again.pt"):
        older = log_l(load_checkpoint(tmp_path / name).model.fields)
        assert float(older[0] - older[1]) == pytest.approx(4.0, abs=1e-4), name  # exp(-steps): 5 - 1 steps
    assert checkpoint_info(str(tmp_path / "now.pt"))["pace_fade_power"] == {"purchase_propensity": pytest.approx(1.0),
                                                                              "churn_risk": pytest.approx(1.0)}
    assert any("** -1" in line for line in info_lines(checkpoint_info(str(tmp_path / "now.pt"))))
    assert checkpoint_info(str(tmp_path / "v13.pt"))["pace_fade_power"] == {"purchase_propensity": None,
                                                                              "churn_risk": None}
    assert any("fades over 1 in-visit gaps" in line for line in info_lines(checkpoint_info(str(tmp_path / "v13.pt"))))
