"""The published fields' heads: what turns a user's exact statistics (stream/statistics.py) and state into
purchase_propensity, churn_risk and top_categories. ProfileModel (models/profile_model.py) holds one
FieldHeads; models/field_training.py fits it on profiles taken through the serving path."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stream.statistics import CATEGORY_SLOTS, HEAD_FEATURES, SLOT_FEATURES, USER_FEATURES
from stream.tempo import DEFAULT_STEP_MINUTES

CALIBRATION_KNOTS = 6
SESSION_OFF = -30.0  # the session process's bias where it is not fitted: a hazard of e**-30, none
MINUTE_FEATURES = [USER_FEATURES.index(name) for name in
                   ("log_idle_minutes", "log_minutes_since_purchase", "log_minutes_since_cart")]
# Directions the statistics' meaning gives, not fitted (FieldHeads.keep_directions): a longer silence, absolute
# or against the user's usual gap, never makes an event likelier; more events, sessions or recent activity
# never make one less likely. Fitted freely in generated shop 0, the event head weighed log_events at -0.23
# beside the activity statistics: a correlation among that shop's statistics that does not hold elsewhere, and
# ranked other shops' and the real logs' users below days idle (docs/model-journal.md, session 33).
EVENT_FALLS_WITH = [USER_FEATURES.index(name) for name in ("log_idle_minutes", "idle_vs_usual_gap")]
EVENT_RISES_WITH = [USER_FEATURES.index(name) for name in
                    ("log_events", "log_sessions", "log_activity_1d", "log_activity_7d", "log_activity_30d")]
# More of the user's own engagement with a category, recent or all-time, and being the latest one, never make it
# less likely next (the repeat score).
REPEAT_RISES_WITH = [SLOT_FEATURES.index(name) for name in
                     ("log_mass_1h", "log_mass_1d", "log_mass_30d", "log_count", "share", "is_last", "log_visits",
                      "visit_share", "freshness")]
# The repeat score's weight on habit_freshness (stream/statistics.py): set, not fitted, since a training shop's habit
# is one value and cannot say how much it should weigh. In a shop whose users come back to their latest categories
# (stream/habit.py: recency_lean 1) more than in the shop the heads were fitted in, it weighs freshness as
# `profiles calibrate` finds there (its largest step, 20); elsewhere the feature is 0 and nothing moves.
HABIT_RECENCY_WEIGHT = 20.0
HABIT_FRESHNESS = SLOT_FEATURES.index("habit_freshness")
# ... and on habit_count, in a shop whose users come back to the categories they engage with most (counts_lean 1)
# more than in the shop the heads were fitted in: one more unit of the log count per unit of it. Chosen on one
# explorers' log among 1, 2 and 3 (precision@3 over five cuts, the shipped demo: +0.001, +0.000, -0.003 against
# all-time counts, where it was 0.015 behind); more makes the repeat side so sure of the top slot that the second
# and third go to the explore side's guesses.
HABIT_COUNTS_WEIGHT = 1.0
HABIT_COUNT = SLOT_FEATURES.index("habit_count")


def identity_knots(k: int = CALIBRATION_KNOTS) -> torch.Tensor:
    """k knots spanning the usual range of log L: with values equal to them, the calibration changes nothing."""
    return torch.linspace(-6.0, 3.0, k)


IDLE = USER_FEATURES.index("log_idle_minutes")  # the user statistic idle_minutes reads


@dataclass
class FieldInputs:
    """What the field heads read besides the state, for U users (stream/statistics.py builds them)."""

    user: torch.Tensor  # (U, len(USER_FEATURES)) raw user statistics at the profile's clock (heads read HEAD_FEATURES)
    slot_cols: torch.Tensor  # (U, K) long: each category slot's column among the categories scored
    slot_valid: torch.Tensor  # (U, K) bool: the slot holds a category
    slot: torch.Tensor  # (U, K, len(SLOT_FEATURES)) the slots' statistics
    idle_steps: torch.Tensor  # (U,) idle minutes over the shop's typical gap within a visit (stream/tempo.py)

    def part(self, a: int, b: int) -> "FieldInputs":
        """Users a to b."""
        return FieldInputs(self.user[a:b], self.slot_cols[a:b], self.slot_valid[a:b], self.slot[a:b],
                           self.idle_steps[a:b])

    @classmethod
    def from_idle(cls, idle_hours: torch.Tensor) -> "FieldInputs":
        """Inputs of users about whom only the idle time is known (no statistics, no categories)."""
        u, dev = len(idle_hours), idle_hours.device
        user = torch.zeros(u, len(USER_FEATURES), device=dev)
        minutes = idle_hours.clamp(min=0) * 60
        user[:, IDLE] = torch.log1p(minutes)
        return cls(user, torch.zeros(u, CATEGORY_SLOTS, dtype=torch.long, device=dev),
                   torch.zeros(u, CATEGORY_SLOTS, dtype=torch.bool, device=dev),
                   torch.zeros(u, CATEGORY_SLOTS, len(SLOT_FEATURES), device=dev), minutes / DEFAULT_STEP_MINUTES)


SILENCE_MINUTES = 28 * 24 * 60.0  # the scale of the fall after a long silence (models/field_training.py)


def idle_minutes(user: torch.Tensor) -> torch.Tensor:
    """(U,) idle minutes from raw user statistics (FieldInputs.user)."""
    return torch.expm1(user[:, IDLE])


class HazardHead(nn.Module):
    """P(an event within W hours) = 1 - exp(-L(W)), L(W) = exp(f) * (W / 24) ** kappa + the session process
    (below): a Weibull-shaped time-to-event model from the profile's clock (WTTE-RNN's idea, read at one
    moment). One head serves any window, from minutes to weeks: training labels examples on windows drawn
    down to 5 minutes, and a log that ends before the horizon still trains it (the window actually observed
    is the label's W). f = linear(statistics) + small MLP(statistics) + linear(state); the linear part alone
    can reproduce any counting baseline's ranking, the rest learns what counts do not show."""

    def __init__(self, n_features: int, state_size: int, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)
        self.mlp = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.state = nn.Linear(state_size, 1, bias=False)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.state.weight)
        self.log_kappa = nn.Parameter(torch.tensor(-0.5))  # shape < 1: most events come soon after "now"
        # The shape per user (WTTE-RNN predicts both Weibull parameters): what decides the next 15 minutes
        # (a cart mid-session) is not what decides the next week (a habit of buying).
        self.shape = nn.Linear(n_features, 1)
        nn.init.zeros_(self.shape.weight)
        nn.init.zeros_(self.shape.bias)
        # A second process beside the Weibull one: the session going on. Its cumulative hazard,
        # exp(session(x) - idle fade) * (1 - exp(-W / tau)), saturates within about tau (learned: 16 minutes
        # to about an hour in the models of docs/model-journal.md, session 36): it says whether the user comes back
        # within the next minutes or hours (idle 2 minutes with a cart in a real session), where the Weibull
        # part, fitted mostly on weeks, says little; past tau it is a constant the return part outweighs for
        # users idle for days.
        # Off (no hazard at all) until training fits it.
        self.session = nn.Linear(n_features, 1)
        nn.init.zeros_(self.session.weight)
        nn.init.constant_(self.session.bias, SESSION_OFF)
        self.log_session_hours = nn.Parameter(torch.tensor(float(np.log(0.25))))
        # The idle decay: the session is still going on with odds that fall with idle time in the shop's own
        # pace (FieldInputs.idle_steps), so that "5 minutes idle" means the end of a visit in a shop whose users
        # step every half minute and a pause in one whose users step every four (log1p of minutes alone carried
        # the generated shops' pace to the real logs: churn behind days idle there, docs/model-journal.md,
        # session 36). The odds fall as a power of the steps, (1 + idle_steps / scale) ** -power: in both real
        # logs the chance of an event within 15 minutes falls about as a power of the idle minutes (REES46 0.33,
        # 0.11, 0.026 at 1-3, 3-10, 10-30 minutes; Taobao 0.25, 0.16, 0.07), where exp(-idle_steps / scale),
        # fitted at a scale of one step, said a Taobao user idle six steps was as good as gone (session 37).
        # Heads of a checkpoint before format 13 have no decay (load_checkpoint clears idle_decay); of format
        # 13, the exponential one (power_fade cleared).
        self.log_step_scale = nn.Parameter(torch.tensor(float(np.log(30.0))))
        self.register_buffer("idle_decay", torch.tensor(True))
        self.log_fade_power = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("power_fade", torch.tensor(True))
        # The return process after a long silence: its hazard falls further as (1 + idle / scale) ** -power, with
        # idle in real minutes (weeks mean the same in any shop). Not fitted: set after the fit, before the
        # calibration (models/field_training.py, SILENCE_POWER); 0 turns it off, as in heads before format 15.
        self.register_buffer("silence_power", torch.tensor(0.0))
        self.register_buffer("silence_minutes", torch.tensor(SILENCE_MINUTES))
        # Calibration on held-out time: log L -> g(log L), g monotone piecewise linear through the knots
        # (row 0: knots, row 1: their values), extended linearly past the ends; identity untrained.
        knots = identity_knots()
        self.register_buffer("calibration", torch.stack([knots, knots.clone()]))

    def log_hazard(self, x: torch.Tensor, s: torch.Tensor, window_hours: torch.Tensor,
                   idle_steps: torch.Tensor, idle_minutes: torch.Tensor) -> torch.Tensor:
        """(U,) log L(W), calibrated. idle_steps: FieldInputs.idle_steps; idle_minutes: the users' idle time
        (`idle_minutes`), for the fall after a long silence."""
        f = self.linear(x)[:, 0] + self.mlp(x)[:, 0] + self.state(s)[:, 0]
        kappa = (self.log_kappa + self.shape(x)[:, 0].clamp(-3, 3)).exp()
        w = window_hours.clamp(min=1e-3)
        log_return = f + kappa * torch.log(w / 24.0) - self.silence_power * torch.log1p(idle_minutes
                                                                                     / self.silence_minutes)
        decay = torch.where(self.idle_decay, self.idle_fade(idle_steps), 0.0)
        log_session = self.session(x)[:, 0] - decay + torch.log(-torch.expm1(-w / self.log_session_hours.exp()))
        log_l = torch.logaddexp(log_return, log_session)
        return piecewise_linear(log_l, self.calibration[0], self.calibration[1])

    def idle_fade(self, idle_steps: torch.Tensor) -> torch.Tensor:
        """How much the session process's log odds fall after idle_steps (see __init__). Both forms are computed
        and one chosen on the device (torch.where, as for idle_decay): reading the flag on the host would wait for
        the GPU at every call."""
        steps = idle_steps / self.log_step_scale.exp()
        return torch.where(self.power_fade, self.log_fade_power.exp() * torch.log1p(steps), steps)

    @staticmethod
    def probability(log_l: torch.Tensor) -> torch.Tensor:
        """P(at least one event) from log L."""
        return -torch.expm1(-log_l.clamp(max=30).exp())

    @staticmethod
    def log_hazard_of(rate: float) -> float:
        """The log L whose probability is `rate` (in (0, 1)): probability's inverse for one number."""
        return math.log(-math.log1p(-rate))

    @staticmethod
    def nll(log_l: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of labels (1: an event in the window) under log L:
        log P(event) = log(1 - exp(-L)), log P(none) = -L."""
        hazard = log_l.clamp(max=30).exp()
        log_p = torch.log((-torch.expm1(-hazard)).clamp(min=1e-12))
        return -(label * log_p - (1 - label) * hazard).mean()


def piecewise_linear(x: torch.Tensor, knots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The line through (knots, values) at x, extended by the end segments (knots ascending, >= 2)."""
    i = torch.searchsorted(knots, x.detach().contiguous()).clamp(1, len(knots) - 1)
    x0, x1, y0, y1 = knots[i - 1], knots[i], values[i - 1], values[i]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class FieldHeads(nn.Module):
    """The published learned fields, from the user's exact statistics (stream/statistics.py) and state.

    purchase_propensity = P(purchase within its horizon); churn_risk = P(no event within its horizon)
    = 1 - P(event): two HazardHeads. top_categories: RepeatNet's idea: with probability g (a learned gate)
    the user repeats, choosing among their own category slots by a learned score of the slots' decayed
    and all-time counts and recency; else they explore, by the sequence model's category distribution
    over all categories (what follows their recent behaviour, what users like them go on to do).
    """

    def __init__(self, state_size: int, hidden: int) -> None:
        super().__init__()
        n = HEAD_FEATURES  # the leading USER_FEATURES; the others only the stream's own fits weigh
        # Statistics are standardised with the training examples' mean and spread (saved with the model).
        self.register_buffer("feature_mean", torch.zeros(n))
        self.register_buffer("feature_std", torch.ones(n))
        # Heads of a checkpoint before format 10 read the times since as log1p of hours (see USER_FEATURES):
        # load_checkpoint sets this, and `standardise` gives them exactly those numbers from the minutes.
        self.register_buffer("hours_features", torch.tensor(False))
        self.register_buffer("minute_columns", torch.tensor(MINUTE_FEATURES), persistent=False)
        # Heads of a checkpoint before format 12 read follow_pending relative to the top follow-up's share
        # (stream/follow.py: with_follow_ups); load_checkpoint sets this.
        self.register_buffer("relative_pending", torch.tensor(False))
        self.purchase = HazardHead(n, state_size, hidden)
        self.event = HazardHead(n, state_size, hidden)  # any event: churn_risk is its complement
        self.repeat_score = nn.Linear(len(SLOT_FEATURES), 1)
        # The habit (stream/habit.py recency_lean) of the shop the heads were fitted in: they learned its freshness
        # from it, so only a serving shop's lean beyond it reads habit_freshness (update_step.slots).
        self.register_buffer("habit_lean_trained", torch.tensor(0.0))
        self.register_buffer("habit_counts_lean_trained", torch.tensor(0.0))  # ... and its lean toward the counts
        # The sequence model's own say in which of the user's categories comes next (RepeatNet's repeat
        # decoder reads the state): its explore log-probability of the slot's category, weighted.
        self.repeat_explore_weight = nn.Parameter(torch.tensor(0.0))
        self.gate = nn.Linear(n, 1)
        self.gate_state = nn.Linear(state_size, 1, bias=False)
        nn.init.zeros_(self.gate_state.weight)
        # How well the explore side knows this user (explore_fit): in a shop the sequence model was not
        # trained in, it does not, and the gate must lean on the user's own categories instead.
        self.gate_fit = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.gate_fit.weight)
        with torch.no_grad():  # untrained: rank slots by 30-day mass and count, mostly repeat, no exploring
            self.repeat_score.weight.copy_(
                torch.tensor([[0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, HABIT_RECENCY_WEIGHT,
                               HABIT_COUNTS_WEIGHT]]))
            self.repeat_score.bias.zero_()
            self.gate.weight.zero_()
            self.gate.bias.fill_(2.0)
            self.purchase.linear.weight.zero_()
            self.purchase.linear.bias.fill_(-2.0)
            self.event.linear.weight.zero_()
            self.event.linear.weight[0, IDLE] = -0.5
            self.event.linear.bias.fill_(2.5)  # log1p(minutes) ~ log1p(hours) + 4 past an hour

    def keep_directions(self) -> None:
        """Move the event head's weights on the statistics (its return and session processes) back to the
        sides of zero their meaning gives (EVENT_FALLS_WITH, EVENT_RISES_WITH): a projection after each step
        of the fit. Standardising keeps signs (the spreads are positive)."""
        with torch.no_grad():
            for w in (self.event.linear.weight, self.event.session.weight):
                w[:, EVENT_FALLS_WITH] = w[:, EVENT_FALLS_WITH].clamp(max=0)
                w[:, EVENT_RISES_WITH] = w[:, EVENT_RISES_WITH].clamp(min=0)
            w = self.repeat_score.weight
            w[:, REPEAT_RISES_WITH] = w[:, REPEAT_RISES_WITH].clamp(min=0)
            w[:, HABIT_FRESHNESS] = HABIT_RECENCY_WEIGHT  # set, not fitted
            w[:, HABIT_COUNT] = HABIT_COUNTS_WEIGHT

    def standardise(self, user: torch.Tensor) -> torch.Tensor:
        user = user[:, :HEAD_FEATURES]
        # Heads fitted before checkpoint format 10 get the hours they read (a select, not an `if`: no device sync).
        minutes = user.index_select(1, self.minute_columns)
        user = user.index_copy(1, self.minute_columns, torch.where(
            self.hours_features, torch.log1p(torch.expm1(minutes) / 60), minutes))
        return (user - self.feature_mean) / self.feature_std

    def repeat_log_probs(self, inputs: FieldInputs, explore_at_slots: torch.Tensor) -> torch.Tensor:
        """(U, K) log P(slot | repeat), -inf at empty slots. explore_at_slots: (U, K) the sequence model's
        log-probabilities of the slots' categories."""
        score = self.repeat_score(inputs.slot)[..., 0] + self.repeat_explore_weight * explore_at_slots.clamp(min=-30)
        return torch.log_softmax(score.masked_fill(~inputs.slot_valid, -1e9), dim=1).masked_fill(
            ~inputs.slot_valid, float("-inf"))

    def repeat_gate(self, x: torch.Tensor, s: torch.Tensor, inputs: FieldInputs, explore_at_slots: torch.Tensor,
                    n_categories: int | torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        """(U,) P(repeat); 0 for users without categories of their own. explore_at_slots: (U, K) the explore
        side's log-probabilities of the slots' categories, among n_categories (an int, or (U,)). shift: a move of
        the gate's bias to try (models.field_training.ranking_precision)."""
        fit = explore_fit(inputs, explore_at_slots, n_categories)
        g = torch.sigmoid(self.gate(x)[:, 0] + self.gate_state(s)[:, 0] + self.gate_fit(fit[:, None])[:, 0] + shift)
        return g * inputs.slot_valid.any(dim=1)


SHARE = SLOT_FEATURES.index("share")


def explore_fit(inputs: FieldInputs, explore_at_slots: torch.Tensor, n_categories: int | torch.Tensor
                ) -> torch.Tensor:
    """(U,) how much likelier than uniform the explore side finds the user's own categories: the
    share-weighted mean of log(n_categories * P_explore(slot)), 0 for users without categories. High where
    the sequence model has learned this shop's categories; low where it has not (another shop, new names)."""
    w = inputs.slot[..., SHARE].clamp(min=0) * inputs.slot_valid
    log_n = torch.as_tensor(n_categories, dtype=explore_at_slots.dtype, device=explore_at_slots.device)
    log_n = log_n.clamp(min=1).log().reshape(-1, 1)  # (1, 1) or (U, 1)
    lift = (explore_at_slots.clamp(min=-30) + log_n).clamp(-10, 10)
    return (w * lift).sum(dim=1) / w.sum(dim=1).clamp(min=1e-6)
