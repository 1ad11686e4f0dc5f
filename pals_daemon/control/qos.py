"""PALS's QoS measure, shared by the daemon and the replay so that both count it the same way."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class QosWindows:
    """Windows of ``window_s`` of reported time, and how many of them fell below the throughput target.

    PALS (arXiv 2605.21427) counts control windows below the target; a window here is several ticks long
    (DaemonConfig.qos_window_s) because one tick holds too few decode steps to measure a rate.
    """

    windows: int = 0
    violations: int = 0
    # The window being filled: output tokens and the report time they cover.
    open_tokens: int = 0
    open_s: float = 0.0

    def add(self, tokens: int, seconds: float, window_s: float, target: float | None) -> None:
        """Accumulate one tick's telemetry; close the window once it covers ``window_s`` and judge it."""
        self.open_tokens += tokens
        self.open_s += seconds
        if self.open_s < window_s:
            return
        self.windows += 1
        if target is not None and self.open_tokens / self.open_s < target:
            self.violations += 1
        self.open_tokens, self.open_s = 0, 0.0

    @property
    def violation_fraction(self) -> float:
        """Fraction of closed windows below target (0 before the first closes)."""
        return self.violations / self.windows if self.windows else 0.0
