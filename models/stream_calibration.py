"""The shop's own outcomes as a calibration of purchase_propensity and churn_risk (docs/model.md, "Calibrated by
the stream").

A model trained in one shop ranks another's users well, but its probabilities carry its training shop's rates
(0.06-0.22 off in unlike worlds: docs/model-journal.md, session 53). The daemon sees what followed: two weeks
after an anchor it knows who among the users it held then came back and who bought. The update step records
that (stream/outcomes.py) and, at each anchor, fits per head an affine map of the logit, a + b * logit(p), on
the latest matured anchors, kept only where it beats the identity by MAP_GATE_NATS of log likelihood (where the
model already fits the shop, a map fitted on a few thousand users only adds noise). churn_risk's level also
follows how the shop moved since that anchor (with_drift), and where the statistics the simple rules read, weighed
on a sample of the users (stream/anchor_samples.py), fit the outcomes clearly better, they join the map
(with_statistics). The map touches what is published, never the state: the state stays exactly-once and
independent of it.

Batching cannot move the map's inputs: a batch that crosses an anchor is applied in two parts split at it
(each user's events stay in time order), records are taken from each user's state just before its first
event past the anchor, and the users silent since before an anchor are said from their unchanged state when
it matures, after every event before the next anchor and before any after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch

from models.category_calibration import (STEADY_WEEKS, category_terms, cross_validated, full_weights, judged,
                                         over_weeks, passes, steady_gain, week_weights)
from models.next_event_evaluation import roc_auc
from stream import statistics
from stream.anchor_samples import (
    CATEGORY_SAMPLE_PER_PARTITION, LOGIT_COLUMNS, RULE_STATISTICS, SAMPLED_STATISTICS, STATISTIC_COLUMNS, STATISTICS,
    WEEK_LOGIT_COLUMN, WIDTH, leading, sample_rows,
)
from stream.events import PURCHASE, EventColumns
from stream.outcomes import (
    ANCHOR_MS, BINS, HEADS, KEPT, MATURES_AFTER, PHASES, PURCHASE_SERIES, PURCHASE_WINDOW_MINUTES, RATE_ANCHORS,
    SERIES_HEAD, WEEK_SERIES, anchor_of, bin_logits, logit_bins,
)
from stream.profiles import CHURN_HORIZON_HOURS, PURCHASE_HORIZON_HOURS
from stream.state import StateTable

log = logging.getLogger(__name__)

# The identity is kept unless the map gains MAP_GATE_NATS (below) of log likelihood on the matured anchors' users
# and, per head (HEADS order), GATE_NATS_PER_USER on average (purchase_propensity's about a third of a logit's shift at
# p = 0.3): in the demo's own shops its map gained 0.0004-0.006 nats per user and made purchase_propensity worse (a
# shop drifts in the weeks between the anchors and the clock); in nine worlds unlike its training shop 0.011-0.26,
# and made both heads better. churn_risk's map made it better in the demo's own shops too (shop 0's 10,000 other
# users: 0.003 nats per user, ECE 0.032 -> 0.024 over four cuts; docs/model-journal.md, session 61): none.
GATE_NATS = 15.0
GATE_NATS_PER_USER = (0.008, 0.0)
# The affine map of the matured anchors' counts, per head: churn_risk's from 7 nats, a likelihood-ratio test of
# its two parameters at p < 0.001 (twice the gain is chi-square with 2 degrees of freedom where the identity is
# right: 13.8 at 0.001). At 15 it kept the identity where the model was too sure: in the project's held-out
# shop 1 a fit of slope 0.92 over 3,000 users gained 12 nats (churn ECE 0.040 / 0.044 / 0.041 -> 0.028 / 0.020 /
# 0.031 at three of four cuts; shop 0 0.043 -> 0.029 at one). No map moved in the 24 worlds, the real slices or
# the first-month logs: theirs gain more than 15 nats or less than 7. Models trained in 12 of those worlds: three
# cuts moved, subscribe 0.029 -> 0.022, petsupplies 0.043 -> 0.039, mealkits 0.019 -> 0.038 (a trend the map's
# level lags); in three worlds written after the choice, one, nestling's trained model 0.021 -> 0.035 (its level
# after a shop-wide stock-up; docs/model-journal.md, session 71). purchase_propensity's stays at GATE_NATS.
MAP_GATE_NATS = (GATE_NATS, 7.0)
RIDGE = 1.0  # pulls (a, b) toward the identity (0, 1): a bin holding every user cannot push b off to infinity
MINUTE_MS = 60_000
HORIZONS_HOURS = (PURCHASE_HORIZON_HOURS, CHURN_HORIZON_HOURS)  # what each head's map is fitted for (HEADS order)
CHURN = HEADS.index("churn_risk")
# The fit on the rules' statistics replaces a head's affine map where it gains GATE_NATS and STATISTICS_GATE_PER_USER
# nats per sampled user over the affine map fitted on the same sample (four or three weights more: a sample's noise
# gains about two nats), or where it held out of time (Sample.rules_held_out): fitted on the previous matured
# anchor's sample, it said the latest one's outcomes HELD_OUT_GATE_NATS better than the affine map fitted there (at
# the first matured anchor: split_gain). A gain on other users carries no fit's optimism, and in shops where a rule
# leads by a little (wardrobe's days idle, explorers' purchases of the week) the in-sample gate had kept the
# statistics out at most anchors (docs/model-journal.md, session 61). The statistics beyond the rules' join by the
# same held-out margin over the rules' fit (Sample.held_out; before session 61 by GATE_NATS).
STATISTICS_GATE_PER_USER = 0.004
# A young table's churn map (with_week) weighs the rules' statistics where, fitted on each half of the sampled users,
# they say the other half's week of silence HELD_OUT_GATE_NATS better and rank it this much better (ROC AUC) than
# the model does. A model trained in a structured shop ranked the classic shops' week of silence 0.13-0.32 worse
# than its own statistics: the statistics took its churn ranking at the default cut from 0.08-0.17 behind days idle
# to 0.02-0.05; the shipped demo, level with days idle there, gained 0.016-0.022 on the week held out and would
# have lost 0.007-0.012 at the cuts after (docs/model-journal.md, session 63). 0.03 until session 76: by then no
# generated shop's week map moved at 0.015 (the classic shops' included), and in 15 independent worlds the demo's
# first-month churn ranking trailed the week's activity where the statistics had said under +0.03 on the week
# (courses' first cut: +0.020): at 0.015, churn_risk behind the best rule at 47 -> 38 of their 240 cuts, none newly.
WEEK_STATISTICS_AUC = 0.015
# Those statistics enter the week's map only in the direction their rule reads churn (signed_week_fit): more idle
# time, or idle time against the user's usual gap, more silence; more activity, less. A week is not the horizon:
# where users come back every one to two weeks (an independent garden shop, its hobbyists), a user who has just
# been is the likeliest to stay away the next week, and the week's fit weighed idle time and idle time against the
# usual gap negative. Read over the two weeks it ranked churn worse than chance (ROC AUC 0.476 at the first cut of
# gardencentre-2, days idle 0.744; with the directions kept 0.66), docs/model-journal.md, session 76.
CHURN_RULE_DIRECTIONS = {"log_idle_minutes": 1.0, "log_activity_7d": -1.0, "idle_vs_usual_gap": 1.0}
WEEK_RULE_DIRECTIONS = np.array([CHURN_RULE_DIRECTIONS[name] for name in STATISTICS[CHURN][:RULE_STATISTICS[CHURN]]])
# A young map (a week's, with_week; a table's first purchases', with_first_purchases) is fitted on the users held
# at its anchor: in a table's first weeks none of them has been idle longer than the table is old, and the users it
# is then applied to have. Past the idle time of all but 1% of them, the map says no user more engaged than the
# model's own does (fading in over a doubling of idle time): churn_risk no lower, purchase_propensity no higher; it
# may say them less engaged, as the longer idle are at least as likely to stay away and not to buy. In 15
# independent worlds (session 76) the week's maps fitted on a young table's first users lowered the level 1.2-4.0
# logit, and read users idle past them as returning: churn ECE 0.177 at the first cut of their first months; with
# the reach, 0.114 (28 of 30 logs better; the garden shop, whose idle users did return, worse), docs/model-journal.md.
WEEK_REACH_QUANTILE = 0.99
ENGAGED_SIGN = (1.0, -1.0)  # per head (HEADS order): the sign of a move of its logit that says a user more engaged
SHARE_POWER_RANGE = (0.25, 4.0)  # with_share_power's search (a grid of 161 powers, evenly spaced in log)
HELD_OUT_GATE_NATS = 2.0
STATISTIC_INDEX = tuple(tuple(statistics.USER_FEATURES.index(name) for name in names) for names in STATISTICS)
# churn_risk's fit on its statistics may bend in the user's idle time: log_idle_minutes past each of the sampled
# users' quartiles of it weighed too (piecewise linear in the logit, straight past the last knot). The odds of a
# user coming back fall off with idle time along no straight line of its log: where users go dormant and come back
# weeks later (electronics), a fit straight in it said idle users 0.1 less likely to stay away than they did at both
# ends of its own sample, and it serves users idler than those it was fitted on. The bend joins where, fitted on the
# previous matured anchor's sample, it said the latest one's outcomes HELD_OUT_GATE_NATS better than the fit
# without (at a first matured anchor: each half of the sample judged by the other half's fit) (docs/model-journal.md,
# session 67).
IDLE_QUANTILES = (0.25, 0.5, 0.75)
IDLE_COLUMN = STATISTIC_COLUMNS[CHURN][STATISTICS[CHURN].index("log_idle_minutes")]  # in a sample's x
IDLE_FEATURE = statistics.USER_FEATURES.index("log_idle_minutes")
SAMPLED_INDEX = tuple(statistics.USER_FEATURES.index(name) for name in SAMPLED_STATISTICS)  # a sample's x, after logits
# Where the shop's purchase rate moves from week to week by more than its counts' noise explains (rate_volatility:
# the standard deviation of the weekly change of its log over the latest RATE_ANCHORS anchors, less the part the
# purchases' count noise gives it, reaching VOLATILE_RATE), each map's level is moved halfway (LEVEL_PULL, in its
# logit) toward the model's own: the shift that would make the map's mean probability over the latest anchor's
# sampled users the model's own there, times LEVEL_PULL; its ranking is kept (with_model_level). A map is fitted on
# one anchor a week or two old; in a shop with a calendar (a sale, a season, paydays, a launch) the level it learnt
# there is not the level after, while the model's own follows what each user did lately, but carries its training
# shop's rates. Chosen offline on the cuts of 44 logs (docs/model-journal.md, session 68): where the rate moved this
# much, the published probabilities were further off than the model's own at most cuts; all the way to the model's
# level made as many cuts worse as better in two of the three newest worlds, halfway fewer.
VOLATILE_RATE = 0.1
LEVEL_PULL = 0.5


@dataclass(frozen=True)
class LogitMap:
    """Per head (HEADS order) p -> sigmoid(a + b * logit(p)); the identity where `kept` is False."""

    a: tuple[float, ...] = (0.0, 0.0)
    b: tuple[float, ...] = (1.0, 1.0)
    gain_nats: tuple[float, ...] = (0.0, 0.0)
    users: tuple[int, ...] = (0, 0)  # fitted on how many users' outcomes
    kept: tuple[bool, ...] = (False, False)
    drift: tuple[float, ...] = (0.0, 0.0)  # part of `a`: how the shop moved since the anchor the map is fitted on
    # Per head, the weights on the first len(weights) of STATISTICS[head] (the rules' alone, or all the head's) where
    # the fit on the sampled users' statistics was kept (a and b are then that fit's), else None; and that fit's gain
    # over the affine map on the same sample, and its users; and how much better the fit on the rules' statistics
    # said these users held out of time than the affine map (Sample.rules_held_out; at a first anchor, split_gain;
    # None where not judged, or not needed: the in-sample gain was enough).
    weights: tuple[tuple[float, ...] | None, ...] = (None, None)
    weights_gain_nats: tuple[float, ...] = (0.0, 0.0)
    sampled: tuple[int, ...] = (0, 0)
    weights_held_out_nats: tuple[float | None, ...] = (None, None)
    # top_categories' re-ranking (models/category_calibration.py): the latest matured anchor's weights on the
    # CATEGORY_TERMS (the slots' statistics, the model's log P), applied where each week's previous weights beat the
    # published ranking on its users clearly, over the latest two weeks judged (`category_gain` and its standard
    # error, None before two anchors matured) or in each of the latest STEADY_WEEKS (`category_steady_gain` and its
    # error, None unless every one gained), and on how many users they were fitted.
    category_weights: tuple[float, ...] | None = None
    category_gain: float | None = None
    category_gain_se: float | None = None
    category_users: int = 0
    category_steady_gain: float | None = None
    category_steady_gain_se: float | None = None
    # ... and where no week's weights have been judged on a later week's users yet (category_gain None), the latest
    # weights' gain on their own week's users, cross-validated (models/category_calibration.py, cross_validated);
    # None once a later week has judged.
    category_cross_gain: float | None = None
    category_cross_gain_se: float | None = None
    # churn_risk's map fitted on the week's silence after the latest anchor whose week has closed (with_week): a
    # young table, where no anchor's two weeks have closed yet.
    churn_from_week: bool = False
    # purchase_propensity's map fitted on the week's purchases after a table's first anchor (with_first_purchases),
    # before any anchor of its own series has matured.
    purchase_from_table_start: bool = False
    # Per head, a map's reach in idle time (log idle minutes: WEEK_REACH_QUANTILE of its sample's users' at the
    # anchor; a young table's churn_risk week map and every purchase_propensity map have one, None elsewhere): past
    # it, the map says no user more engaged than the model's own does (apply).
    idle_reach: tuple[float | None, ...] = (None, None)
    # Over a window shorter than churn_risk's horizon, the share of the horizon's hazard the model's own
    # probabilities give it is raised to this power (with_share_power: fitted on the week's silence of the users
    # sampled at the anchor churn_risk's map is fitted on; 1: the model's share).
    churn_share_power: float = 1.0
    # churn_risk's bend in the user's idle time (with_statistics, IDLE_QUANTILES): its knots (log idle minutes) and
    # the weights of log_idle_minutes past each (None: straight), and how much better the bent fit said the users
    # held out than the straight one (nats; None where not judged).
    idle_knots: tuple[float, ...] | None = None
    idle_weights: tuple[float, ...] | None = None
    idle_held_out_nats: float | None = None
    # How far the shop's purchase rate moved week to week beyond its counts' noise (rate_volatility; None: fewer
    # than RATE_ANCHORS anchors noted), and per head the shift of the map's logit toward the model's level, where
    # that reached VOLATILE_RATE (with_model_level; 0: not moved).
    rate_volatility: float | None = None
    level_shift: tuple[float, ...] = (0.0, 0.0)

    def reranks(self) -> bool:
        return self.category_weights is not None and any(
            passes(*gain) for gain in ((self.category_gain, self.category_gain_se),
                                       (self.category_steady_gain, self.category_steady_gain_se),
                                       (self.category_cross_gain, self.category_cross_gain_se)))

    def applies(self, head: int) -> bool:
        """Whether the head's published probability moves: the map is kept."""
        return self.kept[head]

    def apply(self, head: int, p: torch.Tensor, hours: float | None = None,
              user_statistics: torch.Tensor | None = None, p_horizon: torch.Tensor | None = None) -> torch.Tensor:
        """The head's probabilities p over `hours` (None: the contract's horizon, the one the map is fitted for) as
        the map says. user_statistics: the users' (U, len(USER_FEATURES)) statistics at the clock (read where
        weights are, and for a week's map's reach in idle time). Over a shorter window (an evaluation's, where its
        log ends sooner) the map moves the model's probabilities over the horizon, p_horizon, and each user's window
        keeps the share of the horizon's hazard the model gives it (over_window); without p_horizon, the model's own
        are kept."""
        if not self.applies(head):
            return p
        if hours is not None and hours != HORIZONS_HOURS[head]:
            if p_horizon is None:
                return p
            return over_window(head, self.apply(head, p_horizon, None, user_statistics), p_horizon, p,
                               self.churn_share_power if head == CHURN else 1.0)
        p = p.double().clamp(1e-12, 1 - 1e-12)
        z = self.a[head] + self.b[head] * torch.logit(p)
        if self.weights[head] is not None:
            weights = torch.tensor(self.weights[head], dtype=torch.float64, device=p.device)
            z = z + user_statistics[:, list(STATISTIC_INDEX[head][:len(weights)])].double() @ weights
        if head == CHURN and self.idle_weights is not None:
            knots, bend = (torch.tensor(t, dtype=torch.float64, device=p.device)
                           for t in (self.idle_knots, self.idle_weights))
            z = z + (user_statistics[:, IDLE_FEATURE, None].double() - knots).clamp(min=0.0) @ bend
        z = z + self.level_shift[head]
        if self.idle_reach[head] is not None and user_statistics is not None:
            # Past the users the map was fitted on (by a doubling of idle time, smoothly), it says nothing that
            # lowers churn_risk below the model's own, or raises purchase_propensity above it (WEEK_REACH_QUANTILE).
            past = ((user_statistics[:, IDLE_FEATURE].double() - self.idle_reach[head]) / np.log(2.0)).clamp(0.0, 1.0)
            engaged = ENGAGED_SIGN[head]
            z = z - past * engaged * (engaged * (z - torch.logit(p))).clamp(min=0.0)
        return torch.sigmoid(z).to(torch.float32)


def over_window(head: int, mapped: torch.Tensor, p_horizon: torch.Tensor, p_window: torch.Tensor,
                power: float = 1.0) -> torch.Tensor:
    """The mapped probabilities over the horizon read over a window: the cumulative hazard of the head's event (a
    purchase; for churn_risk, the user's return, which its probability is the absence of) over the window is the
    mapped one over the horizon times the share the model's own hazards give the window, log(1 - p_window) /
    log(1 - p_horizon) (churn_risk: log p_window / log p_horizon). So the map's level and ranking carry over, and
    a window as long as the horizon gets the mapped probability itself. `power`: the share raised to it (the shop's
    own split of the hazard, where it was measured: with_share_power)."""
    eps = 1e-9
    p_horizon, p_window, mapped = (t.double().clamp(eps, 1 - eps) for t in (p_horizon, p_window, mapped))
    silent = HEADS[head] == "churn_risk"  # its probability is of no event: the hazard is of the other outcome
    none_h, none_w, mapped_none = (p_horizon, p_window, mapped) if silent else (1 - p_horizon, 1 - p_window, 1 - mapped)
    share = (torch.log(none_w) / torch.log(none_h)).clamp(0.0, 1.0) ** power
    out = mapped_none ** share
    return (out if silent else 1 - out).to(torch.float32)


def fit_logit_map(counts: np.ndarray) -> LogitMap:
    """The map fitted on counts (len(HEADS), BINS, 2) of users by head, logit bin and outcome."""
    fits = [fit_head(counts[head]) for head in range(len(HEADS))]
    users = tuple(int(counts[head].sum()) for head in range(len(HEADS)))
    return LogitMap(a=tuple(f[0] for f in fits), b=tuple(f[1] for f in fits), gain_nats=tuple(f[2] for f in fits),
                    users=users, kept=tuple(map_kept(head, f[2], n) for head, (f, n) in enumerate(zip(fits, users))))


def map_kept(head: int, gain: float, users: int) -> bool:
    """Whether a head's affine map gains enough over the identity to be kept (MAP_GATE_NATS, GATE_NATS_PER_USER)."""
    return gain >= max(MAP_GATE_NATS[head], GATE_NATS_PER_USER[head] * users)


def fit_head(counts: np.ndarray) -> tuple[float, float, float]:
    """affine_fit on counts (BINS, 2) of users by logit bin and outcome."""
    return affine_fit(bin_logits(), counts[:, 1].astype(np.float64), counts[:, 0].astype(np.float64))


def affine_fit(logit: np.ndarray, yes: np.ndarray, no: np.ndarray) -> tuple[float, float, float]:
    """(a, b, gain): the affine map of the logit maximising the log likelihood of each row's `yes` and `no`
    outcomes (ridge toward the identity), and its gain in log likelihood over the identity (nats). Where the best
    map would turn the ranking over (b <= 0: at that anchor the users the model ranked higher did it no more
    often), only the level is moved (b = 1)."""
    a, b = logistic_fit(np.column_stack([np.ones(len(logit)), logit]), yes, no)
    if b <= 0:
        a, b = logistic_fit(np.ones((len(logit), 1)), yes, no, offset=logit)[0], 1.0
    return float(a), float(b), log_likelihood(a + b * logit, yes, no) - log_likelihood(logit, yes, no)


def log_likelihood(z: np.ndarray, yes: np.ndarray, no: np.ndarray) -> float:
    """Of `yes` and `no` outcomes at each logit z."""
    return float(-(yes * np.logaddexp(0, -z)).sum() - (no * np.logaddexp(0, z)).sum())


def with_drift(shop_map: LogitMap, older: np.ndarray, newer: np.ndarray) -> LogitMap:
    """churn_risk's map moved by how the shop's return rate moved since the anchor it is fitted on: the week series'
    level at the latest anchor (`newer`) less its level at that anchor (`older`), both under the map's slope. Its
    map is two to three weeks old when applied, and a shop whose users go quiet more as weeks pass (life events)
    was off by 0.13 of churn ECE with it; a week's silence is known a week sooner than two weeks'. Applied
    whatever its size (until session 62, only where the newer level beat the older one on the newer anchor by 4
    nats: the move is an estimate of one level, not a choice among fits, and the 24 logs' mean churn ECE fell
    0.044 -> 0.042 without the gate, no ranking moved; docs/model-journal.md, session 62)."""
    a, b = (shop_map.a[CHURN], shop_map.b[CHURN]) if shop_map.kept[CHURN] else (0.0, 1.0)
    then, now = (float(logistic_fit(np.ones((BINS, 1)), c[:, 1].astype(np.float64), c[:, 0].astype(np.float64),
                                    offset=b * bin_logits())[0]) for c in (older, newer))
    return replace(shop_map, a=only(shop_map.a, CHURN, a + now - then), b=only(shop_map.b, CHURN, b),
                   kept=only(shop_map.kept, CHURN, True), drift=only(shop_map.drift, CHURN, now - then))


def with_week(shop_map: LogitMap, x: np.ndarray, silent: np.ndarray, table_start: bool = False) -> LogitMap:
    """churn_risk's map where no anchor's two weeks have closed yet, fitted on who among the users sampled at the
    latest anchor whose week has closed stayed away that week (x: their sample's columns, with churn_risk's logit
    over the horizon and over a week): the mapped probability over the horizon, read over the week as over_window
    reads it (the share of the horizon's hazard the model's own probabilities give the week), says the week's
    silence. Kept where it gains GATE_NATS over the identity. A table's churn_risk is then mapped a week sooner
    (the classic shop's first month: docs/model-journal.md, session 62). The rules' statistics join it where they
    rank the week's silence clearly better than the model, held out (week_statistics_held_out). `table_start`: the
    week after a table's first anchor, whose users are those active when the table started: the map moves the level
    alone, without the statistics (with its slope and statistics it read the classic shop's silence worse and cost
    three independent worlds' churn rankings 0.11-0.13 of ROC AUC; docs/model-journal.md, session 74)."""
    share = week_share(x)
    design = statistics_design(x, CHURN, every=False)  # the level, the logit, the rules' statistics
    affine = design[:, :2]
    yes = silent.astype(np.float64)
    theta = hazard_share_fit(affine, share, yes)
    if theta[1] <= 0 or table_start:  # the ranking turned over (or a table's first users): only the level moves
        theta = hazard_share_fit(affine, share, yes, level_only=True)
    gain = share_log_likelihood(affine @ theta, share, yes) - share_log_likelihood(affine[:, 1], share, yes)
    if gain < GATE_NATS:
        return shop_map
    fitted = replace(shop_map, a=only(shop_map.a, CHURN, float(theta[0])), b=only(shop_map.b, CHURN, float(theta[1])),
                     gain_nats=only(shop_map.gain_nats, CHURN, gain), users=only(shop_map.users, CHURN, len(yes)),
                     kept=only(shop_map.kept, CHURN, True), churn_from_week=True,
                     idle_reach=only(shop_map.idle_reach, CHURN, idle_reach(x)))
    nats, ranks = week_statistics_held_out(design, share, yes)
    if table_start or nats < HELD_OUT_GATE_NATS or ranks < WEEK_STATISTICS_AUC:
        return fitted
    weighed = signed_week_fit(design, share, yes)  # (its slope may go to 0: the model says nothing beyond them)
    more = share_log_likelihood(design @ weighed, share, yes) - share_log_likelihood(affine @ theta, share, yes)
    return replace(fitted, a=only(fitted.a, CHURN, float(weighed[0])), b=only(fitted.b, CHURN, float(weighed[1])),
                   weights=only(fitted.weights, CHURN, tuple(float(w) for w in weighed[2:])),
                   weights_gain_nats=only(fitted.weights_gain_nats, CHURN, more),
                   sampled=only(fitted.sampled, CHURN, len(yes)),
                   weights_held_out_nats=only(fitted.weights_held_out_nats, CHURN, nats))


def with_first_purchases(shop_map: LogitMap, x: np.ndarray, bought: np.ndarray) -> LogitMap:
    """purchase_propensity's map before any anchor of its own series has matured, fitted on who among the users
    sampled at a table's first anchor bought in the week after it (x: their sample's columns): the affine map of
    the logit (the level alone where the slope would turn the ranking over), without the rules' statistics, kept
    where it gains what fit_logit_map's purchase map must, with its reach in idle time (apply). In a shop unlike
    the demo's, purchase_propensity had no map until 15-21 days into a table, and its first month's first cuts
    were 0.1-0.4 off (quick commerce's users bought at 0.73, the demo said 0.37; docs/model-journal.md, session
    77). There a table's first users bought more than the cut's users, as they come back more (with_week's
    table_start), and the users idle past them got a level that was not theirs: the reach keeps the map from
    raising them."""
    head, yes = PURCHASE_SERIES, bought.astype(np.float64)
    a, b, gain = affine_fit(x[:, LOGIT_COLUMNS[head]], yes, 1 - yes)
    if not map_kept(head, gain, len(yes)):
        return shop_map
    return replace(shop_map, a=only(shop_map.a, head, a), b=only(shop_map.b, head, b),
                   gain_nats=only(shop_map.gain_nats, head, gain), users=only(shop_map.users, head, len(yes)),
                   kept=only(shop_map.kept, head, True), purchase_from_table_start=True,
                   idle_reach=only(shop_map.idle_reach, head, idle_reach(x)))


def idle_reach(x: np.ndarray) -> float:
    """A map's reach in idle time: WEEK_REACH_QUANTILE of its sample's users' log idle minutes."""
    return float(np.quantile(x[:, IDLE_COLUMN], WEEK_REACH_QUANTILE))


def week_statistics_held_out(design: np.ndarray, share: np.ndarray, yes: np.ndarray) -> tuple[float, float]:
    """How much better the week's map on the rules' statistics than the affine one says the week's silence of
    each half of a sample's users (alternate rows, as split_gain), fitted on the other half, both ways: the log
    likelihood summed (nats) and the ROC AUC, on average."""
    if not np.isfinite(design).all():  # (a statistic past its float16 column says nothing; roc_auc refuses nan)
        return 0.0, 0.0
    nats = ranks = 0.0
    for fit, held in ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))):
        weighed = signed_week_fit(design[fit], share[fit], yes[fit])
        affine = hazard_share_fit(design[fit, :2], share[fit], yes[fit])
        z = design[held] @ weighed
        if not np.isfinite(z).all():  # (nor does a fit that did not converge)
            return 0.0, 0.0
        nats += (share_log_likelihood(z, share[held], yes[held])
                 - share_log_likelihood(design[held, :2] @ affine, share[held], yes[held]))
        ranks += (roc_auc(z, yes[held]) - roc_auc(design[held, 1], yes[held])) / 2
    return nats, (0.0 if np.isnan(ranks) else float(ranks))


def signed_week_fit(design: np.ndarray, share: np.ndarray, yes: np.ndarray) -> np.ndarray:
    """hazard_share_fit of the week's map on the rules' statistics (the design of with_week), each statistic kept
    only in the direction its rule reads churn in (CHURN_RULE_DIRECTIONS): one weighed the other way is left out
    (weight 0) and the rest fitted again, until none is."""
    dropped = np.zeros(design.shape[1] - 2, dtype=bool)
    while True:
        theta = hazard_share_fit(design, share, yes, dropped=dropped)
        against = (theta[2:] * WEEK_RULE_DIRECTIONS < 0) & ~dropped
        if not against.any():
            return theta
        dropped |= against


def week_share(x: np.ndarray) -> np.ndarray:
    """(N,) the share of churn_risk's hazard over the horizon that the model's own probabilities give the week, for
    a sample's users (x: its columns, with churn_risk's logit over the horizon and over a week), as over_window
    takes it: log p_week / log p_horizon."""
    horizon, week = (np.clip(1 / (1 + np.exp(-x[:, column])), 1e-9, 1 - 1e-9)
                     for column in (LOGIT_COLUMNS[CHURN], WEEK_LOGIT_COLUMN))
    return np.clip(np.log(week) / np.log(horizon), 0.0, 1.0)


def share_log_likelihood(z: np.ndarray, share: np.ndarray, yes: np.ndarray) -> float:
    """Of the outcomes `yes` where each is said by sigmoid(z) ** share."""
    log_q = -share * np.logaddexp(0, -z)
    return float((yes * log_q + (1 - yes) * np.log(-np.expm1(np.minimum(log_q, -1e-12)))).sum())


def hazard_share_fit(design: np.ndarray, share: np.ndarray, yes: np.ndarray, level_only: bool = False,
                     steps: int = 30, dropped: np.ndarray | None = None) -> np.ndarray:
    """theta (a, b, then weights on any further columns of the design) maximising share_log_likelihood of
    sigmoid(design @ theta) with a ridge toward the identity (b = 1, no weight; Fisher scoring, steps halved until
    they climb: climbed); level_only: b stays 1; dropped: (K,) which further columns stay at weight 0."""
    k = design.shape[1]
    identity = np.zeros(k)
    identity[1] = 1.0
    free = np.ones(k, dtype=bool)
    free[1] = not level_only
    if dropped is not None:
        free[2:] &= ~dropped

    def objective(theta: np.ndarray) -> float:
        return share_log_likelihood(design @ theta, share, yes) - RIDGE / 2 * float(((theta - identity) ** 2).sum())

    theta = identity.copy()
    for _ in range(steps):
        z = design @ theta
        s = logistic(z)
        q = np.clip(s ** share, 1e-12, 1 - 1e-12)
        dq = q * share * (1 - s)  # d q / d z
        grad = design.T @ ((yes - q) / (q * (1 - q)) * dq) - RIDGE * (theta - identity)
        hess = (design * (dq ** 2 / (q * (1 - q)))[:, None]).T @ design + RIDGE * np.eye(k)
        step = np.zeros(k)
        step[free] = np.linalg.solve(hess[np.ix_(free, free)], grad[free])
        theta, settled = climbed(objective, theta, step)
        if settled:
            break
    return theta


def with_share_power(shop_map: LogitMap, x: np.ndarray, silent: np.ndarray) -> LogitMap:
    """churn_risk's share of the hazard over a window shorter than the horizon as this shop splits it: the power of
    the model's share (log p_week / log p_horizon) under which the map's probabilities over the horizon, read over
    the week, best say who among the users sampled at the map's anchor stayed away the week after it (x: their
    sample's columns). The model splits the two weeks' hazard as its training shop did; in B2B accounts,
    replenishment, explorers and seasons a user who stayed away a week was likelier to stay away the next than that
    split says (powers of 1.1-1.5 at their anchors), in loyal-or-once and trend waves less likely (0.65-0.95). Only a
    window cut short reads it (an evaluation's, where its log ends within the horizon): over the 34 such cuts of the
    24 logs judged, churn ECE 0.047 -> 0.043 (B2B accounts' last cuts 0.093 / 0.085 -> 0.064 / 0.056;
    docs/model-journal.md, session 62). An estimate of one number, applied whatever its size, as the week's move
    is."""
    if not shop_map.kept[CHURN]:
        return shop_map
    z = sample_logits(shop_map, CHURN, x, at_anchor=True)
    share = np.maximum(week_share(x), 1e-6)
    yes = silent.astype(np.float64)
    powers = np.exp(np.linspace(np.log(SHARE_POWER_RANGE[0]), np.log(SHARE_POWER_RANGE[1]), 161))
    said = [share_log_likelihood(z, share ** power, yes) for power in powers]
    return replace(shop_map, churn_share_power=float(powers[int(np.argmax(said))]))


def sample_logits(shop_map: LogitMap, head: int, x: np.ndarray, at_anchor: bool = False) -> np.ndarray:
    """(N,) the logits the head's kept map gives a sample's users (x: their columns), as at the anchor it is fitted on
    (at_anchor: without its drift since) or as published (without level_shift, which with_model_level sets)."""
    weights = shop_map.weights[head] or ()
    level = shop_map.a[head] - (shop_map.drift[head] if at_anchor else 0.0)
    theta = np.array([level, shop_map.b[head], *weights])
    z = statistics_design(x, head, every=len(weights) > RULE_STATISTICS[head])[:, :len(theta)] @ theta
    if head == CHURN and shop_map.idle_weights is not None:
        z = z + idle_past(x, shop_map.idle_knots) @ np.asarray(shop_map.idle_weights)
    return z


def rate_volatility(sums: list[tuple[int, float, float]]) -> float | None:
    """How much the shop's purchase rate moves from week to week beyond its counts' noise: over the latest
    RATE_ANCHORS consecutive anchors' (anchor, faded events, faded purchases) (Outcomes.rate_sums), the standard
    deviation of the weekly change of log(purchases / events), less the variance the purchases' count noise gives it
    (1/P of each week's, twice per change), floored at 0. None: fewer anchors, or one without a purchase."""
    sums = sums[-RATE_ANCHORS:]
    consecutive = len(sums) == RATE_ANCHORS and sums[-1][0] - sums[0][0] == RATE_ANCHORS - 1
    if not consecutive or min(min(events, purchases) for _, events, purchases in sums) <= 0:
        return None
    change = np.diff(np.log([p / e for _, e, p in sums]))
    noise = float(np.mean([1 / p0 + 1 / p1 for (_, _, p0), (_, _, p1) in zip(sums, sums[1:])]))
    return float(np.sqrt(max(0.0, float(np.var(change)) - noise)))


def with_model_level(shop_map: LogitMap, volatility: float | None, x: np.ndarray | None) -> LogitMap:
    """Where the shop's purchase rate moved VOLATILE_RATE or more (`volatility`, rate_volatility), each kept map's
    logit shifted LEVEL_PULL of the way to where its mean probability over the latest anchor's sampled users (x:
    their columns) is the model's own there: the map's ranking, a level between the map's and the model's."""
    shop_map = replace(shop_map, rate_volatility=volatility)
    if volatility is None or volatility < VOLATILE_RATE or x is None or not len(x) or x.shape[1] < WIDTH:
        return shop_map  # (narrower: a partition's sample restored from a release with fewer statistics)
    shifts = []
    for head in range(len(HEADS)):
        if not shop_map.kept[head]:
            shifts.append(0.0)
            continue
        z, own = sample_logits(shop_map, head, x), float(np.mean(1 / (1 + np.exp(-x[:, LOGIT_COLUMNS[head]]))))
        low, high = -30.0, 30.0  # the mean of sigmoid(z + s) rises with s: bisect
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if np.mean(1 / (1 + np.exp(-(z + middle)))) < own else (low, middle)
        shifts.append(LEVEL_PULL * (low + high) / 2)
    return replace(shop_map, level_shift=tuple(shifts))


def with_statistics(shop_map: LogitMap, head: int, x: np.ndarray, happened: np.ndarray,
                    held_out: float | None = None, rules_held_out: float | None = None,
                    idle_held_out: float | None = None) -> LogitMap:
    """The head's map fitted on the sampled users' logits and statistics (x: a sample's columns) where that gains
    enough over the affine map of the logit alone fitted on the same users, or where the previous anchor's fit on
    the rules' statistics said these users better than its affine map (`rules_held_out`, Sample.rules_held_out) by
    HELD_OUT_GATE_NATS (without an earlier anchor: each half of these users' fit said the other half better,
    split_gain): sigmoid(a + b logit + weights . statistics), by Newton with a ridge toward the identity (b = 1, no
    weight). The statistics are the rules' (RULE_STATISTICS), or all the head's where the previous anchor's fit on
    them said these users better than its fit on the rules' alone (`held_out`, Sample.held_out) by
    HELD_OUT_GATE_NATS. churn_risk's fit bends in the user's idle time (IDLE_QUANTILES) where the previous anchor's
    bent fit said these users better than its straight one (`idle_held_out`, Sample.idle_held_out; without an
    earlier anchor, split_idle_gain) by HELD_OUT_GATE_NATS."""
    n = len(happened)
    gate = max(GATE_NATS, STATISTICS_GATE_PER_USER * n)
    every = held_out is not None and held_out >= HELD_OUT_GATE_NATS and x.shape[1] >= WIDTH
    design = statistics_design(x, head, every)
    yes = happened.astype(np.float64)
    theta, affine = logistic_fit(design, yes, 1 - yes), logistic_fit(design[:, :2], yes, 1 - yes)
    gain = log_likelihood(design @ theta, yes, 1 - yes) - log_likelihood(design[:, :2] @ affine, yes, 1 - yes)
    if gain < gate and rules_held_out is None:  # no earlier matured anchor (a young table, or an older record)
        rules_held_out = split_gain(x, yes, head)
    fitted = replace(shop_map, weights_gain_nats=only(shop_map.weights_gain_nats, head, gain),
                     sampled=only(shop_map.sampled, head, n),
                     weights_held_out_nats=only(shop_map.weights_held_out_nats, head, rules_held_out))
    if gain < gate and rules_held_out < HELD_OUT_GATE_NATS:
        return fitted
    straight = len(theta)
    if head == CHURN:
        idle_held_out = split_idle_gain(x, yes, every) if idle_held_out is None else idle_held_out
        fitted = replace(fitted, idle_held_out_nats=idle_held_out)
        if idle_held_out >= HELD_OUT_GATE_NATS:
            knots = idle_knots(x)
            theta = logistic_fit(with_idle_past(design, x, knots), yes, 1 - yes)
            fitted = replace(fitted, idle_knots=knots, idle_weights=tuple(float(w) for w in theta[straight:]))
    return replace(fitted, a=only(shop_map.a, head, float(theta[0])), b=only(shop_map.b, head, float(theta[1])),
                   kept=only(shop_map.kept, head, True), drift=only(shop_map.drift, head, 0.0),
                   weights=only(shop_map.weights, head, tuple(float(w) for w in theta[2:straight])))


def idle_knots(x: np.ndarray) -> tuple[float, ...]:
    """The knots of churn_risk's bend in idle time: the IDLE_QUANTILES of a sample's users' log idle minutes."""
    return tuple(float(k) for k in np.quantile(x[:, IDLE_COLUMN], IDLE_QUANTILES))


def idle_past(x: np.ndarray, knots: tuple[float, ...]) -> np.ndarray:
    """(N, len(knots)) a sample's users' log idle minutes past each knot (0 before it)."""
    return np.maximum(x[:, IDLE_COLUMN, None] - np.asarray(knots), 0.0)


def with_idle_past(design: np.ndarray, x: np.ndarray, knots: tuple[float, ...] | None) -> np.ndarray:
    """A design of a sample's users (x: their columns) with their log idle minutes past each knot after it (None:
    as it is)."""
    return design if knots is None else np.column_stack([design, idle_past(x, knots)])


def idle_gain(fit: tuple[np.ndarray, np.ndarray], judged: tuple[np.ndarray, np.ndarray], every: bool) -> float:
    """How much better churn_risk's fit on its statistics (the rules', or all: `every`) bent in idle time at the
    `fit` users' knots than the straight fit, both fitted on the `fit` users (x, happened), says the `judged` users'
    outcomes: nats (0 where a fit says nothing finite: a statistic past its float16 column)."""
    gain = said_by(fit, judged, CHURN, every, bent=True) - said_by(fit, judged, CHURN, every)
    return float(gain) if np.isfinite(gain) else 0.0


def split_idle_gain(x: np.ndarray, yes: np.ndarray, every: bool) -> float:
    """idle_gain judged both ways between a sample's halves (both_ways)."""
    return both_ways(x, yes, lambda fit, judged: idle_gain(fit, judged, every))


def split_gain(x: np.ndarray, yes: np.ndarray, head: int) -> float:
    """rules_gain judged both ways between a sample's halves (both_ways)."""
    return both_ways(x, yes, lambda fit, judged: rules_gain(fit, judged, head))


def both_ways(x: np.ndarray, yes: np.ndarray, gain: Callable[[tuple, tuple], float]) -> float:
    """gain(fit, judged) of each half of a sample's users (alternate rows: the order is the sample's, whatever the
    batching; each half as (x, happened)) on the other, both ways, summed: the held-out verdict of an anchor with no
    matured anchor before it."""
    even, odd = ((x[rows], yes[rows]) for rows in (slice(0, None, 2), slice(1, None, 2)))
    return gain(odd, even) + gain(even, odd)


def statistics_design(x: np.ndarray, head: int, every: bool) -> np.ndarray:
    """(N, 2 + K) a sample's level, the head's logit and its statistics: all the head's STATISTICS (`every`) or the
    rules' alone (all a record of session 58 holds)."""
    columns = STATISTIC_COLUMNS[head][:None if every else RULE_STATISTICS[head]]
    return np.column_stack([np.ones(len(x)), x[:, LOGIT_COLUMNS[head]], x[:, list(columns)]])


def said_by(fit: tuple[np.ndarray, np.ndarray], judged: tuple[np.ndarray, np.ndarray], head: int, every: bool,
            columns: int | None = None, bent: bool = False) -> float:
    """The log likelihood of the `judged` users' outcomes (x, happened) under the head's fit on the `fit` users':
    on the rules' statistics, all the head's (`every`), or the first `columns` of the design (2: the logit alone);
    `bent`: bent in idle time too, at the `fit` users' knots (churn_risk's)."""
    yes, later = (np.asarray(users[1], dtype=np.float64) for users in (fit, judged))
    knots = idle_knots(fit[0]) if bent else None
    design = [with_idle_past(statistics_design(x, head, every)[:, :columns], x, knots) for x in (fit[0], judged[0])]
    theta = logistic_fit(design[0], yes, 1 - yes)
    return log_likelihood(design[1] @ theta, later, 1 - later)


def rules_gain(fit: tuple[np.ndarray, np.ndarray], judged: tuple[np.ndarray, np.ndarray], head: int) -> float:
    """How much better the weights on the rules' statistics than the affine map of the logit alone, both fitted on
    the `fit` users, say the `judged` users' outcomes: nats."""
    return said_by(fit, judged, head, False) - said_by(fit, judged, head, False, 2)


def held_out_gains(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray], head: int
                   ) -> tuple[float | None, float]:
    """How much better fits on one matured anchor's sample (`before`: x, happened) say a later one's outcomes
    (`after`), log likelihood in nats: the weights on all the head's statistics over those on the rules' alone
    (None where a sample lacks the statistics, a record of an older release, or the head has none beyond the
    rules'), and the weights on the rules' statistics over the affine map of the logit alone (rules_gain)."""
    rules, affine = said_by(before, after, head, False), said_by(before, after, head, False, 2)
    beyond = len(STATISTICS[head]) > RULE_STATISTICS[head] and min(before[0].shape[1], after[0].shape[1]) >= WIDTH
    return (said_by(before, after, head, True) - rules) if beyond else None, rules - affine


def only(values: tuple, head: int, value: object) -> tuple:
    """`values` with the head's replaced by `value`."""
    return tuple(value if h == head else v for h, v in enumerate(values))


def logistic_fit(design: np.ndarray, yes: np.ndarray, no: np.ndarray, offset: np.ndarray | float = 0.0,
                 steps: int = 30) -> np.ndarray:
    """theta maximising the log likelihood of each row's `yes` and `no` outcomes under sigmoid(design @ theta +
    offset) (Newton), with a ridge toward the identity: 0 on the first column (the level), 1 on the second (the
    logit; where there is one), 0 on the others (statistics)."""
    n = yes + no
    identity = np.zeros(design.shape[1])
    identity[1:2] = 1.0

    def objective(theta: np.ndarray) -> float:
        return log_likelihood(design @ theta + offset, yes, no) - RIDGE / 2 * float(((theta - identity) ** 2).sum())

    theta = identity.copy()
    for _ in range(steps):
        p = logistic(design @ theta + offset)
        grad = design.T @ (yes - n * p) - RIDGE * (theta - identity)
        hess = fisher_information(design, p, n) + RIDGE * np.eye(len(theta))
        theta, settled = climbed(objective, theta, np.linalg.solve(hess, grad))
        if settled:
            break
    return theta


def logistic(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)), without overflow."""
    return 0.5 * (1 + np.tanh(0.5 * z))


def fisher_information(design: np.ndarray, p: np.ndarray, n: np.ndarray | float = 1.0) -> np.ndarray:
    """The logistic likelihood's information (minus its Hessian) at probabilities p, of rows with n outcomes each."""
    return (design * (n * p * (1 - p))[:, None]).T @ design


def climbed(objective: Callable[[np.ndarray], float], theta: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, bool]:
    """theta moved by the step, halved until the objective climbs, and whether the step was too small to matter.
    A full Newton step from the identity overshoots where the outcomes run against the model's ranking (bins of
    certain outcomes flatten the curvature it is taken on): plain Newton went on to a = -1,910, b = 4,305."""
    now = objective(theta)
    while objective(theta + step) < now and np.abs(step).max() > 1e-9:
        step = step / 2
    return theta + step, bool(np.abs(step).max() < 1e-9)


class StreamCalibration:
    """The anchors' bookkeeping for one state table. `probabilities(rows, now_ms)` is the heads' (N, len(HEADS))
    uncalibrated probabilities of those users at that clock (the updater's)."""

    def __init__(self, state: StateTable, probabilities: Callable[[np.ndarray, int], np.ndarray],
                 candidates: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        """candidates(rows, now_ms): the users' top_categories candidates then, (N, C) keys (0: none) and (N, C,
        1 + F) float16 log P(c) and CATEGORY_STATISTICS (UpdateStep.category_candidates); None: not sampled."""
        self.state = state
        self.probabilities = probabilities
        self.candidates = candidates
        self._map, self._fitted = LogitMap(), (None, -1)

    def shop_map(self) -> LogitMap:
        """The map of the matured anchors' counts the table holds now (refitted when they changed)."""
        outcomes = self.state.outcomes
        if self._fitted != (id(outcomes), outcomes.version):
            self._map = fit_logit_map(outcomes.total()) if outcomes.counts else LogitMap()
            for head in range(len(HEADS)):
                sampled = outcomes.samples.latest_matured(head)
                if sampled is not None:
                    self._map = with_statistics(self._map, head, *sampled)
                # purchase_propensity's every map has a young map's reach (its sample's users'), not only a table's
                # first: one fitted on an anchor a week or two old has seen no user idle as long as the clock's
                # longest idle, and in a young table those are many. The first months of 21 independent worlds
                # (session 77): purchase ECE 0.054 -> 0.050 and 0.059 -> 0.053, behind the best rule at 14 -> 11 of
                # 168 cuts, none worse by 0.01; their 60-day logs and the held-out generator shops within 0.003 (an
                # older table's map has seen nearly every idle time). churn_risk's two weeks' maps keep none: the
                # same reach moved six of their 184 cuts, three worse (docs/model-journal.md, session 77).
                if sampled is not None and head == PURCHASE_SERIES and self._map.kept[head]:
                    self._map = replace(self._map, idle_reach=only(self._map.idle_reach, head, idle_reach(sampled[0])))
            first_purchases = None if outcomes.anchors(PURCHASE_SERIES) else outcomes.samples.first_purchases()
            if first_purchases is not None:
                self._map = with_first_purchases(self._map, *first_purchases)
            fitted_on, weeks = outcomes.anchors(CHURN), outcomes.anchors(WEEK_SERIES)
            young_week = None if fitted_on else outcomes.samples.latest_week()
            if young_week is not None:
                first = not outcomes.counted(outcomes.samples.latest_week_anchor(), PURCHASE_SERIES)
                self._map = with_week(self._map, *young_week, table_start=first)
            if fitted_on and fitted_on[-1] in weeks and weeks[-1] > fitted_on[-1]:
                self._map = with_drift(self._map, outcomes.of_anchor(WEEK_SERIES, fitted_on[-1]),
                                       outcomes.of_anchor(WEEK_SERIES, weeks[-1]))
            anchor = outcomes.samples.latest_matured_anchor(CHURN)
            maps_week = None if anchor is None else outcomes.samples.latest_week(anchor)
            if maps_week is not None:
                self._map = with_share_power(self._map, *maps_week)
            self._map = with_model_level(self._map, rate_volatility(outcomes.rate_sums()),
                                         outcomes.samples.latest_taken())
            latest = outcomes.samples.category_fit()
            if latest is not None:
                anchor, fit = latest
                previous = outcomes.samples.category_fit(anchor - 1)
                weeks = [week for week in (fit, previous and previous[1]) if week is not None and week.gain is not None]
                gain, standard_error = over_weeks([(week.gain, week.gain_se) for week in weeks])
                steady, steady_se = steady_gain(fit.judged)
                cross, cross_se = (fit.cross_gain if gain is None else None) or (None, None)
                self._map = replace(self._map, category_weights=tuple(full_weights(fit.weights).tolist()),
                                    category_gain=gain,
                                    category_gain_se=standard_error, category_users=fit.users,
                                    category_steady_gain=steady, category_steady_gain_se=steady_se,
                                    category_cross_gain=cross, category_cross_gain_se=cross_se)
            self._fitted = (id(outcomes), outcomes.version)
        return self._map

    def parts(self, ts: np.ndarray) -> Iterator[tuple[int, np.ndarray | None]]:
        """The batch's events (their times, not empty) in parts split at the anchors, in time order: (anchor,
        which events), None for all of them. The first part holds every event before the next anchor of the
        table's clock (late ones too). Between parts, once the earlier one was applied, the anchors whose
        windows the clock has passed mature."""
        clock, outcomes = self.state.max_event_ts, self.state.outcomes
        since = anchor_of(clock if clock >= 0 else int(ts.min()))
        if clock < 0:  # a table's first events: at an anchor within a churn horizon of them, every user held is new,
            # and what followed says little of users with months of history (the classic shop's first anchor, two
            # days into its log, moved purchase_propensity's ECE at the next cut from 0.042 to 0.099; churn_risk's
            # map from an anchor nine days in read later users worse than none). purchase_propensity's count from a
            # week after them and the week series' from the table's first anchor (purchase_sooner, SOONER): in a
            # shop's first month the demo read purchases 0.04-0.12 low and silence 0.1-0.4 off until a map applied
            # (docs/model-journal.md, sessions 62 and 74).
            outcomes.complete_from = max(outcomes.complete_from or since, since + PHASES + 1)
            if outcomes.purchase_sooner is None:
                outcomes.purchase_sooner = True
        if anchor_of(int(ts.max())) <= since:
            yield since, None
            return
        of_event = np.maximum(ts // ANCHOR_MS, since)
        for anchor in np.unique(of_event).tolist():
            for after in sorted(set(MATURES_AFTER)):
                series = tuple(s for s, a in enumerate(MATURES_AFTER) if a == after)
                # (only the kept anchors of a long silence: the counts of earlier ones would be dropped at once)
                kept = max(KEPT[s] for s in series)
                for matured in range(max(since, anchor - kept) - after + 1, anchor - after + 1):
                    self.mature(matured, series)
            if anchor > since and outcomes.counted(anchor, WEEK_SERIES):  # (the series counted soonest)
                self.take_sample(anchor)
            since = anchor
            yield anchor, of_event == anchor

    def record(self, events: EventColumns, rows: np.ndarray, anchor: int) -> None:
        """Before these events (of `anchor` or earlier) are applied: each user whose first event after an anchor
        whose windows are open is among them, and who held state before that anchor, gets its record (the heads
        at the anchor's clock, when it came back)."""
        last = self.state.last_ts[rows]  # each event's user's latest event before these
        for open_anchor in range(anchor - PHASES + 1, anchor + 1):
            at = open_anchor * ANCHOR_MS
            # Users silent since before the anchor (no record of it yet) with an event after it.
            back = (events.ts >= at) & (last < at) & (last >= 0)
            if not back.any():
                continue
            users, which = np.unique(rows[back], return_inverse=True)
            first = np.full(len(users), np.iinfo(np.int64).max)
            np.minimum.at(first, which, events.ts[back])
            slot, columns = open_anchor % PHASES, self.state.columns
            columns["anchor"][users, slot] = open_anchor
            columns["anchor_bins"][users, slot] = logit_bins(self.probabilities(users, at))
            columns["back_minutes"][users, slot] = (first - at) / MINUTE_MS
            columns["bought_minutes"][users, slot] = -1.0

    def note_purchases(self, events: EventColumns, rows: np.ndarray, anchor: int) -> None:
        """After these events were applied: for each record of an open anchor their users hold, the first
        purchase after it."""
        columns = self.state.columns
        purchase = events.type_idx == PURCHASE
        if not purchase.any():
            return
        rows, ts = rows[purchase], events.ts[purchase]
        for slot in range(PHASES):
            held = columns["anchor"][rows, slot].astype(np.int64)
            after = (held > anchor - PHASES) & (ts >= held * ANCHOR_MS)
            if not after.any():
                continue
            users, which = np.unique(rows[after], return_inverse=True)
            first = np.full(len(users), np.inf)
            np.minimum.at(first, which, (ts[after] - held[after] * ANCHOR_MS) / MINUTE_MS)
            bought = columns["bought_minutes"][users, slot]
            columns["bought_minutes"][users, slot] = np.where(bought >= 0, np.minimum(bought, first), first)

    def leaving(self, rows: np.ndarray) -> None:
        """These users' state is about to expire (--state-ttl): count them now for each anchor whose window of a
        head is open and which they were held at, as the anchor will count the others when it matures. Those
        silent since before it did not come back (a user who comes back after expiring starts afresh); those who
        came back after it are counted by their record. Without this, a TTL shorter than the anchors' windows would
        leave every user who stayed away out of the counts."""
        state, outcomes = self.state, self.state.outcomes
        if not len(rows) or state.max_event_ts < 0:
            return
        now = anchor_of(state.max_event_ts)
        for anchor in range(now - PHASES + 1, now + 1):
            open_heads = tuple(series for series, after in enumerate(MATURES_AFTER)
                               if anchor > now - after and outcomes.counted(anchor, series))
            if open_heads:
                self.count(anchor, open_heads, rows, pending=True)
        self.note_leaving(rows)

    def note_leaving(self, rows: np.ndarray) -> None:
        """Users sampled at an anchor whose window is still open, about to expire: whether they bought or came back
        since it, noted now (when it closes they are not found, and would read as having stayed away and bought
        nothing)."""
        state = self.state
        leaving = state.ids_at(rows)
        for (_, anchor), sample in state.outcomes.samples.samples.items():
            mine = np.flatnonzero(np.isin(sample.users, leaving))
            if not len(mine):
                continue
            for head, happened in enumerate(self.since_anchor(sample.users[mine], anchor)):
                if sample.happened[head] is None:
                    sample.left[mine, head] |= happened
            candidates = sample.categories
            if candidates is not None and candidates.weights is None:
                theirs = mine[mine < len(candidates.keys)]  # of the users whose candidates were kept
                candidates.left[theirs] |= self.engaged_since(sample.users[theirs], candidates.keys[theirs],
                                                              candidates.counts[theirs])
            state.outcomes.version += 1

    def since_anchor(self, users: np.ndarray, anchor: int) -> tuple[np.ndarray, np.ndarray]:
        """Per user, whether the table has a purchase of it, and an event, at or after the anchor's clock (False
        where the user is not in state)."""
        state, at = self.state, anchor * ANCHOR_MS
        rows = state.find_rows(users)
        found, row = rows >= 0, np.maximum(rows, 0)
        return found & (state.columns["last_purchase_ts"][row] >= at), found & (state.last_ts[row] >= at)

    def mature(self, anchor: int, series: tuple[int, ...]) -> None:
        """These series' window after anchor `anchor` has closed: count the anchor's users for them."""
        series = tuple(one for one in series if self.state.outcomes.counted(anchor, one))
        if not series:
            return
        self.count(anchor, series, np.arange(len(self.state)))
        for head in series:
            if head < len(HEADS):
                self.note_sampled(anchor, head)
        outcomes = self.state.outcomes
        if WEEK_SERIES in series:  # who among the users sampled at it stayed away the week after it
            for (_, sampled_at), sample in outcomes.samples.samples.items():
                if sampled_at == anchor:
                    bought, back = self.since_anchor(sample.users, anchor)
                    sample.week_silent = ~(back | sample.left[:, 1])
                    if PURCHASE_SERIES not in series:  # (a table's first anchor: with_first_purchases)
                        sample.week_bought = bought | sample.left[:, 0]
            outcomes.version += 1
        if CHURN in series:
            log.info("calibration anchor %d matured: %s", anchor, describe(self.shop_map()))
        elif WEEK_SERIES in series and not outcomes.anchors(CHURN) and self.shop_map().churn_from_week:
            log.info("calibration anchor %d's week closed: %s", anchor, describe(self.shop_map()))

    def take_sample(self, anchor: int) -> None:
        """The clock has reached the anchor (every event before it applied, none after): sample the users held
        (stream/anchor_samples.py) with both heads' logits and the rules' statistics at its clock."""
        state, at = self.state, anchor * ANCHOR_MS
        n = len(state)
        held = np.flatnonzero((state.last_ts[:n] >= 0) & (state.last_ts[:n] < at))
        state.outcomes.samples.keep_from(anchor - PHASES)  # each head's latest matured anchor and the open ones
        if len(held):
            if state.outcomes.counted(anchor, PURCHASE_SERIES):  # (the shop's purchase rate: from its second anchor)
                state.outcomes.note_rate(anchor, state.partition[held],
                                         *statistics.week_masses(state.columns, state.last_ts, held, at))
            rows = sample_rows(held, state.ids_at(held), state.partition[held])
            p = np.clip(self.probabilities(rows, at).astype(np.float64), 1e-6, 1 - 1e-6)
            user = statistics.user_features(state.columns, state.counts, state.last_ts, rows, at)
            # churn_risk over a week, the week series' window (with_week)
            week = np.clip(self.probabilities(rows, at, (PURCHASE_HORIZON_HOURS,) * 2)[:, CHURN].astype(np.float64),
                           1e-6, 1 - 1e-6)
            x = np.column_stack([np.log(p) - np.log1p(-p), user[:, list(SAMPLED_INDEX)],
                                 np.log(week) - np.log1p(-week)])
            partitions, categories = state.partition[rows], None
            if self.candidates is not None and state.outcomes.counted(anchor):  # (not purchase_propensity's alone)
                first = rows[leading(partitions, CATEGORY_SAMPLE_PER_PARTITION)]
                counts = state.columns["cat_count"][first, :, 0]  # events (1: visits)
                categories = (*self.candidates(first, at), counts)
            state.outcomes.samples.put(anchor, partitions, state.ids_at(rows), x, categories)
        state.outcomes.version += 1

    def note_sampled(self, anchor: int, head: int) -> None:
        """The head's window after the anchor has closed: whether each user sampled at it bought within it (its
        latest purchase is after the anchor: none after the window is applied yet), or stayed away."""
        for (_, sampled_at), sample in self.state.outcomes.samples.samples.items():
            if sampled_at != anchor:
                continue
            bought, back = self.since_anchor(sample.users, anchor)
            if head == HEADS.index("purchase_propensity"):
                sample.happened[head] = bought | sample.left[:, 0]
            else:
                sample.happened[head] = ~(back | sample.left[:, 1])
        samples = self.state.outcomes.samples
        before, after = samples.matured_at(anchor - 1, head), samples.matured_at(anchor, head)
        if before is not None and after is not None:
            every, rules = held_out_gains(before[:2], after[:2], head)
            # (the bend judged on the statistics with_statistics will weigh: all the head's where they held out)
            idle = idle_gain(before[:2], after[:2], every is not None and every >= HELD_OUT_GATE_NATS) \
                if head == CHURN else None
            for (_, sampled_at), sample in samples.samples.items():
                if sampled_at == anchor:
                    sample.held_out[head], sample.rules_held_out[head] = every, rules
                    if head == CHURN:
                        sample.idle_held_out = idle
        if head == HEADS.index("purchase_propensity"):  # top_categories' week closes with purchase_propensity's
            self.fit_categories(anchor)

    def fit_categories(self, anchor: int) -> None:
        """The anchor's week has closed: which of each sampled user's candidates were engaged with in it, the
        weights fitted on them (models/category_calibration.py), and how the previous anchor's weights ranked these
        users against the published ranking; then the candidates are dropped."""
        open_ = self.state.outcomes.samples.open_categories(anchor)
        if not open_:
            return
        engaged = np.concatenate([c.left | self.engaged_since(s.users[:len(c.keys)], c.keys, c.counts)
                                  for s, c in open_])
        x = np.concatenate([c.x for _, c in open_]).astype(np.float64)
        log_p = x[:, :, 0]
        terms = category_terms(log_p, x[:, :, 1:])
        weights = week_weights(log_p, terms, engaged)
        previous = self.state.outcomes.samples.category_fit(anchor - 1)
        gain = None
        if previous is not None and previous[1].users > 0 and engaged.any():
            gain = judged(log_p, terms, engaged, full_weights(previous[1].weights))
        weeks = (*(previous[1].judged if previous is not None else ()), gain)[-STEADY_WEEKS:]
        cross = cross_validated(log_p, terms, engaged) if gain is None and engaged.any() else None
        for _, candidates in open_:
            candidates.matured(tuple(weights.tolist()), gain, int(engaged.any(axis=1).sum()), weeks, cross)

    def engaged_since(self, users: np.ndarray, keys: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """(N, C) whether each user engaged with each candidate category since the anchor whose candidates (keys) and
        slot counts (counts, (N, K)) these are: the category holds one of the user's slots now with more events
        than the user's slot of it held then (none for a category the user held no slot of). A slot dropped and
        taken again within the week reads as not engaged."""
        state = self.state
        rows = state.find_rows(users)
        found, row = rows >= 0, np.maximum(rows, 0)
        now_keys = state.columns["cat_key"][row]  # (N, K)
        now_counts = state.columns["cat_count"][row, :, 0].astype(np.int64)
        same = (keys[:, :, None] == now_keys[:, None, :]) & (keys[:, :, None] > 0)  # (N, C, K)
        then = np.zeros(keys.shape, dtype=np.int64)
        then[:, :counts.shape[1]] = counts
        return found[:, None] & same.any(axis=2) & ((same * now_counts[:, None, :]).sum(axis=2) > then)

    def count(self, anchor: int, series: tuple[int, ...], rows: np.ndarray, pending: bool = False) -> None:
        """Count the users among `rows` that the table held at the anchor, for these series: those who came back
        after it by their records, those silent since before it said at the anchor's clock from their state
        (unchanged since)."""
        state, slot, at = self.state, anchor % PHASES, anchor * ANCHOR_MS
        columns = state.columns
        back = rows[columns["anchor"][rows, slot] == anchor]
        last = state.last_ts[rows]
        silent = rows[(last >= 0) & (last < at)]
        said = logit_bins(self.probabilities(silent, at))  # both heads at once
        partitions = state.partition[np.concatenate([back, silent])]
        for one in series:
            head = SERIES_HEAD[one]
            bins = np.concatenate([columns["anchor_bins"][back, slot, head], said[:, head]])
            happened = np.zeros(len(back) + len(silent), dtype=np.int64)
            if one == HEADS.index("purchase_propensity"):
                bought = columns["bought_minutes"][back, slot]
                happened[:len(back)] = (bought >= 0) & (bought < PURCHASE_WINDOW_MINUTES)
            else:
                happened[len(back):] = 1  # silent for the whole churn horizon (or the week)
                if one == WEEK_SERIES:
                    happened[:len(back)] = columns["back_minutes"][back, slot] >= PURCHASE_WINDOW_MINUTES
            state.outcomes.add(one, anchor, partitions, bins, happened, pending)


def describe(shop_map: LogitMap) -> str:
    """The map in words, head by head (the log line of each matured anchor)."""
    def head(h: int) -> str:
        week = (" stayed away the week" if h == CHURN and shop_map.churn_from_week else
                " bought the week after the table's first anchor" if h != CHURN and shop_map.purchase_from_table_start
                else "")
        fitted = f" (gain {shop_map.gain_nats[h]:.0f} nats on {shop_map.users[h]:,} users{week})"
        power = (f", a shorter window's share of the hazard to the power {shop_map.churn_share_power:.2f}"
                 if h == CHURN and shop_map.churn_share_power != 1.0 else "")
        if not shop_map.kept[h]:
            return f"{HEADS[h]} as the model says" + fitted
        said = f"{HEADS[h]} {shop_map.a[h]:+.2f} + {shop_map.b[h]:.2f} logit"
        if shop_map.weights[h] is None:
            return said + fitted + power
        held_out = shop_map.weights_held_out_nats[h]
        bend = "" if h != CHURN or shop_map.idle_weights is None else "".join(
            f" {w:+.2f} log_idle_minutes past {k:.1f}" for k, w in zip(shop_map.idle_knots, shop_map.idle_weights))
        return said + "".join(f" {w:+.2f} {name}" for name, w in zip(STATISTICS[h], shop_map.weights[h])) + bend + (
            f" ({shop_map.weights_gain_nats[h]:.0f} nats more on {shop_map.sampled[h]:,} sampled users{week}"
            + ("" if held_out is None else f", the rules' {held_out:.0f} more held out") + ")") + power
    said = [head(h) for h in range(len(HEADS))]
    if any(shop_map.level_shift):
        shifts = ", ".join(f"{HEADS[h]} {shop_map.level_shift[h]:+.2f}" for h in range(len(HEADS)) if shop_map.kept[h])
        said.append("each map's level moved toward the model's (the shop's purchase rate moved "
                    f"{shop_map.rate_volatility:.2f} a week beyond its noise: {shifts})")
    judged_by = None
    if shop_map.category_gain is not None:
        steady = ("" if shop_map.category_steady_gain is None else
                  f"; every one of the latest {STEADY_WEEKS} weeks ahead, by {shop_map.category_steady_gain:+.3f} +- "
                  f"{shop_map.category_steady_gain_se:.3f}")
        judged_by = (f"(the latest two weeks' re-ranking {shop_map.category_gain:+.3f} +- "
                     f"{shop_map.category_gain_se:.3f} of precision@3{steady}; fitted on {shop_map.category_users:,} "
                     "sampled users)")
    elif shop_map.category_cross_gain is not None:
        judged_by = (f"(the first week's re-ranking {shop_map.category_cross_gain:+.3f} +- "
                     f"{shop_map.category_cross_gain_se:.3f} of precision@3 on its own {shop_map.category_users:,} "
                     "sampled users, cross-validated)")
    if judged_by is not None:
        said.append(("top_categories re-ranked " if shop_map.reranks() else "top_categories as the model ranks ")
                    + judged_by)
    return ", ".join(said)
