"""Undershoot after a budget drop, so that a meter's running average is back under the budget within its window.

A budget is judged by what a meter reads: NVML's averaged power (1 s on Ampere and newer, see
pals_daemon/gpu/backend.py), a BMC or a PDU averaging over a similar window. After a drop at time t the
window still holds the old power, plus the power drawn while the new caps settle (``settle_s``). Holding the
new power at exactly the budget B leaves the average above it for about ``W + settle_s``; holding the GPUs'
limits at

    P_new = (W * B - settle_s * P_old) / (W - settle_s)

for one window W brings the average over [t, t + W] down to B, so the excursion ends one window after the
drop (bench/scenario_s4.py). The cost: one window of lower limits. The controller plans for the budget as
usual; only the limits it hands out are lowered for that window (proportionally above each GPU's minimum),
so its hysteresis and feedback state keep describing the budget itself and it returns to it afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class MeterCompensation:
    """Remembers the last budget and, after a drop below the measured power, a lower ceiling for one window."""

    window_s: float
    settle_s: float
    _started: bool = False
    _last_budget_w: float | None = None
    _hold_until_s: float = float("-inf")
    _hold_w: float = 0.0

    def ceiling_w(self, budget_w: float | None, now_s: float, measured_w: float) -> float | None:
        """The most the node's limits may sum to this tick: ``budget_w``, or less for one window after a drop.

        ``measured_w`` is the node's power as last read (what the meter's window still holds).
        """
        previous, self._last_budget_w = self._last_budget_w, budget_w
        first, self._started = not self._started, True
        if first or budget_w is None or self.window_s <= 0:
            self._hold_until_s = float("-inf")
            return budget_w
        # From no budget to one is a drop too (from unlimited); the first tick has nothing to compare with.
        if budget_w < (previous if previous is not None else float("inf")) and measured_w > budget_w:
            settle_s = min(self.settle_s, 0.9 * self.window_s)
            lowered = (self.window_s * budget_w - settle_s * measured_w) / (self.window_s - settle_s)
            # A drop during a hold lowers it further, never raises it.
            self._hold_w = min(lowered, self._hold_w) if now_s < self._hold_until_s else lowered
            self._hold_until_s = now_s + self.window_s
        if now_s < self._hold_until_s:
            return min(budget_w, self._hold_w)
        return budget_w


def lower_to(
    limits_w: Mapping[int, float], min_w: Mapping[int, float], fixed_w: float, ceiling_w: float
) -> dict[int, float]:
    """``limits_w`` lowered proportionally above each GPU's minimum so that their sum plus ``fixed_w`` is at most
    ``ceiling_w`` (to the minimums where that is not possible); unchanged when they already fit."""
    total = fixed_w + sum(limits_w.values())
    if total <= ceiling_w:
        return dict(limits_w)
    headroom = {i: max(0.0, v - min_w.get(i, 0.0)) for i, v in limits_w.items()}
    spare = sum(headroom.values())
    excess = total - ceiling_w
    keep = max(0.0, 1.0 - excess / spare) if spare > 0 else 0.0
    # Whole watts, rounded down (never above the ceiling), and never below a GPU's minimum.
    return {i: max(min_w.get(i, 0.0), math.floor(limits_w[i] - headroom[i] * (1.0 - keep))) for i in limits_w}
