"""Fitting the decode physics to measured sweeps: where the sweeps live, plausible ranges, a multi-start fit.

Shared by the A100 and H100 loaders (:mod:`pals_daemon.sim.a100`, :mod:`pals_daemon.sim.h100`); the fitted
constants are data (:mod:`pals_daemon.sim.fitted`), rewritten by ``python bench/sim_calibration.py --refit --write``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from pals_daemon.sim.hardware import HardwareProfile
from pals_daemon.sim.physics import DecodePhysics, fit_decode_physics

# The repository's measured data (data/README.md cites each file's source and license).
DATA_DIR = Path(__file__).resolve().parents[2] / "data"


def physics_bounds(hw: HardwareProfile) -> dict[str, tuple[float, float]]:
    """Physically plausible ranges of the fitted physics (modelled).

    Memory-bound work draws at most the board's range above idle; clock-bound work at full clock at most 1.5x
    it (dense GEMMs exceed the default limit when uncapped); alpha between 1 (frequency only) and 4; the
    memory knee below 0.8 of the clock; the routing multiplier within 0.05-8.
    """
    span = hw.max_limit_w - hw.idle_power_w
    return {
        "p_mem_w": (1.0, span),
        "p_sm_w": (1.0, 1.5 * span),
        "alpha": (1.05, 4.0),
        "f_knee": (0.05, 0.8),
        "routing_factor": (0.05, 8.0),
    }


def best_fit(
    base: DecodePhysics,
    b: np.ndarray,
    c: np.ndarray,
    t: np.ndarray,
    p: np.ndarray,
    starts: list[dict[str, float]],
    free: Sequence[str] | None,
    bounds: dict[str, tuple[float, float]],
) -> DecodePhysics:
    """The lowest-cost of the fits started from ``base`` updated with each of ``starts``."""
    best: tuple[float, DecodePhysics] | None = None
    for start in starts:
        init = replace(base, **start)
        if free is None:
            ph = fit_decode_physics(init, b, c, t, p, bounds=bounds)
        else:
            ph = fit_decode_physics(init, b, c, t, p, free=free, bounds=bounds)
        tm, pm, _ = ph.decode(b, c)
        cost = float(np.sum(np.log(tm / t) ** 2 + np.log(pm / p) ** 2))
        if best is None or cost < best[0]:
            best = (cost, ph)
    assert best is not None
    return best[1]
