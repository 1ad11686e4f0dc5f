"""Measured tails per setting: an engine's own recent finished requests, kept per setting they finished under.

The mean-value latency model (control/latency.py) gets the direction of a change right (its ratios follow the
physics) but its level can be off by 1.5-3x at a given setting (the H100 suite's traces: p99 TPOT predicted
55-80 ms at the top clock where the requests measured 41 ms; the A100 quick matrix: the TTFT tail predicted 12x
the measured one behind a one-request backlog). Where a setting has run long enough, its own requests' tails
judge it instead; both planners (the cap's, control/slo.py, and the clock's, control/clock_plan.py) use this.

Modelled choices: a setting's samples are those of the last MEASURED_MEMORY_S (the load the planners plan for
is a forecast window's); with at least MEASURED_MIN_REQUESTS of them (the p99 of 20 is their worst) their
percentile stands for the setting's; at most MEASURED_MAX_REQUESTS per setting and MEASURED_MAX_SETTINGS
settings (memory stays bounded whatever an engine reports).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence

import numpy as np

from pals_daemon.control.latency import Prediction
from pals_daemon.control.types import EngineTargets

MEASURED_MIN_REQUESTS = 20
MEASURED_MAX_REQUESTS = 512
MEASURED_MEMORY_S = 60.0
MEASURED_MAX_SETTINGS = 64


class MeasuredTails:
    """(time s, TTFT ms, TPOT ms) of recent finished requests per setting key."""

    def __init__(self) -> None:
        self._samples: dict[Hashable, deque[tuple[float, float, float]]] = {}

    def observe(self, key: Hashable, finished_ms: Sequence[tuple[float, float]], now_s: float) -> None:
        """Fold in the requests finished under ``key`` by ``now_s``; drop samples older than MEASURED_MEMORY_S
        (and settings left without any, but ``key``). A new setting past MEASURED_MAX_SETTINGS is not kept."""
        if key not in self._samples and len(self._samples) >= MEASURED_MAX_SETTINGS:
            return
        samples = self._samples.setdefault(key, deque(maxlen=MEASURED_MAX_REQUESTS))
        samples.extend((now_s, float(t), float(p)) for t, p in finished_ms)
        for k in list(self._samples):
            d = self._samples[k]
            while d and d[0][0] < now_s - MEASURED_MEMORY_S:
                d.popleft()
            if not d and k != key:
                del self._samples[k]

    def tails(self, key: Hashable | None, percentile: int) -> dict[str, float] | None:
        """The ``percentile`` TTFT and TPOT (ms) of the recent requests under ``key``; None with fewer than
        MEASURED_MIN_REQUESTS (TPOT 0.0 when none of them had more than one output token)."""
        samples = self._samples.get(key) if key is not None else None
        if samples is None or len(samples) < MEASURED_MIN_REQUESTS:
            return None
        arr = np.array(samples, dtype=float)
        out = {}
        for kind, col in (("ttft", 1), ("tpot", 2)):
            v = arr[:, col][np.isfinite(arr[:, col])]
            out[kind] = float(np.percentile(v, percentile)) if v.size else 0.0
        return out


def allowances(target: EngineTargets, margin: float) -> list[tuple[str, float]]:
    """(kind, allowed ms) for each SLO the target sets ("ttft", "tpot"): the SLO x (1 - margin)."""
    pairs = (("ttft", target.ttft_ms), ("tpot", target.tpot_ms))
    return [(kind, ms * (1.0 - margin)) for kind, ms in pairs if ms and ms > 0]


def within(
    tails: dict[str, float], allowed: Sequence[tuple[str, float]], scale: dict[str, float] | None = None
) -> bool:
    """Whether every measured tail (x its ``scale``, if given) is within its allowance."""
    return all(tails[k] * (1.0 if scale is None else scale[k]) <= ms for k, ms in allowed)


def probe_ok(
    in_force: dict[str, float],
    pred: Prediction,
    ref_row: int,
    row: int,
    allowed: Sequence[tuple[str, float]],
    percentile: int,
) -> bool:
    """A probe: the tails measured at ``pred``'s ``ref_row`` (the setting in force), scaled by the model's ratio of
    the predicted tails at ``row`` to those at ``ref_row``, are within the allowances and ``row`` is not overloaded
    (False where a predicted tail is not finite: nothing to scale by)."""
    ratio = {}
    for kind, _ in allowed:
        ref, new = float(pred.tail_ms(kind, percentile)[ref_row]), float(pred.tail_ms(kind, percentile)[row])
        if not (math.isfinite(ref) and ref > 0 and math.isfinite(new)):
            return False
        ratio[kind] = new / ref
    return within(in_force, allowed, ratio) and not bool(pred.overloaded[row])
