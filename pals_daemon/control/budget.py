"""The node power budget over time: a set value, optionally reached by a linear ramp. Pure (time passed in)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetSchedule:
    """Budget ``target_w`` reached linearly from ``start_w`` between ``start_s`` and ``start_s + ramp_s``.

    ``target_w`` None means no budget. A ramp that starts from "no budget" starts at the node's maximum
    (the sum of the GPUs' maximum limits), so the budget never jumps.
    """

    target_w: float | None = None
    start_w: float | None = None
    start_s: float = 0.0
    ramp_s: float = 0.0

    def effective_w(self, now_s: float) -> float | None:
        """The budget in force at ``now_s``."""
        if self.target_w is None or self.start_w is None or self.ramp_s <= 0:
            return self.target_w
        progress = (now_s - self.start_s) / self.ramp_s
        if progress >= 1.0:
            return self.target_w
        progress = max(progress, 0.0)
        return self.start_w + (self.target_w - self.start_w) * progress

    def ramp_remaining_s(self, now_s: float) -> float:
        """Seconds until the target is in force (0 when it already is)."""
        if self.target_w is None or self.start_w is None or self.ramp_s <= 0:
            return 0.0
        return max(0.0, self.start_s + self.ramp_s - now_s)

    def retarget(self, target_w: float | None, ramp_s: float, now_s: float, node_max_w: float) -> BudgetSchedule:
        """A schedule moving from the budget in force now to ``target_w`` over ``ramp_s`` seconds."""
        if target_w is None or ramp_s <= 0:
            return BudgetSchedule(target_w=target_w)
        current = self.effective_w(now_s)
        start = node_max_w if current is None else current
        return BudgetSchedule(target_w=target_w, start_w=start, start_s=now_s, ramp_s=ramp_s)
