"""The controller core: observations, profiles and budget in; GPU power limits and batch limits out.

Pure and deterministic: no I/O, no clock reads. Between calls it keeps only feedback state (per-engine
measured/predicted ratios, an integral term, the configuration chosen last tick), so the same sequence of
inputs always yields the same sequence of decisions, live or in trace replay.

One tick, per engine with a profile (docs/ARCHITECTURE.md section 4):
1. feedback: update the throughput and power ratios from the last window when it is comparable with the
   model (the engine was saturated), and the integral term on the throughput error against the target;
2. requirement: the throughput target (x (1 + integral)), or the observed demand with headroom when there
   is none; a TPOT SLO bounds the step time; a TTFT SLO violation raises the required throughput;
3. candidates: a cap grid (``cap_step_w``) over the GPUs' limits x candidate batch limits, evaluated at once
   (numpy) with the corrected model; pick the best tokens/J meeting the requirement, else the most
   throughput; keep last tick's choice unless it misses by more than the hysteresis or the new one is more
   than the hysteresis better;
4. budget (hard): GPUs not controlled count at their enforced limit; engines without a profile and GPUs
   without an engine get a fair share; if the engines' choices overflow what is left, a small DP over
   per-cap options picks the combination that meets the most requirements, then the best efficiency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray

from pals_daemon.control.allocate import Option, solve_budget
from pals_daemon.control.clock_plan import (
    ClockPlanner,
    Setting,
    engine_clock_range,
    lock_in_force,
    locked_view,
    patch_prediction,
)
from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.latency import LatencyModel
from pals_daemon.control.meter import MeterCompensation, lower_to
from pals_daemon.control.slo import SloEngine, slo_mode
from pals_daemon.control.types import (
    ControllerInput,
    Decision,
    EngineDecision,
    EngineObservation,
    EngineTargets,
    GpuObservation,
)
from pals_daemon.errors import InvalidRequestError
from pals_daemon.model.clock_model import ClockResponse, clock_response
from pals_daemon.model.perf_model import PerfModel
from pals_daemon.model.profile import Profile, ProfileRegistry

FloatArray = NDArray[np.float64]

_EPS_W = 1e-6
# Score weights of the budget DP: meeting a requirement dominates closeness to it, which dominates
# efficiency (each per-engine term is in [0, 1], so with fewer than 1000 engines the tiers never mix).
_W_MEET = 1e6
_W_FRACTION = 1e3
_MAX_REASON_ENGINES = 3
_PREDICTION_CACHE_SIZE = 512
# MoE routing skew (Controller._per_gpu_limits), modelled: the fraction of a decode step whose time scales with
# the GPU's share of the routed tokens (expert GEMMs and weight reads); the rest (attention, dense layers, the
# all-to-all) takes the same time on every GPU. 1.0 would be "a GPU with share s takes s x N x the uniform step
# time". 0.5 matches the simulated truth's fit for Mixtral on 4 A100s at batch 16-64 (a GPU with half the
# hottest share may run ~1.4-1.5x slower per uniform step without becoming the straggler).
_ROUTING_EXPERT_TIME_FRACTION = 0.5
# Modelled safety margin: a lowered GPU's predicted time stays this fraction below the straggler's.
_ROUTING_TIME_MARGIN = 0.03
# Shares within this relative spread count as uniform (no per-GPU lowering).
_ROUTING_MIN_SKEW = 0.05
# Resolution of the per-GPU cap search below the engine's cap (W).
_ROUTING_CAP_STEP_W = 5.0


@dataclass(frozen=True)
class EngineFeedback:
    """A snapshot of the feedback state kept for one engine (for metrics and debugging)."""

    tput_ratio: float
    power_ratio: float
    integral: float
    ttft_boost: float
    required_tokens_per_s: float
    cap_w: float | None
    batch: int | None
    # Under latency SLOs (control/slo.py): the adaptive margin and the latency model's relative p90 errors.
    slo_margin: float | None = None
    tpot_p90_error: float | None = None
    ttft_p90_error: float | None = None


@dataclass
class _EngineState:
    tput_ratio: float = 1.0
    power_ratio: float = 1.0
    integral: float = 0.0
    ttft_boost: float = 1.0
    last_waiting: int = 0
    required_tokens_per_s: float = 0.0
    # Whether the configuration in force was predicted to meet its requirement (within the hysteresis).
    predicted_ok: bool = True
    # The grid cap and batch limit chosen last tick (the hysteresis incumbent).
    cap_w: float | None = None
    batch: int | None = None


@dataclass
class _Plan:
    """One profiled engine's candidates for this tick (rows: caps, columns: batch limits)."""

    engine: EngineObservation
    model: PerfModel
    state: _EngineState
    ctrl: list[GpuObservation]
    caps_w: FloatArray
    limits_w: FloatArray  # (caps, controlled GPUs), whole watts
    cost_w: FloatArray  # (caps,) sum of the controlled GPUs' limits
    batches: NDArray[np.int64]
    tput: FloatArray
    power: FloatArray
    eff: FloatArray
    tpot: FloatArray
    tpot_ok: NDArray[np.bool_]
    meets: NDArray[np.bool_]
    required: float
    tpot_slo: float | None
    incumbent: tuple[int, int] | None
    options: list[tuple[float, float, tuple[int, int]]] = field(default_factory=list)
    # Set for engines under latency SLOs: the planner that chose the rows' feasibility and energy.
    slo: SloEngine | None = None


@dataclass(frozen=True)
class _CapGrid:
    """An engine's candidate caps: grid (W), per-GPU limits per cap, and the cap its step really runs at."""

    ctrl: list[GpuObservation]
    fixed_w: list[float]
    unseen: int
    caps_w: FloatArray
    limits_w: FloatArray
    eff_cap_w: FloatArray


def _floor_w(limit_w: FloatArray, min_w: FloatArray) -> FloatArray:
    """Round down to whole watts but never below the GPU's minimum (a fractional minimum stays as is)."""
    v = np.floor(limit_w + 1e-9)
    return np.where(v < min_w, min_w, v)


def _water_fill(total_w: float, lo_w: FloatArray, hi_w: FloatArray) -> FloatArray:
    """Limits in [lo, hi] that share ``total_w`` as evenly as possible, summing to at most ``total_w``."""
    if lo_w.size == 0:
        return lo_w.copy()
    hi_w = np.maximum(hi_w, lo_w)
    if total_w >= hi_w.sum():
        return _floor_w(hi_w, lo_w)
    if total_w <= lo_w.sum():
        return lo_w.copy()
    a, b = float(lo_w.min()), float(hi_w.max())
    for _ in range(60):  # bisection on the common level; 60 halvings resolve any wattage exactly
        mid = 0.5 * (a + b)
        if np.clip(mid, lo_w, hi_w).sum() <= total_w:
            a = mid
        else:
            b = mid
    return _floor_w(np.clip(a, lo_w, hi_w), lo_w)


def _batch_candidates(configured_max: int, candidates: Sequence[int]) -> NDArray[np.int64]:
    top = max(1, configured_max)
    return np.array(sorted({b for b in candidates if b <= top} | {top}), dtype=np.int64)


def _scaled_batched_tokens(engine: EngineObservation, max_num_seqs: int) -> int:
    """The step token budget scaled with the batch limit: at least the batch, never above the configured."""
    configured = engine.configured_max_num_batched_tokens
    if configured < 1:
        return configured
    seqs = max(1, engine.configured_max_num_seqs)
    scaled = configured * max_num_seqs // seqs
    return int(min(max(scaled, max_num_seqs), configured))


def _incumbent(state: _EngineState, caps_w: FloatArray, batches: NDArray[np.int64]) -> tuple[int, int] | None:
    """Row and column of last tick's (cap, batch) choice in this tick's grid (the hysteresis incumbent), if there."""
    if state.cap_w is None or state.batch is None:
        return None
    ci = np.flatnonzero(np.isclose(caps_w, state.cap_w, rtol=0, atol=1e-6))
    bj = np.flatnonzero(batches == state.batch)
    return (int(ci[0]), int(bj[0])) if ci.size and bj.size else None


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _positive(x: float | None) -> float | None:
    """``x`` when it is a finite number > 0 (a usable target), else None."""
    return x if x is not None and math.isfinite(x) and x > 0 else None


class Controller:
    """Picks per-GPU power caps and per-engine batch limits for the best predicted tokens/J (pure core)."""

    def __init__(self, registry: ProfileRegistry, config: ControllerConfig | None = None) -> None:
        self.registry = registry
        self.config = config if config is not None else ControllerConfig()
        self._states: dict[str, _EngineState] = {}
        self._models: dict[int, PerfModel] = {}
        self._pred_cache: dict[tuple[int, bytes, bytes], tuple[FloatArray, FloatArray]] = {}
        self._prev_limits: dict[int, float] | None = None
        self._prev_batches: dict[str, tuple[int, int]] = {}
        self._meter = MeterCompensation(self.config.meter_window_s, self.config.cap_settle_s)
        self._slo: dict[str, SloEngine] = {}
        # The clock knob (control/clock_plan.py): a planner per engine that has it, the last locks decided.
        self._clocks: dict[str, ClockPlanner] = {}
        self._clock_responses: dict[Profile, ClockResponse | None] = {}
        self._prev_locks: dict[int, int | None] = {}

    # ----------------------------------------------------------------------------------------------
    # public
    def feedback(self) -> Mapping[str, EngineFeedback]:
        """The feedback state per engine id (ratios, integral, last choice)."""
        return {
            eid: EngineFeedback(
                tput_ratio=s.tput_ratio,
                power_ratio=s.power_ratio,
                integral=s.integral,
                ttft_boost=s.ttft_boost,
                required_tokens_per_s=s.required_tokens_per_s,
                cap_w=s.cap_w,
                batch=s.batch,
                **self._slo_feedback(eid),
            )
            for eid, s in self._states.items()
        }

    def _slo_feedback(self, engine_id: str) -> dict[str, float | None]:
        slo = self._slo.get(engine_id)
        if slo is None:
            return {}
        lat = slo.latency

        def err(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {"slo_margin": slo.margin, "tpot_p90_error": err(lat.tpot_error), "ttft_p90_error": err(lat.ttft_error)}

    def reset(self) -> None:
        """Forget all feedback state and the previous decision."""
        self._meter = MeterCompensation(self.config.meter_window_s, self.config.cap_settle_s)
        self._states.clear()
        self._slo.clear()
        self._clocks.clear()
        self._prev_locks.clear()
        self._prev_limits = None
        self._prev_batches.clear()

    def step(self, inp: ControllerInput) -> Decision:
        """Decide this tick's GPU power limits and batch limits from ``inp``."""
        cfg = self.config
        budget = inp.budget_w
        if budget is not None and (not math.isfinite(budget) or budget < 0):
            raise InvalidRequestError(f"budget_w must be None or a finite number >= 0, got {budget!r}")

        gpus = {g.index: g for g in inp.gpus}
        ctrl_gpus = [g for g in inp.gpus if g.controlled]
        fixed_w = sum(g.enforced_limit_w for g in inp.gpus if not g.controlled)
        measured_w = sum(max(g.power_avg_w, g.power_instant_w or 0.0) for g in inp.gpus)
        meter_ceiling_w = self._meter.ceiling_w(budget, inp.now_s, measured_w)

        # Each GPU belongs to the first engine that lists it.
        owner: dict[int, str] = {}
        for eng in inp.engines:
            for idx in eng.gpu_indices:
                if idx in gpus and idx not in owner:
                    owner[idx] = eng.engine_id

        plans: list[_Plan] = []
        unprofiled: list[EngineObservation] = []
        live_ids = set()
        for eng in inp.engines:
            live_ids.add(eng.engine_id)
            profile = self.registry.find(eng.model, cfg.gpu_kind)
            if profile is None:
                unprofiled.append(eng)
                continue
            state = self._states.setdefault(eng.engine_id, _EngineState())
            model = self._model(profile)
            target = inp.targets.get(eng.engine_id, EngineTargets())
            own = [gpus[i] for i in eng.gpu_indices if owner.get(i) == eng.engine_id]
            self._update_feedback(state, eng, model, own, target)
            if slo_mode(target):
                plans.append(self._slo_plan(eng, model, state, own, target))
            else:
                self._slo.pop(eng.engine_id, None)
                plans.append(self._plan(eng, model, state, own, target))
        for eid in list(self._states):
            if eid not in live_ids:
                del self._states[eid]
                self._slo.pop(eid, None)

        unprof_ids = {e.engine_id for e in unprofiled}
        prof_ids = {p.engine.engine_id for p in plans}
        unprof_gpus = [g for g in ctrl_gpus if owner.get(g.index) in unprof_ids]
        idle_gpus = [g for g in ctrl_gpus if owner.get(g.index) is None]

        choice, causes, unprof_lim, idle_lim, notes, feasible = self._allocate(
            plans, unprof_gpus, idle_gpus, ctrl_gpus, budget, fixed_w
        )

        limits: dict[int, float] = {}
        for g, v in zip(unprof_gpus, unprof_lim, strict=True):
            limits[g.index] = float(v)
        for g, v in zip(idle_gpus, idle_lim, strict=True):
            limits[g.index] = float(v)
        engine_decisions: dict[str, EngineDecision] = {}
        for p in plans:
            eid = p.engine.engine_id
            i, j = choice[eid]
            for g, lim in zip(p.ctrl, self._per_gpu_limits(p, i, j), strict=True):
                limits[g.index] = float(lim)
            batch = int(p.batches[j])
            p.state.cap_w = float(p.caps_w[i])
            p.state.batch = batch
            p.state.predicted_ok = bool(p.tput[i, j] >= p.required * (1 - self.config.hysteresis))
            pred = p.slo.predictions[j] if p.slo is not None and p.slo.predictions else None
            engine_decisions[eid] = EngineDecision(
                engine_id=eid,
                max_num_seqs=batch,
                max_num_batched_tokens=_scaled_batched_tokens(p.engine, batch),
                predicted_tokens_per_s=float(p.tput[i, j]),
                predicted_power_w=float(p.power[i, j]),
                has_profile=True,
                predicted_ttft_p90_ms=_finite_or_none(pred.ttft_p90_ms[i]) if pred is not None else None,
                predicted_tpot_p90_ms=_finite_or_none(pred.tpot_p90_ms[i]) if pred is not None else None,
            )
        for eng in unprofiled:
            seqs = max(1, eng.configured_max_num_seqs)
            engine_decisions[eng.engine_id] = EngineDecision(
                engine_id=eng.engine_id,
                max_num_seqs=seqs,
                max_num_batched_tokens=_scaled_batched_tokens(eng, seqs),
                predicted_tokens_per_s=0.0,
                predicted_power_w=0.0,
                has_profile=False,
            )
        if budget is not None and feasible:
            self._enforce_budget(limits, gpus, budget - fixed_w, notes)
        locks = self._clock_decisions(plans, choice, inp, engine_decisions)
        # Keep engine decisions in the input's order.
        engine_decisions = {e.engine_id: engine_decisions[e.engine_id] for e in inp.engines}

        changed = self._changed(limits, engine_decisions, inp) or locks != self._prev_locks
        self._prev_locks = dict(locks)
        self._prev_limits = dict(limits)
        self._prev_batches = {eid: (d.max_num_seqs, d.max_num_batched_tokens) for eid, d in engine_decisions.items()}
        reason = self._reason(changed, causes, notes, plans, prof_ids)
        if budget is not None and meter_ceiling_w is not None and meter_ceiling_w < budget:
            # Only what is handed out is lowered: the plan (and its hysteresis) stays the budget's.
            min_w = {g.index: g.min_limit_w for g in ctrl_gpus}
            limits = lower_to(limits, min_w, fixed_w, meter_ceiling_w)
            changed = True
            reason += f"; limits held to {meter_ceiling_w:.0f} W for the meter's window after the budget drop"
        return Decision(
            gpu_limits_w=limits, engines=engine_decisions, changed=changed, reason=reason, gpu_locked_clocks_mhz=locks
        )

    def _clock_response(self, profile: Profile) -> ClockResponse | None:
        if profile not in self._clock_responses:
            self._clock_responses[profile] = clock_response(profile)
        return self._clock_responses[profile]

    def _clock_decisions(
        self,
        plans: list[_Plan],
        choice: Mapping[str, tuple[int, int]],
        inp: ControllerInput,
        engine_decisions: dict[str, EngineDecision],
    ) -> dict[int, int | None]:
        """Each clock-controlled GPU's lock (None: unlocked), chosen with its engine's batch at its cap:
        clock_plan.py.

        Only engines under latency SLOs whose every GPU has the clock knob and whose profile has a clock
        dimension get a lock; every other GPU with the knob is left unlocked. The caps are untouched: a lock runs
        at the cap the SLO planner (or, with a budget, the split) chose, and only lowers the clock further.
        """
        locks: dict[int, int | None] = {g.index: None for g in inp.gpus if g.clock_control and g.controlled}
        live = set()
        for p in plans:
            eid = p.engine.engine_id
            rng = engine_clock_range(p.ctrl)
            resp = self._clock_response(p.model.profile)
            if p.slo is None or rng is None or resp is None or not p.slo.predictions:
                continue
            live.add(eid)
            planner = self._clocks.setdefault(eid, ClockPlanner(resp))
            planner.observe(p.engine.finished_ms, lock_in_force(p.ctrl), p.engine.current_max_num_seqs)
            i, j = choice[eid]
            cfg = self.config
            batch = int(p.batches[j])
            at = Setting(
                cap_w=float(p.slo.predictions[j].caps_w[i]),
                n_gpus=len(p.engine.gpu_indices) or p.model.num_gpus,
                max_limit_w=max(g.max_limit_w for g in p.ctrl),
                batch_limit=batch,
                tokens_limit=_scaled_batched_tokens(p.engine, batch),
                num_waiting=p.engine.num_waiting,
                power_ratio=p.state.power_ratio,
                target=inp.targets.get(eid, EngineTargets()),
                batch_limits=tuple(int(b) for b in p.batches),
                tokens_limits=tuple(_scaled_batched_tokens(p.engine, int(b)) for b in p.batches),
                num_running=p.engine.num_running,
            )
            ch = planner.choose(
                p.slo,
                p.engine.window_s,
                rng,
                at,
                cfg.slo_infeasible_breach_rate,
                cfg.slo_min_saving,
                cfg.slo_forecast_window_s,
                cfg.slo_startup_hold_s,
            )
            if ch.column != j:
                j = self._clock_batch(p, i, ch.column, engine_decisions)
            if ch.prediction is not None:
                patch_prediction(p.slo, j, i, ch.prediction)
                pred = p.slo.predictions[j]
                engine_decisions[eid] = replace(
                    engine_decisions[eid],
                    predicted_ttft_p90_ms=_finite_or_none(float(pred.ttft_p90_ms[i])),
                    predicted_tpot_p90_ms=_finite_or_none(float(pred.tpot_p90_ms[i])),
                )
            for g in p.ctrl:
                locks[g.index] = ch.clock_mhz
        for eid in [e for e in self._clocks if e not in live]:
            del self._clocks[eid]
        return locks

    @staticmethod
    def _clock_batch(p: _Plan, row: int, col: int, engine_decisions: dict[str, EngineDecision]) -> int:
        """Run the engine at batch column ``col`` (the clock planner's, chosen with the lock) instead of the SLO
        planner's; the SLO planner's state follows, so next tick calibrates against it. Returns ``col``."""
        eid = p.engine.engine_id
        batch = int(p.batches[col])
        p.state.batch = batch
        if p.slo is not None:
            p.slo.column = col
        engine_decisions[eid] = replace(
            engine_decisions[eid],
            max_num_seqs=batch,
            max_num_batched_tokens=_scaled_batched_tokens(p.engine, batch),
            predicted_tokens_per_s=float(p.tput[row, col]),
        )
        return col

    def _allocate(
        self,
        plans: list[_Plan],
        unprof_gpus: list[GpuObservation],
        idle_gpus: list[GpuObservation],
        ctrl_gpus: list[GpuObservation],
        budget: float | None,
        fixed_w: float,
    ) -> tuple[dict[str, tuple[int, int]], dict[str, str], FloatArray, FloatArray, list[str], bool]:
        """Split the budget: engines' (cap, batch) choices, limits of unprofiled and idle GPUs, notes.

        Order: every controlled GPU's minimum is reserved; GPUs of engines without a profile get a fair
        share (at most their default); profiled engines choose within what is left (DP when it overflows);
        GPUs without an engine share the remainder up to their default. Returns feasible=False when the
        budget cannot cover the minimums (everything at its minimum).
        """

        def arr(gs: list[GpuObservation], attr: str) -> FloatArray:
            return np.array([getattr(g, attr) for g in gs], dtype=np.float64)

        def default_w(gs: list[GpuObservation]) -> FloatArray:
            lo = arr(gs, "min_limit_w")
            return _floor_w(np.clip(arr(gs, "default_limit_w"), lo, arr(gs, "max_limit_w")), lo)

        feasible = True
        choice: dict[str, tuple[int, int]] = {}
        causes: dict[str, str] = {}
        notes: list[str] = []
        if budget is None:
            unprof_lim = default_w(unprof_gpus)
            idle_lim = default_w(idle_gpus)
            for p in plans:
                choice[p.engine.engine_id], causes[p.engine.engine_id] = self._choose_free(p)
        else:
            avail_w = budget - fixed_w
            min_total_w = float(sum(g.min_limit_w for g in ctrl_gpus))
            if avail_w < min_total_w - _EPS_W:
                # Infeasible budget: the lowest the node can go. Engines still pick a batch at their minimum.
                feasible = False
                unprof_lim = arr(unprof_gpus, "min_limit_w")
                idle_lim = arr(idle_gpus, "min_limit_w")
                for p in plans:
                    choice[p.engine.engine_id] = self._pick(p, rows=slice(0, 1))
                    causes[p.engine.engine_id] = "budget"
                notes.append(
                    f"budget {budget:.0f} W below the minimum {min_total_w + fixed_w:.0f} W: every GPU at its minimum"
                )
            else:
                level_w = avail_w / max(1, len(ctrl_gpus))
                unprof_lo = arr(unprof_gpus, "min_limit_w")
                unprof_want = _floor_w(np.clip(level_w, unprof_lo, default_w(unprof_gpus)), unprof_lo)
                idle_lo = arr(idle_gpus, "min_limit_w")
                prof_min_w = float(sum(p.cost_w[0] for p in plans))
                unprof_room_w = avail_w - prof_min_w - float(idle_lo.sum())
                unprof_lim = _water_fill(min(float(unprof_want.sum()), unprof_room_w), unprof_lo, unprof_want)
                engine_budget_w = avail_w - float(unprof_lim.sum()) - float(idle_lo.sum())
                for p in plans:
                    choice[p.engine.engine_id], causes[p.engine.engine_id] = self._choose_free(p)
                used_w = sum(float(p.cost_w[choice[p.engine.engine_id][0]]) for p in plans)
                if used_w > engine_budget_w + _EPS_W:
                    picks = self._solve_budget(plans, engine_budget_w)
                    for p, ij in zip(plans, picks, strict=True):
                        eid = p.engine.engine_id
                        if ij != p.incumbent:
                            causes[eid] = "budget"
                        elif causes[eid] != "hold":
                            causes[eid] = "hold"
                        choice[eid] = ij
                    missing = sum(1 for p in plans if not p.meets[choice[p.engine.engine_id]])
                    notes.append(
                        f"budget {budget:.0f} W binds" + (f", {missing} engine(s) below requirement" if missing else "")
                    )
                    used_w = sum(float(p.cost_w[choice[p.engine.engine_id][0]]) for p in plans)
                idle_lim = _water_fill(avail_w - used_w - float(unprof_lim.sum()), idle_lo, default_w(idle_gpus))
        return choice, causes, unprof_lim, idle_lim, notes, feasible

    # ----------------------------------------------------------------------------------------------
    # model and feedback
    def _model(self, profile: Profile) -> PerfModel:
        model = self._models.get(id(profile))
        if model is None or model.profile is not profile:
            model = PerfModel(profile)
            self._models[id(profile)] = model
        return model

    def _raw_predict(
        self, model: PerfModel, caps_w: FloatArray, batches: NDArray[np.int64]
    ) -> tuple[FloatArray, FloatArray]:
        key = (id(model), caps_w.tobytes(), batches.tobytes())
        hit = self._pred_cache.get(key)
        if hit is None:
            hit = model.predict(caps_w[:, None], batches[None, :])
            if len(self._pred_cache) >= _PREDICTION_CACHE_SIZE:
                self._pred_cache.clear()
            self._pred_cache[key] = hit
        return hit

    @staticmethod
    def _tput_scale(eng: EngineObservation, model: PerfModel) -> float:
        # A profile measured on N GPUs used for an engine on M GPUs: scale throughput by M/N (modelled,
        # a first guess only; the feedback ratio corrects it once the engine is saturated).
        n = len(eng.gpu_indices)
        return n / model.num_gpus if n else 1.0

    def _update_feedback(
        self,
        state: _EngineState,
        eng: EngineObservation,
        model: PerfModel,
        own: list[GpuObservation],
        target: EngineTargets,
    ) -> None:
        cfg = self.config
        growing = eng.num_waiting > state.last_waiting
        state.last_waiting = eng.num_waiting
        if eng.window_s <= 0:
            return  # no report in the window: nothing to learn from
        ttft_slo, ttft_ms = _positive(target.ttft_ms), eng.ttft_p90_ms
        if ttft_slo is not None and ttft_ms is not None and math.isfinite(ttft_ms):
            if ttft_ms > ttft_slo:
                state.ttft_boost = min(cfg.ttft_boost_max, state.ttft_boost * (1 + cfg.ttft_boost_step))
            elif ttft_ms < ttft_slo * (1 - cfg.hysteresis):
                state.ttft_boost = max(1.0, state.ttft_boost / (1 + 0.5 * cfg.ttft_boost_step))
        measured = eng.throughput_tokens_per_s
        if not _finite(measured) or measured < 0:
            return
        target_tps = _positive(target.tokens_per_s)
        batch_in_force = eng.current_max_num_seqs or state.batch or max(1, eng.configured_max_num_seqs)
        # Predict at what was really in force: the enforced limits (someone else may have capped lower).
        ctrl_caps = [g.enforced_limit_w for g in own if _finite(g.enforced_limit_w) and g.enforced_limit_w > 0]
        cap_w = min(ctrl_caps) if ctrl_caps else model.max_cap_w
        hot_cap = self._hot_cap_w(eng, own) if cfg.routing_aware_caps else None
        if hot_cap is not None:
            # Routing-aware limits: the cold GPUs sit lower on purpose; the most loaded GPU sets the pace.
            cap_w = hot_cap
        t_pred, p_pred = model.predict(cap_w, batch_in_force)
        t_pred = float(t_pred) * self._tput_scale(eng, model)
        capacity = t_pred * state.tput_ratio
        saturated = eng.busy_fraction >= cfg.saturation_busy_fraction and (
            eng.num_waiting > 0 or eng.num_running >= cfg.saturation_running_fraction * batch_in_force
        )
        if saturated and t_pred > 0:
            a = cfg.ratio_ewma_alpha
            sample = min(cfg.ratio_max, max(cfg.ratio_min, measured / t_pred))
            state.tput_ratio = (1 - a) * state.tput_ratio + a * sample
            powers = [g.power_avg_w for g in own if _finite(g.power_avg_w) and g.power_avg_w > 0]
            if powers and float(p_pred) > 0:
                # Predicted per-GPU power at each GPU's own enforced limit, averaged like the measurement.
                pred = float(np.mean([min(float(p_pred), g.enforced_limit_w) for g in own]))
                sample = min(cfg.ratio_max, max(cfg.ratio_min, float(np.mean(powers)) / pred))
                state.power_ratio = (1 - a) * state.power_ratio + a * sample
            if target_tps is not None:
                err = (target_tps - measured) / target_tps
                if err <= 0:
                    state.integral = max(0.0, state.integral + cfg.integral_gain * err)
                elif state.predicted_ok:
                    # The model said it would meet and it did not: model error, which the integral corrects.
                    err = max(err, cfg.integral_min_error)
                    state.integral = min(cfg.integral_max, state.integral + cfg.integral_gain * err)
                else:
                    # Anti-windup: the miss was predicted (budget or capacity bound), integrating cannot help
                    # and a wound-up requirement would hide configurations that meet the target itself.
                    state.integral *= 0.5
        if target_tps is None:
            # Serve the offered demand: what came through, with headroom; more when a queue builds.
            required = measured * cfg.demand_headroom
            # Busy time counts prefill too, which decode tokens/s misses: scale what the configuration in
            # force can do by how busy it kept the engine, so a prefill-heavy load is not starved.
            required = max(required, capacity * eng.busy_fraction / cfg.target_busy_fraction)
            if eng.num_waiting > 0:
                boost = (1 + cfg.queue_boost) if growing else 1.0
                required = max(required, capacity * boost)
            state.required_tokens_per_s = max(required, state.required_tokens_per_s * cfg.demand_decay_per_tick)

    @staticmethod
    def _hot_cap_w(eng: EngineObservation, own: list[GpuObservation]) -> float | None:
        """Enforced limit of the engine's most loaded GPU under a known skewed expert load, else None."""
        share = eng.expert_load_share
        if not share:
            return None
        vals = [(share.get(g.index), g) for g in own]
        known = [(v, g) for v, g in vals if v is not None and math.isfinite(v) and v >= 0]
        if len(known) != len(own) or len(own) < 2:
            return None
        hi = max(v for v, _ in known)
        lo = min(v for v, _ in known)
        if hi <= 0 or hi <= lo * (1 + _ROUTING_MIN_SKEW):
            return None
        caps = [g.enforced_limit_w for v, g in known if v >= hi * (1 - 1e-9)]
        cap = min(caps)
        return cap if _finite(cap) and cap > 0 else None

    def _cap_grid(self, eng: EngineObservation, model: PerfModel, own: list[GpuObservation]) -> _CapGrid:
        cfg = self.config
        ctrl = [g for g in own if g.controlled]
        fixed = [g.enforced_limit_w for g in own if not g.controlled]
        # GPUs listed by the engine but not observed (or owned by another engine): unknown limit.
        unseen = len(eng.gpu_indices) - len(own)
        if not eng.gpu_indices:
            unseen = model.num_gpus
        mins = np.array([g.min_limit_w for g in ctrl], dtype=np.float64)
        maxs = np.array([g.max_limit_w for g in ctrl], dtype=np.float64)
        if ctrl:
            lo, hi = float(mins.min()), float(maxs.max())
            if cfg.fixed_cap_w is not None:
                caps = np.array([min(max(float(cfg.fixed_cap_w), lo), hi)], dtype=np.float64)
            else:
                caps = np.arange(lo, hi, cfg.cap_step_w, dtype=np.float64)
                caps = np.unique(np.append(caps, hi))
            limits = _floor_w(np.clip(caps[:, None], mins, maxs), mins)
            eff_cap = limits.min(axis=1)
        else:
            caps = np.array([min(fixed) if fixed else model.max_cap_w], dtype=np.float64)
            limits = np.zeros((1, 0))
            eff_cap = caps.copy()
        if fixed:
            # A tensor-parallel step runs at the pace of its most tightly capped GPU.
            eff_cap = np.minimum(eff_cap, min(fixed))
        eff_cap = np.maximum(eff_cap, 1.0)
        return _CapGrid(ctrl, fixed, unseen, caps, limits, eff_cap)

    def _plan(
        self,
        eng: EngineObservation,
        model: PerfModel,
        state: _EngineState,
        own: list[GpuObservation],
        target: EngineTargets,
    ) -> _Plan:
        cfg = self.config
        grid = self._cap_grid(eng, model, own)
        ctrl, fixed, unseen = grid.ctrl, grid.fixed_w, grid.unseen
        caps, limits, eff_cap = grid.caps_w, grid.limits_w, grid.eff_cap_w
        if cfg.fixed_batch is not None:
            batches = np.array([min(cfg.fixed_batch, max(1, eng.configured_max_num_seqs))], dtype=np.int64)
        else:
            batches = _batch_candidates(eng.configured_max_num_seqs, cfg.candidate_batches)
        t0, p0 = self._raw_predict(model, eff_cap, batches)
        tput = t0 * (state.tput_ratio * self._tput_scale(eng, model))
        p_gpu = p0 * state.power_ratio
        all_limits = np.concatenate([limits, np.tile(np.array(fixed + [np.inf] * unseen), (caps.size, 1))], axis=1)
        power = np.minimum(p_gpu[:, :, None], all_limits[:, None, :]).sum(axis=2)
        eff = tput / np.maximum(power, 1e-9)
        tpot = 1000.0 * batches[None, :] / np.maximum(tput, 1e-9)

        target_tps = _positive(target.tokens_per_s)
        if target_tps is not None:
            required = target_tps * (1 + state.integral)
            state.required_tokens_per_s = required
        else:
            required = state.required_tokens_per_s
        required *= state.ttft_boost
        tpot_slo = _positive(target.tpot_ms)
        tpot_ok = tpot <= tpot_slo if tpot_slo is not None else np.ones_like(tput, dtype=bool)
        meets = (tput >= required) & tpot_ok

        incumbent = _incumbent(state, caps, batches)
        plan = _Plan(
            engine=eng,
            model=model,
            state=state,
            ctrl=ctrl,
            caps_w=caps,
            limits_w=limits,
            cost_w=limits.sum(axis=1),
            batches=batches,
            tput=tput,
            power=power,
            eff=eff,
            tpot=tpot,
            tpot_ok=tpot_ok,
            meets=meets,
            required=required,
            tpot_slo=tpot_slo,
            incumbent=incumbent,
        )
        return plan

    def _slo_plan(
        self,
        eng: EngineObservation,
        model: PerfModel,
        state: _EngineState,
        own: list[GpuObservation],
        target: EngineTargets,
    ) -> _Plan:
        """Candidates of an engine under latency SLOs (control/slo.py): caps x batch limits (the configured one,
        its half and its quarter, each with the step token budget scaled alike; the configured one last)."""
        grid = self._cap_grid(eng, model, own)
        slo = self._slo.get(eng.engine_id)
        if slo is None:
            slo = SloEngine(LatencyModel(model, self._tput_scale(eng, model)), self.config)
            self._slo[eng.engine_id] = slo
        enforced = [g.enforced_limit_w for g in own if _finite(g.enforced_limit_w) and g.enforced_limit_w > 0]
        cap_in_force = min(enforced) if enforced else model.max_cap_w
        hot = self._hot_cap_w(eng, own) if self.config.routing_aware_caps else None
        if hot is not None:
            cap_in_force = hot
        powers = [g.power_avg_w for g in own if _finite(g.power_avg_w) and g.power_avg_w > 0]
        gpu_power_w = float(np.mean(powers)) if powers else 0.0
        at_top = cap_in_force >= float(grid.eff_cap_w.max()) - 1.0
        # A window run under a lock is folded in through the clocked model (the lock's slowdown is not an error).
        with locked_view(slo, self._clock_response(model.profile), lock_in_force(own)):
            slo.observe(eng, cap_in_force, at_top, target, gpu_power_w, lock_in_force(own))
        n_gpus = len(eng.gpu_indices) or model.num_gpus
        max_limit_w = max((g.max_limit_w for g in own), default=model.max_cap_w)
        configured = max(1, eng.configured_max_num_seqs)
        batches = np.array(sorted({max(1, configured // 4), max(1, configured // 2), configured}), dtype=np.int64)
        tokens = [_scaled_batched_tokens(eng, int(b)) for b in batches]
        power, ok, energy = slo.plan(
            grid.eff_cap_w,
            n_gpus,
            max_limit_w,
            [int(b) for b in batches],
            tokens,
            eng.num_waiting,
            state.power_ratio,
            target,
            num_running=eng.num_running,
        )
        lam_d, _ = slo.forecast()
        served = np.stack([np.minimum(lam_d, pr.capacity_tokens_per_s) for pr in slo.predictions], axis=1)
        tpot = np.stack([pr.tpot_p90_ms for pr in slo.predictions], axis=1)
        incumbent = _incumbent(state, grid.caps_w, batches)
        return _Plan(
            engine=eng,
            model=model,
            state=state,
            ctrl=grid.ctrl,
            caps_w=grid.caps_w,
            limits_w=grid.limits_w,
            cost_w=grid.limits_w.sum(axis=1),
            batches=batches,
            tput=served,
            power=power,
            eff=1.0 / np.maximum(energy, 1e-12),
            tpot=tpot,
            tpot_ok=ok,
            meets=ok,
            required=lam_d,
            tpot_slo=_positive(target.tpot_ms),
            incumbent=incumbent,
            slo=slo,
        )

    # ----------------------------------------------------------------------------------------------
    # choice
    @staticmethod
    def _pick(p: _Plan, rows: slice = slice(None)) -> tuple[int, int]:
        """Best (cap, batch) index in ``rows``: max tokens/J meeting the requirement, else most throughput."""
        meets, eff, tput = p.meets[rows], p.eff[rows], p.tput[rows]
        offset = rows.start or 0
        # argmax returns the first maximum in row-major order: ties go to the lower cap, then smaller batch.
        if meets.any():
            flat = int(np.argmax(np.where(meets, eff, -np.inf)))
        elif p.tpot_ok[rows].any():
            flat = int(np.argmax(np.where(p.tpot_ok[rows], tput, -np.inf)))
        else:
            flat = int(np.argmin(p.tpot[rows]))
        i, j = divmod(flat, meets.shape[1])
        return i + offset, j

    def _incumbent_ok(self, p: _Plan) -> bool:
        if p.incumbent is None:
            return False
        h = self.config.hysteresis
        i, j = p.incumbent
        if p.tput[i, j] < p.required * (1 - h):
            return False
        return p.tpot_slo is None or bool(p.tpot[i, j] <= p.tpot_slo * (1 + h))

    def _choose_free(self, p: _Plan) -> tuple[tuple[int, int], str]:
        """The engine's choice ignoring the budget, with hysteresis against last tick's choice."""
        if p.slo is not None:
            ch = p.slo.choose(1.0 / p.eff, p.meets, p.caps_w, p.incumbent)
            return (ch.row, ch.col), ch.cause
        best = self._pick(p)
        if p.incumbent is None:
            return best, "first"
        if not self._incumbent_ok(p):
            return best, "missed"
        if p.eff[best] > p.eff[p.incumbent] * (1 + self.config.hysteresis):
            return best, "efficiency"
        return p.incumbent, "hold"

    def _options(self, p: _Plan) -> list[tuple[float, float, tuple[int, int]]]:
        """Per-cap best options (cost, score, index) for the budget DP, plus the incumbent with its bonus."""
        if p.slo is not None and p.slo.choice is not None:
            return self._slo_options(p, p.slo.choice)
        h = self.config.hysteresis
        eff_max = float(p.eff.max()) or 1.0
        n_rows, _ = p.meets.shape
        has_meet = p.meets.any(axis=1)
        j_meet = np.argmax(np.where(p.meets, p.eff, -np.inf), axis=1)
        has_tpot = p.tpot_ok.any(axis=1)
        j_tpot = np.argmax(np.where(p.tpot_ok, p.tput, -np.inf), axis=1)
        j_min = np.argmin(p.tpot, axis=1)
        js = np.where(has_meet, j_meet, np.where(has_tpot, j_tpot, j_min))
        if p.slo is not None:
            # Short of the SLO at a cap: the configured batch limit (last column). A smaller one predicted closer
            # to the SLO may not keep up with the arrivals, and a queue costs more than the tail it saves.
            js = np.where(has_meet, j_meet, p.meets.shape[1] - 1)

        def score(i: int, j: int, slack: float) -> float:
            meets = p.tput[i, j] >= p.required * (1 - slack) and (
                p.tpot_slo is None or p.tpot[i, j] <= p.tpot_slo * (1 + slack)
            )
            if p.slo is not None and p.slo.closeness.shape == p.meets.shape:
                # Under latency SLOs the budget split weighs how close a cap comes to the SLO, not throughput
                # (at a binding budget every cap may serve the arrivals; the higher ones keep the tail shorter).
                frac = min(1.0, float(p.slo.closeness[i, j]) * (1 + slack))
            else:
                frac = 1.0 if p.required <= 0 else min(1.0, p.tput[i, j] * (1 + slack) / p.required)
            effn = min(1.0, p.eff[i, j] * (1 + slack) / eff_max)
            return _W_MEET * meets + _W_FRACTION * frac + effn

        opts = [(float(p.cost_w[i]), score(i, int(js[i]), 0.0), (i, int(js[i]))) for i in range(n_rows)]
        if p.incumbent is not None:
            i, j = p.incumbent
            opts.append((float(p.cost_w[i]), score(i, j, h), (i, j)))
        return opts

    @staticmethod
    def _slo_options(p: _Plan, choice: tuple[int, int]) -> list[tuple[float, float, tuple[int, int]]]:
        """Budget options of an engine under latency SLOs: its planner's choice (which "meets"), and every lower
        cap at the configured batch, scored by how close it comes to the SLO, then by height (a higher cap keeps
        more of the SLO than the planner's optimistic prediction of a lower one). Nothing above the choice: the
        planner's rate limits and breach holds stay in force, and a binding budget only ever lowers it."""
        row_c, col_c = choice
        last = p.meets.shape[1] - 1
        closeness = p.slo.closeness if p.slo is not None and p.slo.closeness.shape == p.meets.shape else None
        opts = []
        for i in range(min(row_c, p.meets.shape[0] - 1) + 1):
            j = col_c if i == row_c else last
            close = 1.0 if closeness is None else min(1.0, float(closeness[i, j]))
            score = _W_MEET * (i == row_c) + _W_FRACTION * close + i / max(1, row_c)
            opts.append((float(p.cost_w[i]), score, (i, j)))
        return opts

    def _solve_budget(self, plans: list[_Plan], budget_w: float) -> list[tuple[int, int]]:
        """The per-engine options that fit ``budget_w`` with the best summed score (control/allocate.py)."""
        options = [[Option(cost_w, score, ij) for cost_w, score, ij in self._options(p)] for p in plans]
        picks = solve_budget(options, budget_w)
        if picks is None:
            # Cannot happen when the budget covers every minimum; fall back to each engine's minimum.
            return [self._pick(q, rows=slice(0, 1)) for q in plans]
        return [tuple(ij) for ij in picks]  # type: ignore[misc]

    def _per_gpu_limits(self, p: _Plan, row: int, col: int | None = None) -> FloatArray:
        """The engine's per-GPU limits for the chosen cap row (and batch column).

        Uniform (``p.limits_w[row]``) unless ``routing_aware_caps`` is set and the engine reports a skewed
        expert load share over all its GPUs (docs/ARCHITECTURE.md section 4, MoE skew). Then the most loaded GPU keeps
        its limit and every other controlled GPU gets the lowest limit at which its predicted step time does
        not exceed the straggler's. Modelled: the profile gives throughput vs cap under uniform routing; a GPU
        with share s at cap c takes (1 - phi + phi x s x N) x the uniform step time at c (N GPUs, phi =
        ``_ROUTING_EXPERT_TIME_FRACTION``), with a safety margin. Limits are only ever lowered, never below a
        GPU's minimum, so the budget split (made on the uniform limits) stays valid.
        """
        base = p.limits_w[row]
        share_of = self._skew_shares(p)
        if share_of is None or not self.config.routing_aware_caps:
            return base
        n = len(p.engine.gpu_indices)
        phi = _ROUTING_EXPERT_TIME_FRACTION
        s_max = max(share_of.values())
        rel_max = 1.0 - phi + phi * n * s_max
        hot = [k for k, g in enumerate(p.ctrl) if share_of[g.index] >= s_max * (1 - 1e-9)]
        # The straggler's cap: the hottest controlled GPU's limit (or the plan's pace if none is controlled).
        c_hot = float(base[hot[0]]) if hot else float(base.min())
        j = int(np.argmax(p.batches)) if col is None else col
        batch = p.batches[j : j + 1]
        t_hot = float(p.model.predict(np.array([[c_hot]]), batch[None, :])[0][0, 0])
        if not t_hot > 0:
            return base
        out = base.copy()
        for k, g in enumerate(p.ctrl):
            if k in hot:
                continue
            rel = 1.0 - phi + phi * n * share_of[g.index]
            # Needed uniform throughput at the GPU's cap so that rel x step(c) <= rel_max x step(c_hot).
            need = t_hot * rel / rel_max * (1 + _ROUTING_TIME_MARGIN)
            lo, hi = float(g.min_limit_w), float(base[k])
            if hi <= lo:
                continue
            cand = np.unique(np.append(np.arange(math.ceil(lo), hi, _ROUTING_CAP_STEP_W), hi))
            tput = np.asarray(p.model.predict(cand[:, None], batch[None, :])[0])[:, 0]
            ok = np.flatnonzero(tput >= need)
            if ok.size:
                out[k] = min(hi, max(lo, float(np.floor(cand[ok[0]]))))
        return out

    @staticmethod
    def _skew_shares(p: _Plan) -> dict[int, float] | None:
        """The engine's expert load share per GPU (normalised) when known for all its GPUs and skewed."""
        raw = p.engine.expert_load_share
        idx = p.engine.gpu_indices
        if not raw or len(idx) < 2 or not p.ctrl:
            return None
        vals = [raw.get(i) for i in idx]
        if any(v is None or not math.isfinite(v) or v < 0 for v in vals):
            return None
        total = float(sum(v for v in vals if v is not None))
        if total <= 0:
            return None
        shares = {i: float(v) / total for i, v in zip(idx, vals, strict=True) if v is not None}
        hi, lo = max(shares.values()), min(shares.values())
        if hi <= lo * (1 + _ROUTING_MIN_SKEW):
            return None
        return shares

    # ----------------------------------------------------------------------------------------------
    # safety and bookkeeping
    @staticmethod
    def _enforce_budget(
        limits: dict[int, float], gpus: Mapping[int, GpuObservation], avail_w: float, notes: list[str]
    ) -> None:
        """Last line of defence: lower the highest limits until the sum fits (a bug elsewhere, not a plan)."""
        excess = sum(limits.values()) - avail_w
        if excess <= _EPS_W:
            return
        for idx in sorted(limits, key=lambda k: limits[k] - gpus[k].min_limit_w, reverse=True):
            if excess <= _EPS_W:
                break
            lo = gpus[idx].min_limit_w
            new = max(lo, math.floor(limits[idx] - excess))
            excess -= limits[idx] - new
            limits[idx] = float(new)
        notes.append("budget repair")

    def _changed(
        self, limits: Mapping[int, float], engines: Mapping[str, EngineDecision], inp: ControllerInput
    ) -> bool:
        if self._prev_limits is None:
            before = {g.index: g.requested_limit_w for g in inp.gpus if g.controlled}
            batches = {e.engine_id: e.current_max_num_seqs for e in inp.engines}
            if any(abs(before.get(k, -1.0) - v) > 0.5 for k, v in limits.items()):
                return True
            return any(batches.get(eid) != d.max_num_seqs for eid, d in engines.items())
        if set(limits) != set(self._prev_limits) or set(engines) != set(self._prev_batches):
            return True
        if any(abs(self._prev_limits[k] - v) > 1e-6 for k, v in limits.items()):
            return True
        return any(self._prev_batches[eid] != (d.max_num_seqs, d.max_num_batched_tokens) for eid, d in engines.items())

    @staticmethod
    def _reason(
        changed: bool, causes: Mapping[str, str], notes: list[str], plans: list[_Plan], prof_ids: set[str]
    ) -> str:
        words = {"first": "first choice", "missed": "requirement missed", "efficiency": "better tokens/J"}
        moved = [f"{eid}: {words.get(c, c)}" for eid, c in causes.items() if c != "hold" and eid in prof_ids]
        parts = list(notes)
        if moved and changed:
            more = len(moved) - _MAX_REASON_ENGINES
            parts.append("; ".join(moved[:_MAX_REASON_ENGINES]) + (f"; +{more} more" if more > 0 else ""))
        if not changed:
            parts.append("hold")
        elif not moved and not notes:
            parts.append("limits updated")
        return "; ".join(parts)
