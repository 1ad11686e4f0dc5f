"""The clock dimension of the SLO planner: which SM clock to lock an engine's GPUs at, beside its cap and batch.

Where every GPU of an engine has the clock knob (``GpuObservation.clock_control``) and its profile has a clock
dimension (``Profile.clock_points``), each tick, after the SLO planner (control/slo.py) chose the engine's cap
and batch limit, this planner predicts the engine at that (cap, batch) under each profiled clock with the same
latency model and forecast, seen through the clocked performance model (model/clock_model.py: the clock in
force is the lower of the lock and the clock the cap leaves), and picks:

- feasible clocks: not overloaded, every predicted tail within SLO x (1 - margin) (the SLO planner's test);
- the highest feasible clock within ``slo_min_saving`` of the least energy per output token (unlocked where
  the lock saves nothing); none feasible: unlocked;
- headroom: under a lock the forecast load may take at most CLOCK_MAX_LOAD of the engine's capacity;
- fast release: a measured breach or a growing queue unlocks at once; so does the SLO planner's overload regime
  (the SLO not being met at the top settings);
- slow descent: none within CLOCK_RELEASE_HOLD_S of a release nor within one forecast window of the engine's
  start, at most ``CLOCK_STEP_DOWN_MHZ`` lower per tick, and only for a predicted saving of ``slo_min_saving``;
- a learned floor: a release raises the lowest clock the planner may lock to one step above the lock that
  breached; each forecast window without a breach lowers it one step (the bursts a lock must absorb are the
  engine's own, which the mean-value latency model does not see).

Coordinate-wise, not a full 3-D search: the cap and batch are chosen at the top clock first (so cap-only
behaviour is unchanged where there is no clock knob, and the budget split's caps still bound power: a lock only
lowers the clock further), then the clock at them. Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import numpy as np
from numpy.typing import NDArray

from pals_daemon.control.latency import LatencyModel, Prediction
from pals_daemon.control.slo import PREFILL_POWER_FRACTION, SloEngine
from pals_daemon.control.types import EngineTargets, GpuObservation
from pals_daemon.model.clock_model import ClockedPerfModel, ClockResponse

# Modelled choice: the largest step down per tick (0.5 s), so a clock reaches the bottom of an H100's profiled
# range (1980 -> 630 MHz) in five ticks; a release jumps straight back to unlocked.
CLOCK_STEP_DOWN_MHZ = 300.0
# Modelled choice: the largest share of the engine's capacity at its batch limit that the forecast decode load may
# take under a lock. Queueing delay grows without bound near saturation, and the latency model's mean-value TTFT
# only sees the queue already there.
CLOCK_MAX_LOAD = 0.7
# Modelled choice: seconds without descent after a release; the floor (raised above the lock that breached)
# keeps the planner from going straight back to it.
CLOCK_RELEASE_HOLD_S = 10.0

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Setting:
    """The engine's (cap, batch) the SLO planner chose this tick, and what its plan needs to predict it."""

    cap_w: float  # the cap the engine's step runs at (its plan's effective cap)
    n_gpus: int
    max_limit_w: float
    batch_limit: int
    tokens_limit: int
    num_waiting: int
    power_ratio: float
    target: EngineTargets


@dataclass(frozen=True)
class ClockChoice:
    """The planner's lock for one engine this tick (None: unlocked), why, and its prediction at the cap chosen."""

    clock_mhz: int | None
    cause: str
    energy_j_per_token: float = math.nan
    prediction: Prediction | None = None


def clocked_latency(latency: LatencyModel, response: ClockResponse, clocks_mhz: object) -> LatencyModel:
    """A copy of ``latency`` (sharing its learned state) that predicts the engine under the lock(s) ``clocks_mhz``.

    Decode and power come from the clocked performance model; prefill, compute-bound, slows with the clock in
    force: its slowdown is the larger of the cap's (the model's prior) and top clock / lock (modelled: prefill
    time ~ 1 / SM clock, GreenLLM arXiv 2508.16449; the profile's decode points would understate it).
    """
    base = copy.copy(latency)
    lat = copy.copy(latency)
    lat.model = ClockedPerfModel(latency.model, response, clocks_mhz)  # type: ignore[assignment]
    ratio = response.top_clock_mhz / np.maximum(np.asarray(clocks_mhz, dtype=float), 1.0)

    def prefill_slowdown(cap_w: FloatArray) -> FloatArray:
        return np.maximum(base.prefill_slowdown(cap_w), ratio)

    lat.prefill_slowdown = prefill_slowdown  # type: ignore[method-assign]
    return lat


@contextmanager
def locked_view(holder: SloEngine, response: ClockResponse | None, clock_mhz: int | None) -> Iterator[None]:
    """Let ``holder``'s latency model see its engine under ``clock_mhz`` for the block (unlocked or no clock
    dimension: as is). Used while folding in a window that ran under a lock, so the step-time correction learns
    the model's error, not the lock's slowdown (the copy shares the learned state, which the block updates).
    """
    if response is None or clock_mhz is None or clock_mhz >= response.top_clock_mhz:
        yield
        return
    base = holder.latency
    view = clocked_latency(base, response, clock_mhz)
    holder.latency = view
    try:
        yield
    finally:
        holder.latency = base
        # What the block learned into plain attributes (the error EWMAs) goes back to the model itself.
        for name, value in vars(view).items():
            if name not in ("model", "prefill_slowdown"):
                setattr(base, name, value)


def engine_clock_range(own: Sequence[GpuObservation]) -> tuple[int, int] | None:
    """(lowest, highest) clock every GPU of the engine supports, None unless each has the clock knob."""
    if not own or not all(g.clock_control and g.max_clock_mhz > 0 for g in own):
        return None
    return max(g.min_clock_mhz for g in own), min(g.max_clock_mhz for g in own)


def lock_in_force(own: Sequence[GpuObservation]) -> int | None:
    """The lowest ceiling locked on the engine's GPUs now (None: all unlocked); it paces the engine."""
    locks = [g.locked_clock_mhz for g in own if g.locked_clock_mhz is not None]
    return min(locks) if locks else None


class ClockPlanner:
    """One engine's clock choice across ticks (see module docstring)."""

    def __init__(self, response: ClockResponse) -> None:
        self.response = response
        self.clock_mhz: int | None = None
        self._clock_s = 0.0
        self._last_breach_s = -math.inf
        self._growing = 0  # consecutive windows with a growing queue
        # The lowest clock the planner may lock now: raised above a lock that breached, lowered one step per
        # forecast window without a breach (it learns the lowest clock the engine's bursts tolerate).
        self.floor_mhz = 0.0
        self._floor_s = 0.0

    def candidates(self, lo_mhz: int, hi_mhz: int) -> list[int]:
        """The profiled clocks within the engine's supported range, highest first (the top one: unlocked)."""
        cs = [int(c) for c in self.response.clocks_mhz if lo_mhz <= c <= hi_mhz]
        return sorted(set(cs) | {int(min(hi_mhz, self.response.top_clock_mhz))}, reverse=True)

    def evaluate(
        self, slo: SloEngine, clocks_mhz: Sequence[int], at: Setting
    ) -> tuple[NDArray[np.bool_], FloatArray, Prediction]:
        """(feasible, energy per output token J, prediction), one row per clock, of the engine at ``cap_w``.

        The SLO planner's own plan, on a copy whose latency model sees the clocked performance model with one
        lock per row (one vectorised prediction for the whole grid). Prefill power there is the cap, up to
        PREFILL_POWER_FRACTION of the top limit; under a lock it is scaled by the lock's power ratio at the
        profile's largest batch (modelled: the most compute-bound point it has; prefill, all compute, falls at
        least as much), which adds the prefill term's share of the difference to each row's energy.
        """
        clocks = np.asarray(clocks_mhz, dtype=float)
        caps = np.full(clocks.shape, float(at.cap_w))
        view = copy.copy(slo)
        view.latency = clocked_latency(slo.latency, self.response, clocks)
        _, ok, energy = view.plan(
            caps,
            at.n_gpus,
            at.max_limit_w,
            [at.batch_limit],
            [at.tokens_limit],
            at.num_waiting,
            at.power_ratio,
            at.target,
        )
        pred = view.predictions[0]
        _, r_p = self.response.ratios(clocks, float(self.response.batches[-1]))
        p_pre = np.minimum(caps, PREFILL_POWER_FRACTION * at.max_limit_w)
        lam_d, _ = slo.forecast()
        # The prefill part of the busy power, as SloEngine._column weighs it: n x work x prefill share / lam_d.
        saved = at.n_gpus * pred.work * pred.prefill_share * p_pre * (1.0 - r_p) / max(lam_d, 1e-6)
        return ok[:, 0], energy[:, 0] - saved, pred

    def choose(
        self,
        slo: SloEngine,
        window_s: float,
        clock_range: tuple[int, int],
        at: Setting,
        overload_rate: float,
        min_saving: float,
        forecast_window_s: float,
        startup_hold_s: float | None = None,
    ) -> ClockChoice:
        """This tick's lock for the engine (call after ``slo.observe`` and ``slo.choose`` of the same tick)."""
        self._clock_s += max(0.0, window_s)
        lo, hi = clock_range
        cands = self.candidates(lo, hi)
        top = cands[0]
        current = top if self.clock_mhz is None else min(max(self.clock_mhz, lo), top)
        self._growing = self._growing + 1 if slo.queue_growing else 0
        # A queue that keeps growing under a lock (two windows running) is capacity the lock took: give it back.
        release = slo.breach or self._growing >= 2 or slo.breach_rate > overload_rate
        if slo.breach or self._growing >= 2:
            self._last_breach_s = self._floor_s = self._clock_s
            if current < top:
                self.floor_mhz = min(float(top), max(self.floor_mhz, current + CLOCK_STEP_DOWN_MHZ))
        elif self._clock_s - self._floor_s >= forecast_window_s and self.floor_mhz > 0:
            self.floor_mhz = max(0.0, self.floor_mhz - CLOCK_STEP_DOWN_MHZ)
            self._floor_s = self._clock_s
        if current not in cands:
            cands = sorted(set(cands) | {current}, reverse=True)
        ok, energy, pred = self.evaluate(slo, cands, at)
        row = {c: k for k, c in enumerate(cands)}

        def pick(clock: int, cause: str) -> ClockChoice:
            return self._set(clock, cause, float(energy[row[clock]]), _row(pred, row[clock]))

        # Headroom (modelled): under a lock the forecast decode load may use at most CLOCK_MAX_LOAD of what the
        # engine can serve at its batch limit (or no more than unlocked); near saturation the queueing tail, which
        # the mean-value latency model does not see, would eat the slack.
        lam_d, _ = slo.forecast()
        load = lam_d / np.maximum(pred.capacity_tokens_per_s, 1e-9)
        ok = ok & (load <= max(CLOCK_MAX_LOAD, float(load[row[top]])))
        if release:
            return pick(top, "clock-release")
        ok = ok & ((np.array(cands) >= self.floor_mhz) | (np.array(cands) == top))
        if not ok.any():
            return pick(top, "clock-infeasible")
        best = float(np.min(np.where(ok, energy, np.inf)))
        # Highest feasible clock within min_saving of the least energy (ties: the faster, which absorbs bursts).
        want = max(c for c in cands if ok[row[c]] and energy[row[c]] <= best * (1 + min_saving))
        if want >= current:
            return pick(want, "clock-energy" if want != current else "hold")
        # No descent for CLOCK_RELEASE_HOLD_S after a release (the burst that caused it may go on), nor before
        # the engine has been watched as long as the cap waits (startup_hold_s; default one forecast window);
        # after that, down to the floor.
        recent = self._clock_s - self._last_breach_s < CLOCK_RELEASE_HOLD_S
        startup = forecast_window_s if startup_hold_s is None else startup_hold_s
        if recent or self._clock_s < startup:
            return pick(current, "hold")
        if not energy[row[want]] < energy[row[current]] * (1 - min_saving):
            return pick(current, "hold")
        floor = current - CLOCK_STEP_DOWN_MHZ
        step = min((c for c in cands if c >= floor - 1e-9 and c >= want and ok[row[c]]), default=want)
        return pick(step, "clock-energy")

    def _set(self, clock_mhz: int, cause: str, energy: float, pred: Prediction) -> ClockChoice:
        locked = None if clock_mhz >= self.response.top_clock_mhz else int(clock_mhz)
        self.clock_mhz = locked
        return ClockChoice(locked, cause, energy, pred)


def _row(pred: Prediction, k: int) -> Prediction:
    """Row ``k`` of a prediction over several settings, as a one-row prediction."""
    changes = {}
    for f in fields(Prediction):
        v = np.asarray(getattr(pred, f.name))
        changes[f.name] = v[k : k + 1] if v.ndim else v
    return replace(pred, **changes)


def patch_prediction(slo: SloEngine, column: int, row: int, clocked: Prediction) -> None:
    """Put the clocked prediction of the chosen (cap, batch) into the SLO planner's last plan.

    Next tick's calibration compares the measured tails with what was predicted for the settings in force;
    with a lock, that is the clocked prediction, not the top-clock one.
    """
    if not (0 <= column < len(slo.predictions)):
        return
    pred = slo.predictions[column]
    changes = {}
    for f in fields(Prediction):
        if f.name == "caps_w":
            continue
        arr = np.array(getattr(pred, f.name), copy=True)
        if arr.ndim == 0 or arr.size <= row:
            continue
        arr[row] = np.asarray(getattr(clocked, f.name)).reshape(-1)[0]
        changes[f.name] = arr
    slo.predictions[column] = replace(pred, **changes)
