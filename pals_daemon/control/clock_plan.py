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

- joint with the batch limit: every batch column of the SLO planner's plan is weighed under each lock, and the
  lock runs with the column of least predicted energy that meets the SLO (unlocked: the SLO planner's column);
- measured feasibility: the engine's own finished requests, kept per (lock, batch limit) for MEASURED_MEMORY_S
  (control/measured.py, the store the SLO planner uses per (cap, batch limit) too), decide the feasibility of
  the settings they ran at; one clock step below the lock in force, the requests in
  force scaled by the model's ratio between the two (a probe);
- cap and lock together: a lock is judged, and runs, at the SLO planner's cap (the clock in force is the lower of
  the lock and the clock the cap leaves), budget or not. Running a lock at the engine's top cap instead (this
  planner until 2026-12-06) left the cap that bounds prefill's near-TDP draw unused: on the H100 quick suite's
  week-shaped light cases lock + cap saved 20.9% / 21.0% against default where lock + top cap saved 15.1% /
  17.0% and the best static (cap, clock) 17.6% / 18.5% (bench/slo_suite_h100.py; README "The clock knob in the
  planner").

The SLO planner chooses the cap and batch at the top clock first (so cap-only behaviour is unchanged where there
is no clock knob, and under a budget its caps still bound power: a lock only lowers the clock further), then this
planner the clock with the batch. Pure: no I/O, no clock reads.
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
from pals_daemon.control.measured import MeasuredTails, allowances, probe_ok, within
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
# Measured feasibility (ClockPlanner.observe): the engine's own finished requests, kept per (lock, batch limit)
# they finished under (control/measured.py, its constants and why), judge the settings they ran at: with enough of
# them, their tails decide that setting's feasibility instead of the model's prediction. A setting without its
# own requests one clock step below the one in force is judged by the requests in force scaled by the model's
# ratio between the two (a probe): the engine's own requests set the level, the model the direction.

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
    # The batch-limit columns the SLO planner weighed (its plan's order) and their step token budgets; empty:
    # only ``batch_limit``. Under a lock the clock planner picks the column with the clock (see ``choose``).
    batch_limits: tuple[int, ...] = ()
    tokens_limits: tuple[int, ...] = ()
    num_running: int = 0

    def columns(self) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """(batch limits, token budgets, the SLO planner's column) of the joint search."""
        if not self.batch_limits:
            return (self.batch_limit,), (self.tokens_limit,), 0
        return self.batch_limits, self.tokens_limits, self.batch_limits.index(self.batch_limit)


@dataclass(frozen=True)
class ClockChoice:
    """The planner's lock for one engine this tick (None: unlocked), why, and its prediction at the cap chosen."""

    clock_mhz: int | None
    cause: str
    energy_j_per_token: float = math.nan
    prediction: Prediction | None = None
    # The batch-limit column (Setting.columns order) to run with the lock; unlocked: the SLO planner's own.
    column: int = 0


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
        # Per (lock, batch limit): the requests finished under it (see observe).
        self._measured = MeasuredTails()
        self._in_force: tuple[int | None, int] | None = None
        self.column: int | None = None  # the batch column returned last (None: the SLO planner's)
        # Whether the lock in force was entered on measured feasibility alone (kept while its samples come in).
        self._probed = False

    def observe(self, finished_ms: Sequence[tuple[float, float]], lock_mhz: int | None, batch_limit: int) -> None:
        """Fold in the requests finished in the window under ``lock_mhz`` (None: unlocked) and ``batch_limit``
        (the setting in force from now on); samples older than MEASURED_MEMORY_S are dropped."""
        key = (lock_mhz, int(batch_limit))
        self._in_force = key
        self._measured.observe(key, finished_ms, self._clock_s)

    def measured_tails(
        self, percentile: int, lock_mhz: int | None = None, batch_limit: int | None = None
    ) -> dict[str, float] | None:
        """The ``percentile`` TTFT and TPOT (ms) of the recent requests under (``lock_mhz``, ``batch_limit``), by
        default the setting in force; None with fewer than MEASURED_MIN_REQUESTS."""
        key = self._in_force if batch_limit is None else (lock_mhz, int(batch_limit))
        return self._measured.tails(key, percentile)

    def candidates(self, lo_mhz: int, hi_mhz: int) -> list[int]:
        """The profiled clocks within the engine's supported range, highest first (the top one: unlocked)."""
        cs = [int(c) for c in self.response.clocks_mhz if lo_mhz <= c <= hi_mhz]
        return sorted(set(cs) | {int(min(hi_mhz, self.response.top_clock_mhz))}, reverse=True)

    def evaluate(
        self, slo: SloEngine, clocks_mhz: Sequence[int], at: Setting
    ) -> tuple[NDArray[np.bool_], FloatArray, list[Prediction]]:
        """(feasible, energy per output token J), each (clocks x batch columns), and the prediction per column,
        of the engine at ``cap_w``.

        The SLO planner's own plan, on a copy whose latency model sees the clocked performance model with one
        lock per row (one vectorised prediction for the whole grid). Prefill power there is the cap, up to
        PREFILL_POWER_FRACTION of the top limit; under a lock it is scaled by the lock's power ratio at the
        profile's largest batch (modelled: the most compute-bound point it has; prefill, all compute, falls at
        least as much), which adds the prefill term's share of the difference to each row's energy.
        """
        clocks = np.asarray(clocks_mhz, dtype=float)
        caps = np.full(clocks.shape, float(at.cap_w))
        batches, tokens, _ = at.columns()
        view = copy.copy(slo)
        view.use_measured = False  # its rows share one cap, not one clock: the clock's own samples judge them
        view.latency = clocked_latency(slo.latency, self.response, clocks)
        _, ok, energy = view.plan(
            caps,
            at.n_gpus,
            at.max_limit_w,
            list(batches),
            list(tokens),
            at.num_waiting,
            at.power_ratio,
            at.target,
            num_running=at.num_running,
        )
        _, r_p = self.response.ratios(clocks, float(self.response.batches[-1]))
        p_pre = np.minimum(caps, PREFILL_POWER_FRACTION * at.max_limit_w)
        lam_d, _ = slo.forecast()
        energy = energy.copy()
        for col, pred in enumerate(view.predictions):
            # The prefill part of the busy power, as SloEngine._column weighs it: n x work x prefill share / lam_d.
            saved = at.n_gpus * pred.work * pred.prefill_share * p_pre * (1.0 - r_p) / max(lam_d, 1e-6)
            energy[:, col] -= saved
        return ok, energy, list(view.predictions)

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
        """This tick's lock and batch column for the engine (call after ``slo.observe`` and ``slo.choose`` of the
        same tick).

        Joint in (clock, batch limit) at the SLO planner's cap: the batch limit the SLO planner picked at the
        top clock is the best there, not under a lock. A smaller limit (with its smaller token budget) cuts the
        prompt chunk that stalls every decode, which is what a lock lengthens; a larger one serves prompts in
        fewer steps, which is what a lock needs when it slows them. Unlocked, the SLO planner's column stands.
        """
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
        ok, energy, preds = self.evaluate(slo, cands, at)
        _, _, col0 = at.columns()
        row = {c: k for k, c in enumerate(cands)}
        in_force = self.column if self.column is not None and self.column < len(preds) else col0
        model_ok = ok
        ok = self._measured_ok(slo, ok, preds, cands, row[current], in_force, at)
        batches, _, _ = at.columns()
        lock_now = None if current >= top else current
        if self._probed and current < top and self.measured_tails(90, lock_now, batches[in_force]) is None:
            ok[row[current], in_force] = True  # entered on measurement: kept until its own requests judge it

        # Headroom (modelled): under a lock the forecast decode load may use at most CLOCK_MAX_LOAD of what the
        # engine can serve at the batch limit (or no more than unlocked at the SLO planner's); near saturation the
        # queueing tail, which the mean-value latency model does not see, would eat the slack.
        lam_d, _ = slo.forecast()
        capacity = np.stack([p.capacity_tokens_per_s for p in preds], axis=1)
        load = lam_d / np.maximum(capacity, 1e-9)
        ok = ok & (load <= max(CLOCK_MAX_LOAD, float(load[row[top], col0])))
        clocks = np.array(cands)
        ok = ok & ((clocks >= self.floor_mhz) | (clocks == top))[:, None]

        def column(clock: int) -> int:
            """The batch column to run with ``clock``: unlocked the SLO planner's; locked, the least energy among
            those feasible there (the SLO planner's within ``min_saving`` of it, else the larger limit)."""
            k = row[clock]
            if clock == top or not ok[k].any():
                return col0
            e = np.where(ok[k], energy[k], np.inf)
            near = np.flatnonzero(e <= float(e.min()) * (1 + min_saving))
            return col0 if col0 in near else int(near[-1])

        def cost(clock: int) -> float:
            return float(energy[row[clock], column(clock)])

        def pick(clock: int, cause: str) -> ClockChoice:
            col = column(clock)
            if clock != current:
                self._probed = clock != top and not bool(model_ok[row[clock], col])
            return self._set(clock, cause, cost(clock), _row(preds[col], row[clock]), col)

        if release:
            return pick(top, "clock-release")
        if not ok.any():
            return pick(top, "clock-infeasible")
        best = float(np.min(np.where(ok, energy, np.inf)))
        # Highest feasible clock within min_saving of the least energy (ties: the faster, which absorbs bursts).
        want = max(c for c in cands if ok[row[c]].any() and cost(c) <= best * (1 + min_saving))
        if want >= current:
            return pick(want, "clock-energy" if want != current else "hold")
        # No descent for CLOCK_RELEASE_HOLD_S after a release (the burst that caused it may go on), nor before
        # the engine has been watched as long as the cap waits (startup_hold_s; default one forecast window);
        # after that, down to the floor.
        recent = self._clock_s - self._last_breach_s < CLOCK_RELEASE_HOLD_S
        startup = forecast_window_s if startup_hold_s is None else startup_hold_s
        if recent or self._clock_s < startup:
            return pick(current, "hold")
        if not cost(want) < cost(current) * (1 - min_saving):
            return pick(current, "hold")
        floor = current - CLOCK_STEP_DOWN_MHZ
        step = min((c for c in cands if c >= floor - 1e-9 and c >= want and ok[row[c]].any()), default=want)
        return pick(step, "clock-energy")

    def _measured_ok(
        self,
        slo: SloEngine,
        model_ok: NDArray[np.bool_],
        preds: Sequence[Prediction],
        cands: Sequence[int],
        cur_row: int,
        cur_col: int,
        at: Setting,
    ) -> NDArray[np.bool_]:
        """Per (clock, column): feasible by the setting's own recent requests where it has enough, else by the
        model; one clock step below the clock in force, also by the requests in force scaled by the model's
        ratio of the candidate's predicted tail to the one in force (control/measured.py)."""
        q = slo.config.slo_percentile
        batches, _, _ = at.columns()
        top = cands[0]
        allowed = allowances(at.target, slo.margin)
        overloaded = np.stack([p.overloaded for p in preds], axis=1)
        ok = model_ok.copy()
        for r, clock in enumerate(cands):
            for c, batch in enumerate(batches):
                own = self.measured_tails(q, None if clock >= top else clock, batch)
                if own is not None:
                    ok[r, c] = within(own, allowed) and not overloaded[r, c]
        in_force = self.measured_tails(q)
        below = [r for r, clock in enumerate(cands) if clock < cands[cur_row]]
        if in_force is None or not below:
            return ok
        r = min(below, key=lambda k: cands[cur_row] - cands[k])  # the next clock down
        if self.measured_tails(q, cands[r], batches[cur_col]) is None:  # else judged by its own requests above
            ok[r, cur_col] |= probe_ok(in_force, preds[cur_col], cur_row, r, allowed, q)
        return ok

    def _set(self, clock_mhz: int, cause: str, energy: float, pred: Prediction, column: int) -> ClockChoice:
        locked = None if clock_mhz >= self.response.top_clock_mhz else int(clock_mhz)
        self.clock_mhz = locked
        self.column = column
        return ClockChoice(locked, cause, energy, pred, column)


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
