"""Latency over time from a replay: p90 TTFT/TPOT per window, and a controller's prediction error against it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pals_daemon.replay.simulate import PolicyRun

# Window for p90-over-time figures and for judging predictions (the SLO oracle's window too).
DEFAULT_WINDOW_S = 30.0
# Columns of EngineResult.finished.
_FINISH, _ARRIVAL, _TTFT, _TPOT, _OUT = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class WindowP90:
    """Per window: start s, p90 TTFT ms of the requests whose first token came in it, and p90 TPOT ms of those
    that finished in it (NaN where none; TPOT over requests with more than one output token)."""

    t_s: np.ndarray
    ttft_p90_ms: np.ndarray
    tpot_p90_ms: np.ndarray


def window_p90(finished: np.ndarray, t_end_s: float, window_s: float = DEFAULT_WINDOW_S) -> WindowP90:
    """p90 TTFT (by first-token time) and TPOT (by finish time) per ``window_s`` window over ``[0, t_end_s)``."""
    n = max(1, math.ceil(t_end_s / window_s))
    starts = np.arange(n) * window_s
    ttft = np.full(n, np.nan)
    tpot = np.full(n, np.nan)
    if finished.size:
        first_token_s = finished[:, _ARRIVAL] + finished[:, _TTFT] / 1000.0
        k = np.clip((first_token_s // window_s).astype(int), 0, n - 1)
        for i in np.unique(k):
            ttft[i] = np.percentile(finished[k == i, _TTFT], 90)
        multi = finished[finished[:, _OUT] > 1]
        k = np.clip((multi[:, _FINISH] // window_s).astype(int), 0, n - 1)
        for i in np.unique(k):
            tpot[i] = np.percentile(multi[k == i, _TPOT], 90)
    return WindowP90(starts, ttft, tpot)


@dataclass(frozen=True)
class PredictionError:
    """Median absolute % error of the controller's predicted p90 against the measured p90, per window."""

    ttft_mdape_pct: float | None
    tpot_mdape_pct: float | None
    windows_ttft: int
    windows_tpot: int


def prediction_error(
    run: PolicyRun, engine_index: int = 0, window_s: float = DEFAULT_WINDOW_S
) -> PredictionError | None:
    """Per window: the median of the decisions' predicted p90 (``predicted_ttft_p90_ms`` /
    ``predicted_tpot_p90_ms``, recorded in the timeline) against the p90 of the requests finished in the
    window; None when the policy exposed no prediction at all (e.g. a controller without the fields)."""
    if engine_index >= len(run.engines):
        return None
    eid = run.engines[engine_index].engine_id
    tl = run.timeline
    t = np.asarray(tl.t_s, dtype=float)
    pred_ttft = np.asarray(tl.predicted_ttft_p90_ms.get(eid, []), dtype=float)
    pred_tpot = np.asarray(tl.predicted_tpot_p90_ms.get(eid, []), dtype=float)
    if not t.size or (np.all(np.isnan(pred_ttft)) and np.all(np.isnan(pred_tpot))):
        return None
    measured = window_p90(run.engines[engine_index].finished, run.run_s, window_s)
    k = np.minimum((t // window_s).astype(int), measured.t_s.size - 1)

    def mdape(pred: np.ndarray, meas: np.ndarray) -> tuple[float | None, int]:
        errs = []
        for i in range(meas.size):
            p = pred[(k == i) & ~np.isnan(pred)] if pred.size == k.size else np.zeros(0)
            if p.size and math.isfinite(meas[i]) and meas[i] > 0:
                errs.append(abs(float(np.median(p)) - meas[i]) / meas[i] * 100.0)
        return (float(np.median(errs)) if errs else None), len(errs)

    e_ttft, n_ttft = mdape(pred_ttft, measured.ttft_p90_ms)
    e_tpot, n_tpot = mdape(pred_tpot, measured.tpot_p90_ms)
    return PredictionError(e_ttft, e_tpot, n_ttft, n_tpot)
