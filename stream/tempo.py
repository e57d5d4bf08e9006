"""How fast this shop's users move within a visit, learned from the users in state.

A user idle for 5 minutes is gone in one shop and reading a product page in another: the generated
shops' users take a step every half minute, Taobao's every 3-4 minutes. What the heads learn about
the session going on ("idle this long, still here?") only carries to another shop in that shop's own
unit of time. `ShopTempo` keeps the geometric mean of the gaps between a visit's events (each at
least a second, at most stream/statistics.SESSION_GAP_MS) over the table's users: each user's row
holds the sum of its gaps' log minutes (stream/statistics.py, `step_log_minutes`), and the number of
those gaps is its events less its sessions. Kept as rows change (to float rounding), as `HolderCounts`
(stream/popularity.py) is: a pure function of the table, rebuilt after a restore, nothing written anywhere.
"""

from __future__ import annotations

import numpy as np

DEFAULT_STEP_MINUTES = 0.5  # before the shop has shown a visit of two events: the generated shops' pace


class ShopTempo:
    """Sums, over the table's users, of their in-visit gaps' log minutes and of how many gaps there are."""

    def __init__(self) -> None:
        self.log_minutes = 0.0
        self.steps = 0

    @staticmethod
    def parts(columns: dict[str, np.ndarray], rows: np.ndarray | slice) -> tuple[float, int]:
        """(sum of log minutes, number of in-visit gaps) of these rows' users: a user's events open its
        sessions or follow the one before within SESSION_GAP_MS, so the gaps are events less sessions."""
        steps = columns["counts"][rows].sum(dtype=np.int64) - columns["sessions"][rows].sum(dtype=np.int64)
        return float(columns["step_log_minutes"][rows].sum(dtype=np.float64)), int(steps)

    def rebuild(self, columns: dict[str, np.ndarray], n: int) -> None:
        self.log_minutes, self.steps = self.parts(columns, slice(0, n))

    def change(self, part: tuple[float, int], sign: int) -> None:
        """Add (sign 1) or take away (sign -1) what `parts` returned for some rows."""
        self.log_minutes += sign * part[0]
        self.steps += sign * part[1]

    @property
    def step_minutes(self) -> float:
        """The shop's typical gap between a visit's events, in minutes."""
        if self.steps <= 0:
            return DEFAULT_STEP_MINUTES
        return float(np.exp(self.log_minutes / self.steps))
