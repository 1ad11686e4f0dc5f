"""The policies a replay compares, all behind one interface: ``decide(ControllerInput) -> Decision``."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from pals_daemon.control.config import DEFAULT_CANDIDATE_BATCHES, ControllerConfig
from pals_daemon.control.core import Controller
from pals_daemon.control.types import ControllerInput, Decision, EngineDecision, EngineObservation, GpuObservation
from pals_daemon.model.profile import ProfileRegistry
from pals_daemon.sim.engine import Request
from pals_daemon.sim.truth import ModelTruth

POLICIES: tuple[str, ...] = ("default", "static-cap", "cap-only", "batch-only", "pals", "tput-oracle")
# Policies judged in SLO tables: the throughput oracle is SLO-blind on TTFT, so it is kept out of them (its
# "saving" there comes from missed TTFTs); the SLO-aware references are ``best-static`` (references.py) and
# ``slo-oracle`` (slo_oracle.py).
SLO_BLIND_POLICIES: frozenset[str] = frozenset({"tput-oracle"})
# Renamed policies: the old name is refused with a pointer to the new one (no silent alias).
RENAMED_POLICIES: Mapping[str, str] = {"oracle": "tput-oracle"}
STATIC_PREFIX = "static:"
# Accepted by make_policy beside POLICIES, not run by default (slower: see slo_oracle.py).
# The clock knob's policies (issue 11): "pals-clock" is pals with the replay offering the locked-clock knob (clock,
# cap and batch), "clock-only" the same with the cap pinned at the top; a static spec may add a CLOCK.
EXTRA_POLICIES: tuple[str, ...] = ("slo-oracle", "slo-oracle-quick", "pals-clock", "clock-only")
# The oracle's cap grid step (W): the controller's own grid (ControllerConfig.cap_step_w), so that the
# oracle is not handicapped by a coarser choice.
ORACLE_CAP_STEP_W = ControllerConfig().cap_step_w
# Modelled: the oracle asks 2% above a throughput target, for what its steady-state approximation misses
# (queueing, step quantisation), so that it meets the target in practice, not only on paper.
ORACLE_TARGET_MARGIN = 0.02


class Policy(Protocol):
    """Anything that turns one tick's observations into limits."""

    name: str

    def decide(self, inp: ControllerInput) -> Decision:
        """This tick's GPU limits and batch limits."""
        ...


def scaled_batched_tokens(engine: EngineObservation, max_num_seqs: int) -> int:
    """Step token budget scaled with the batch limit (the controller core's rule, for the baselines)."""
    configured = engine.configured_max_num_batched_tokens
    seqs = max(1, engine.configured_max_num_seqs)
    return int(min(max(configured * max_num_seqs // seqs, max_num_seqs), configured))


def _engine_decision(eng: EngineObservation, batch: int, tput: float = 0.0, power: float = 0.0) -> EngineDecision:
    return EngineDecision(
        engine_id=eng.engine_id,
        max_num_seqs=batch,
        max_num_batched_tokens=scaled_batched_tokens(eng, batch),
        predicted_tokens_per_s=tput,
        predicted_power_w=power,
        has_profile=False,
    )


def uniform_share_w(gpus: Sequence[GpuObservation], budget_w: float | None) -> dict[int, float]:
    """Every GPU at budget / GPUs (whole watts), clamped to its range; at its maximum without a budget."""
    share = math.inf if budget_w is None else math.floor(budget_w / max(1, len(gpus)))
    return {g.index: float(min(max(share, g.min_limit_w), g.max_limit_w)) for g in gpus}


class DefaultPolicy:
    """Every GPU at its maximum limit, every engine at its configured batch (what an unmanaged node does)."""

    name = "default"

    def decide(self, inp: ControllerInput) -> Decision:
        """Max caps, configured batches; ignores the budget."""
        limits = {g.index: g.max_limit_w for g in inp.gpus}
        engines = {e.engine_id: _engine_decision(e, e.configured_max_num_seqs) for e in inp.engines}
        return Decision(limits, engines, changed=False, reason="default")


class StaticCapPolicy:
    """A uniform cap of budget / GPUs (clamped to each GPU's range), configured batches."""

    name = "static-cap"

    def decide(self, inp: ControllerInput) -> Decision:
        """Uniform share of the budget in force."""
        engines = {e.engine_id: _engine_decision(e, e.configured_max_num_seqs) for e in inp.engines}
        return Decision(uniform_share_w(inp.gpus, inp.budget_w), engines, changed=False, reason="static")


@dataclass(frozen=True)
class StaticSpec:
    """A parsed ``static:CAP[:BATCH[:CLOCK]]`` policy spec: a per-GPU cap in W, an optional batch limit and an
    optional locked SM clock ceiling in MHz (the replay then offers the clock knob)."""

    cap_w: float
    batch: int | None = None
    clock_mhz: int | None = None

    @property
    def name(self) -> str:
        """The canonical spec string (``static:225``, ``static:225:16`` or ``static:225:16:1230``)."""
        cap = f"{self.cap_w:g}"
        if self.batch is None:
            return f"{STATIC_PREFIX}{cap}"
        tail = "" if self.clock_mhz is None else f":{self.clock_mhz}"
        return f"{STATIC_PREFIX}{cap}:{self.batch}{tail}"


def parse_static_spec(spec: str) -> StaticSpec:
    """Parse ``static:CAP[:BATCH[:CLOCK]]`` (CAP in W > 0, BATCH an integer >= 1, CLOCK in MHz); ValueError says
    what is wrong."""
    if not spec.startswith(STATIC_PREFIX):
        raise ValueError(f"not a static policy spec: {spec!r} (expected static:CAP[:BATCH])")
    parts = spec[len(STATIC_PREFIX) :].split(":")
    if len(parts) not in (1, 2, 3) or not parts[0]:
        raise ValueError(
            f"bad static policy spec {spec!r}: expected static:CAP[:BATCH[:CLOCK]], e.g. static:225:32 or "
            "static:700:32:1230"
        )
    try:
        cap = float(parts[0])
    except ValueError:
        raise ValueError(f"bad static policy spec {spec!r}: CAP {parts[0]!r} is not a number of watts") from None
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"bad static policy spec {spec!r}: CAP must be a finite number of watts > 0")
    batch = None
    if len(parts) >= 2:
        try:
            batch = int(parts[1])
        except ValueError:
            raise ValueError(f"bad static policy spec {spec!r}: BATCH {parts[1]!r} is not an integer") from None
        if batch < 1:
            raise ValueError(f"bad static policy spec {spec!r}: BATCH must be >= 1")
    clock = None
    if len(parts) == 3:
        try:
            clock = int(parts[2])
        except ValueError:
            raise ValueError(f"bad static policy spec {spec!r}: CLOCK {parts[2]!r} is not an integer of MHz") from None
        if not 100 <= clock <= 10_000:
            raise ValueError(f"bad static policy spec {spec!r}: CLOCK must be in [100, 10000] MHz")
    return StaticSpec(cap, batch, clock)


def validate_policy_spec(spec: str) -> str:
    """``spec`` if it names a known policy or a valid static spec; ValueError with the known names if not."""
    if spec.startswith(STATIC_PREFIX):
        parse_static_spec(spec)
        return spec
    if spec in POLICIES or spec in EXTRA_POLICIES:
        return spec
    if spec in RENAMED_POLICIES:
        raise ValueError(f"policy {spec!r} was renamed {RENAMED_POLICIES[spec]!r} (a throughput oracle, SLO-blind)")
    known = ", ".join((*POLICIES, *EXTRA_POLICIES, "static:CAP[:BATCH[:CLOCK]]"))
    raise ValueError(f"unknown policy {spec!r}; known: {known}")


class StaticPolicy:
    """A fixed per-GPU cap and batch limit (``static:CAP[:BATCH]``): a static setting to compare against.

    The cap is clamped to each GPU's range and, when a budget binds, to the budget's uniform share (so it
    never breaks the budget); the batch limit (configured when unset) is clamped to [1, configured].
    """

    def __init__(self, spec: StaticSpec) -> None:
        self.spec = spec
        self.name = spec.name
        # With a clock the replay offers the clock knob and this policy locks every GPU that has it.
        self.clocks = spec.clock_mhz is not None

    def decide(self, inp: ControllerInput) -> Decision:
        """The fixed setting, within the GPUs' ranges and the budget share."""
        shares = uniform_share_w(inp.gpus, inp.budget_w)
        limits = {g.index: float(min(max(self.spec.cap_w, g.min_limit_w), shares[g.index])) for g in inp.gpus}
        engines = {}
        for e in inp.engines:
            batch = e.configured_max_num_seqs if self.spec.batch is None else self.spec.batch
            engines[e.engine_id] = _engine_decision(e, min(max(1, batch), max(1, e.configured_max_num_seqs)))
        clock = self.spec.clock_mhz
        locks = {g.index: clock for g in inp.gpus if g.clock_control} if clock is not None else {}
        return Decision(limits, engines, changed=False, reason="static", gpu_locked_clocks_mhz=locks)


class ControllerPolicy:
    """The controller core (the daemon's own), optionally restricted to one knob."""

    def __init__(
        self,
        name: str,
        registry: ProfileRegistry,
        config: ControllerConfig,
        batch_only: bool = False,
        clocks: bool = False,
        clock_only: bool = False,
    ):
        self.name = name
        self.controller = Controller(registry, config)
        self._base = config
        self._batch_only = batch_only
        # ``clocks``: the replay offers the clock knob (as ``[clocks] enabled``); ``clock_only``: and the cap range
        # is collapsed to each GPU's top limit (or the budget's uniform share), so only the clock can save.
        self.clocks = clocks or clock_only
        self._clock_only = clock_only

    def decide(self, inp: ControllerInput) -> Decision:
        """The controller's decision; batch-only pins the cap at max, or at the uniform share when it binds."""
        if self._clock_only:
            shares = uniform_share_w(inp.gpus, inp.budget_w)
            inp = replace(
                inp, gpus=tuple(replace(g, min_limit_w=min(g.max_limit_w, shares[g.index])) for g in inp.gpus)
            )
        if self._batch_only:
            shares = uniform_share_w(inp.gpus, inp.budget_w)
            cap = min(shares.values()) if shares else None
            if cap is not None and cap != self.controller.config.fixed_cap_w:
                self.controller.config = replace(self._base, fixed_cap_w=cap)
        return self.controller.step(inp)


@dataclass(frozen=True)
class _Table:
    """One engine's truth over the oracle grid: rows caps, columns batches."""

    caps_w: np.ndarray
    batches: np.ndarray
    tput: np.ndarray  # output tokens/s with the prompt mix's prefill folded in
    power_w: np.ndarray  # engine power (all its GPUs) while busy
    tpot_ms: np.ndarray
    idle_w: float


class ThroughputOraclePolicy:
    """A THROUGHPUT oracle (``tput-oracle``): best (cap per engine, batch) per control window in hindsight.

    SLO-blind on TTFT: it sizes capacity to the throughput requirement of a steady state and never looks at
    queueing delay, so on latency-SLO traffic its "saving" comes partly from missed TTFTs; keep it out of SLO
    tables (``SLO_BLIND_POLICIES``) and compare with ``best-static`` and ``slo-oracle`` there instead.
    An upper-bound *estimate* of tokens/J at a throughput requirement, not a proof: for each tick it
    evaluates every (cap, batch) on a 25 W x candidate-batch grid with the engine's own ``ModelTruth``
    (perturbation included: what the controller cannot see) and picks, per engine, the configuration of
    best truth tokens/J that meets the engine's throughput target (or, without one, the demand that arrives
    over the next QoS window plus the queue,
    known in hindsight from the request list) and its TPOT SLO, with the node's limits within the budget.
    Approximations: a saturated steady state (a batch of ``b`` always running); prefill folded in at the
    request mix's prompt/output token ratio (each step prefills ``b x ratio`` prompt tokens at the truth's
    prefill cost); TPOT taken as the mean step time; idle GPU power for the unused share of a window when
    demand is below capacity; cap settling delays and queueing transients ignored. Across engines the
    choice maximises first the number of engines meeting their requirement, then node tokens/J.
    A throughput target is asked with a 2% margin (``ORACLE_TARGET_MARGIN``). In practice the estimate is
    slightly conservative (the prefill fold-in over-counts prefill cost on the physics truth), so at a
    binding target the oracle may pick one 25 W step more than needed; a policy that runs *below* its
    target can then show more than 100% of the oracle's tokens/J: read % of oracle beside QoS violations.
    """

    name = "tput-oracle"

    def __init__(
        self,
        truths: Mapping[str, ModelTruth],
        requests: Mapping[str, Sequence[Request]],
        targets_window_s: float = 5.0,
        candidate_batches: Sequence[int] = DEFAULT_CANDIDATE_BATCHES,
    ) -> None:
        self._truths = dict(truths)
        self._window_s = targets_window_s
        self._candidates = tuple(candidate_batches)
        self._tables: dict[str, _Table] = {}
        self._arrivals: dict[str, list[float]] = {}
        self._cum_out: dict[str, list[int]] = {}
        self._ratio: dict[str, float] = {}
        self._mean_out: dict[str, float] = {}
        for eid, reqs in requests.items():
            self._arrivals[eid] = [r.arrival_s for r in reqs]
            self._cum_out[eid] = list(itertools.accumulate((max(1, r.output_tokens) for r in reqs), initial=0))
            prompt = sum(max(1, r.prompt_tokens) for r in reqs)
            out = sum(max(1, r.output_tokens) for r in reqs)
            self._ratio[eid] = prompt / out if out else 0.0
            self._mean_out[eid] = out / len(reqs) if reqs else 1.0
        self._cache: dict[tuple, dict[str, tuple[int, int]]] = {}

    def _table(self, eng: EngineObservation, gpus: Sequence[GpuObservation]) -> _Table:
        hit = self._tables.get(eng.engine_id)
        if hit is not None:
            return hit
        truth = self._truths[eng.engine_id]
        lo = max(g.min_limit_w for g in gpus)
        hi = min(g.max_limit_w for g in gpus)
        caps = np.unique(np.append(np.arange(lo, hi, ORACLE_CAP_STEP_W), hi))
        top = max(1, eng.configured_max_num_seqs)
        batches = np.array(sorted({b for b in self._candidates if b <= top} | {top}), dtype=np.int64)
        ratio = self._ratio.get(eng.engine_id, 0.0)
        n = len(gpus)
        tput = np.zeros((caps.size, batches.size))
        power = np.zeros_like(tput)
        tpot = np.zeros_like(tput)
        for i, c in enumerate(caps):
            for j, b in enumerate(batches):
                dec = truth.decode_step(float(c), int(b))
                p_dec = min(dec.power_w_per_gpu, float(c))
                pre_tokens = int(round(b * ratio))
                t_pre, p_pre = 0.0, 0.0
                if pre_tokens:
                    pre = truth.prefill_step(float(c), pre_tokens)
                    t_pre, p_pre = pre.time_s, min(pre.power_w_per_gpu, float(c))
                step = dec.step_time_s + t_pre
                tput[i, j] = b / step
                power[i, j] = n * (p_dec * dec.step_time_s + p_pre * t_pre) / step
                tpot[i, j] = 1000.0 * step
        table = _Table(caps, batches, tput, power, tpot, n * truth.hardware.idle_power_w)
        self._tables[eng.engine_id] = table
        return table

    def _demand(self, eid: str, now_s: float, waiting: int) -> float:
        """Output tokens/s arriving over the next QoS window plus the queue drained over it (hindsight)."""
        arr = self._arrivals.get(eid)
        if not arr:
            return 0.0
        cum = self._cum_out[eid]
        i0 = bisect.bisect_right(arr, now_s)
        i1 = bisect.bisect_right(arr, now_s + self._window_s)
        return (cum[i1] - cum[i0] + waiting * self._mean_out[eid]) / self._window_s

    def decide(self, inp: ControllerInput) -> Decision:
        """The hindsight-best configuration for this window."""
        gpus = {g.index: g for g in inp.gpus}
        rows: list[tuple[EngineObservation, list[GpuObservation], _Table, np.ndarray, np.ndarray, np.ndarray]] = []
        key: list[object] = [None if inp.budget_w is None else round(inp.budget_w, 1)]
        for eng in inp.engines:
            own = [gpus[i] for i in eng.gpu_indices if i in gpus]
            table = self._table(eng, own)
            target = inp.targets.get(eng.engine_id)
            tps = target.tokens_per_s if target is not None else None
            tpot_slo = target.tpot_ms if target is not None else None
            saturated = eng.num_waiting > 0
            demand = self._demand(eng.engine_id, inp.now_s, eng.num_waiting)
            # With a throughput target the requirement is the target; a queued engine then serves at full
            # speed. Without one, the requirement is the demand (hindsight), which is also what is served.
            required = float(tps) * (1 + ORACLE_TARGET_MARGIN) if tps else demand
            if tps and saturated:
                demand = math.inf
            key.append((eng.engine_id, round(required, 0), round(demand, 0) if math.isfinite(demand) else -1))
            served = np.minimum(table.tput, demand)
            util = served / table.tput
            power = util * table.power_w + (1 - util) * table.idle_w
            eff = served / power
            ok_tpot = table.tpot_ms <= tpot_slo if tpot_slo else np.ones_like(eff, dtype=bool)
            meets = (table.tput >= required * (1 - 1e-9)) & ok_tpot
            # Per cap row: best tokens/J meeting, else most throughput within TPOT, else least TPOT.
            j_meet = np.argmax(np.where(meets, eff, -np.inf), axis=1)
            j_tpot = np.argmax(np.where(ok_tpot, table.tput, -np.inf), axis=1)
            j_min = np.argmin(table.tpot_ms, axis=1)
            js = np.where(meets.any(axis=1), j_meet, np.where(ok_tpot.any(axis=1), j_tpot, j_min))
            r = np.arange(table.caps_w.size)
            rows.append((eng, own, table, js, meets[r, js], np.stack([served[r, js], power[r, js]])))
        ck = tuple(key)
        choice = self._cache.get(ck)
        if choice is None:
            choice = self._choose(rows, inp.budget_w, inp.gpus, gpus)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[ck] = choice
        limits: dict[int, float] = {g.index: g.min_limit_w for g in inp.gpus}
        engines: dict[str, EngineDecision] = {}
        for eng, own, table, _, _, _ in rows:
            i, j = choice[eng.engine_id]
            for g in own:
                limits[g.index] = float(min(max(math.floor(table.caps_w[i]), g.min_limit_w), g.max_limit_w))
            engines[eng.engine_id] = _engine_decision(
                eng, int(table.batches[j]), float(table.tput[i, j]), float(table.power_w[i, j])
            )
        return Decision(limits, engines, changed=False, reason="tput-oracle")

    @staticmethod
    def _choose(
        rows: list, budget_w: float | None, all_gpus: Sequence[GpuObservation], gpus: Mapping[int, GpuObservation]
    ) -> dict[str, tuple[int, int]]:
        """Enumerate per-engine cap rows (numpy, all combinations), keep those within the budget, pick best."""
        owned = {g.index for _, own, _, _, _, _ in rows for g in own}
        fixed_w = sum(g.min_limit_w for g in all_gpus if g.index not in owned)
        grids = np.meshgrid(*[np.arange(t.caps_w.size) for _, _, t, _, _, _ in rows], indexing="ij")
        idx = [g.ravel() for g in grids]
        cost = np.full(idx[0].shape, float(fixed_w))
        n_meet = np.zeros(idx[0].shape)
        served = np.zeros(idx[0].shape)
        power = np.zeros(idx[0].shape)
        for (_, own, table, _, meets, sp), ii in zip(rows, idx, strict=True):
            cost += np.floor(table.caps_w[ii]) * len(own)
            n_meet += meets[ii]
            served += sp[0][ii]
            power += sp[1][ii]
        fits = cost <= budget_w + 1e-6 if budget_w is not None else np.ones_like(cost, dtype=bool)
        if not fits.any():
            fits = cost <= cost.min()
        score = np.where(fits, n_meet * 1e6 + served / np.maximum(power, 1e-9), -np.inf)
        k = int(np.argmax(score))
        return {
            eng.engine_id: (int(ii[k]), int(js[ii[k]])) for (eng, _, _, js, _, _), ii in zip(rows, idx, strict=True)
        }


def make_policy(
    name: str,
    registry: ProfileRegistry,
    *,
    truths: Mapping[str, ModelTruth] | None = None,
    requests: Mapping[str, Sequence[Request]] | None = None,
    config: ControllerConfig | None = None,
    configured_max_num_seqs: int = 64,
    qos_window_s: float = 5.0,
) -> Policy:
    """A fresh policy by name (see :data:`POLICIES`, :data:`EXTRA_POLICIES`) or ``static:CAP[:BATCH]`` spec."""
    validate_policy_spec(name)
    if name.startswith(STATIC_PREFIX):
        return StaticPolicy(parse_static_spec(name))
    cfg = config if config is not None else ControllerConfig(gpu_kind="A100-SXM4")
    if name == "default":
        return DefaultPolicy()
    if name == "static-cap":
        return StaticCapPolicy()
    if name == "pals":
        return ControllerPolicy("pals", registry, cfg)
    if name == "cap-only":
        return ControllerPolicy("cap-only", registry, replace(cfg, fixed_batch=configured_max_num_seqs))
    if name == "batch-only":
        return ControllerPolicy("batch-only", registry, cfg, batch_only=True)
    if name == "pals-clock":
        return ControllerPolicy("pals-clock", registry, cfg, clocks=True)
    if name == "clock-only":
        return ControllerPolicy(
            "clock-only", registry, replace(cfg, fixed_batch=configured_max_num_seqs), clock_only=True
        )
    if truths is None or requests is None:
        raise ValueError(f"the {name} policy needs the truths and the request lists")
    if name == "tput-oracle":
        return ThroughputOraclePolicy(truths, requests, qos_window_s, cfg.candidate_batches)
    from pals_daemon.replay.slo_oracle import SloOraclePolicy  # noqa: PLC0415 (slo_oracle imports this module)

    return SloOraclePolicy(truths, requests, quick=name == "slo-oracle-quick")
