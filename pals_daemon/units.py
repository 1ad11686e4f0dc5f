"""Unit conversions, in one place so that a factor of 1000 is never written twice."""

from __future__ import annotations

MW_PER_W = 1000  # milliwatts per watt
MJ_PER_J = 1000  # millijoules per joule


def w_to_mw(watts: float) -> int:
    """Watts to whole milliwatts (NVML's unit), rounding down so a limit never exceeds what was asked."""
    return int(watts * MW_PER_W)


def mw_to_w(milliwatts: float) -> float:
    """Milliwatts to watts."""
    return milliwatts / MW_PER_W


def mj_to_j(millijoules: float) -> float:
    """Millijoules to joules."""
    return millijoules / MJ_PER_J
