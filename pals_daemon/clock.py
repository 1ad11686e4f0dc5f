"""Clocks: wall time for real GPUs, scaled time for the simulated node (the same daemon code on both)."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds and a sleep measured in the same seconds."""

    def now(self) -> float:
        """Seconds since an arbitrary origin."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class MonotonicClock:
    """The machine's monotonic clock."""

    speed = 1.0

    def now(self) -> float:
        """time.monotonic()."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """asyncio.sleep."""
        await asyncio.sleep(max(0.0, seconds))


class ScaledClock:
    """Simulated time running ``speed`` times faster than the wall clock, starting at 0."""

    def __init__(self, speed: float) -> None:
        if not speed > 0:
            raise ValueError(f"clock speed must be > 0, got {speed!r}")
        self.speed = speed
        self._origin = time.monotonic()

    def now(self) -> float:
        """Simulated seconds since creation."""
        return (time.monotonic() - self._origin) * self.speed

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of simulated time."""
        await asyncio.sleep(max(0.0, seconds) / self.speed)
