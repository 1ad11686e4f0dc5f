"""Replay a scenario in simulated time: the daemon's tick (observe, decide, apply) without sockets or sleeps.

Per control period the clock (a float) moves to the tick time and the simulated node (``replay/node.py``)
runs the daemon's own tick pipeline (``pals_daemon/tick.py``): its engines advance and report their windows
into engine sessions, the GPUs are read, the policy decides, the limits are written in the pipeline's order
and the batch limits reach the engines as directives. This module keeps the figures: energy, tokens, QoS
windows (the daemon's own ``control.qos.QosWindows``), SLOs, time over budget and the timeline.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.qos import QosWindows
from pals_daemon.control.types import ControllerInput, Decision, EngineTargets
from pals_daemon.model.profile import ProfileRegistry
from pals_daemon.replay.node import ReplayNode
from pals_daemon.replay.policies import POLICIES, Policy, make_policy
from pals_daemon.replay.scenario import (
    GPUS_PER_SERVER,
    SERVER_BASE_W_PER_SERVER,
    SERVER_POWER_SLOPE,
    EngineSpec,
    Scenario,
)
from pals_daemon.sim.engine import FinishedRequest, Request
from pals_daemon.sim.h100 import load_h100_truth
from pals_daemon.sim.h200 import load_h200_truth
from pals_daemon.sim.hardware import hardware_profile
from pals_daemon.sim.truth import ModelTruth, load_a100_truth
from pals_daemon.units import mw_to_w

# Plots need no more points than this; it bounds memory on week-long replays (modelled choice).
MAX_TIMELINE_SAMPLES = 20_000


@dataclass
class EngineResult:
    """One engine's figures over a run."""

    engine_id: str
    model: str
    gpu_indices: tuple[int, ...]
    output_tokens: int
    prompt_tokens: int
    gpu_energy_j: float
    server_energy_j: float
    requests_arrived: int
    requests_finished: int
    qos_windows: int
    qos_violations: int
    slo_attainment: float | None
    ttft_p90_ms: float | None
    tpot_p90_ms: float | None
    target_tokens_per_s: float | None
    # Latency percentiles over the finished requests (TPOT over those with more than one output token).
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    tpot_p50_ms: float | None = None
    tpot_p99_ms: float | None = None
    # Finished requests after the warm-up, one row each: (finish s, arrival s, TTFT ms, TPOT ms, output
    # tokens), float64; for latency-over-time plots and per-window error figures.
    finished: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))

    @property
    def tokens_per_j(self) -> float:
        """Output tokens per joule of the engine's GPU energy."""
        return self.output_tokens / self.gpu_energy_j if self.gpu_energy_j > 0 else 0.0

    @property
    def qos_violation_fraction(self) -> float:
        """Fraction of QoS windows below the throughput target (0 without one)."""
        return self.qos_violations / self.qos_windows if self.qos_windows else 0.0


@dataclass
class Timeline:
    """Per-tick samples for the plots."""

    t_s: list[float] = field(default_factory=list)
    gpu_power_w: list[float] = field(default_factory=list)
    budget_w: list[float] = field(default_factory=list)
    # Per engine: enforced limit of its first GPU, batch limit in force, throughput of the last window.
    cap_w: dict[str, list[float]] = field(default_factory=dict)
    batch: dict[str, list[int]] = field(default_factory=dict)
    tokens_per_s: dict[str, list[float]] = field(default_factory=dict)
    # Requested limit of every GPU by index (per-GPU caps differ under routing-aware control).
    gpu_cap_w: dict[int, list[float]] = field(default_factory=dict)
    # Per engine: the decision's predicted p90 TTFT / TPOT (ms) where the policy exposes one (NaN if not).
    predicted_ttft_p90_ms: dict[str, list[float]] = field(default_factory=dict)
    predicted_tpot_p90_ms: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class PolicyRun:
    """Everything one policy produced on one scenario."""

    policy: str
    scenario: str
    # Simulated seconds the figures cover (after the warm-up) and the whole run.
    duration_s: float
    run_s: float
    num_gpus: int
    engines: list[EngineResult]
    gpu_energy_j: float
    server_energy_j: float
    time_over_budget_s: float
    longest_excursion_s: float
    # Ticks where the sum of requested limits exceeded the budget, and by how much at most (W).
    limit_over_budget_ticks: int
    max_limit_excess_w: float
    wall_s: float
    timeline: Timeline

    @property
    def output_tokens(self) -> int:
        """Output tokens of every engine together."""
        return sum(e.output_tokens for e in self.engines)

    @property
    def tokens_per_j(self) -> float:
        """Node output tokens per joule of GPU energy."""
        return self.output_tokens / self.gpu_energy_j if self.gpu_energy_j > 0 else 0.0

    @property
    def speed_x(self) -> float:
        """Simulated seconds per wall-clock second."""
        return self.run_s / self.wall_s if self.wall_s > 0 else math.inf


def _slo(finished: Sequence[FinishedRequest], tg: EngineTargets) -> float | None:
    """Fraction of ``finished`` meeting both SLOs (TPOT judged only with more than one output token)."""
    if not finished:
        return None
    ok = sum(
        1
        for f in finished
        if (tg.ttft_ms is None or f.ttft_ms <= tg.ttft_ms)
        and (tg.tpot_ms is None or f.output_tokens <= 1 or f.tpot_ms <= tg.tpot_ms)
    )
    return ok / len(finished)


def _p90(values: Sequence[float]) -> float | None:
    return _pct(values, 90)


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _finished_array(finished: Sequence[FinishedRequest]) -> np.ndarray:
    """(finish s, arrival s, TTFT ms, TPOT ms, output tokens) per finished request."""
    rows = [(f.finish_s, f.arrival_s, f.ttft_ms, f.tpot_ms, f.output_tokens) for f in finished]
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def _predicted(decision: object, field_name: str) -> float:
    """A decision's optional latency prediction (ms), NaN where the policy does not expose it."""
    v = getattr(decision, field_name, None)
    return float(v) if v is not None else math.nan


@dataclass
class Prepared:
    """Per-scenario inputs shared by every policy: truths and request lists (built once)."""

    truths: dict[str, ModelTruth]
    requests: dict[str, list[Request]]


def _truth(e: EngineSpec) -> ModelTruth:
    """The engine's truth by GPU kind: ML.ENERGY (H100), modelled from it (H200, sim/h200.py), else the A100's."""
    kind = hardware_profile(e.gpu_kind).name
    if kind == "H100-SXM5":
        return load_h100_truth(e.model, e.num_gpus, perturbation=e.perturbation)
    if kind == "H200-SXM":
        return load_h200_truth(e.model, e.num_gpus, perturbation=e.perturbation)
    return load_a100_truth(e.model, perturbation=e.perturbation)


def prepare(scenario: Scenario) -> Prepared:
    """Load each engine's truth (with its perturbation) and its requests (H100 engines: the ML.ENERGY truth)."""
    truths = {e.engine_id: _truth(e) for e in scenario.engines}
    requests = {e.engine_id: e.requests(scenario.duration_s) for e in scenario.engines}
    return Prepared(truths, requests)


def progress_bar(label: str) -> Callable[[float], None]:
    """A ``\\r`` progress line on stderr (no dependency); call with the done fraction in [0, 1]."""
    state = {"last": -1}

    def update(done: float) -> None:
        pct = int(done * 100)
        if pct == state["last"]:
            return
        state["last"] = pct
        bar = "#" * (pct // 4) + "." * (25 - pct // 4)
        sys.stderr.write(f"\r{label} [{bar}] {pct:3d}%")
        if pct >= 100:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return update


def run_policy(
    scenario: Scenario,
    policy_name: str | Policy,
    registry: ProfileRegistry,
    prepared: Prepared | None = None,
    progress: Callable[[float], None] | None = None,
    config: ControllerConfig | None = None,
    # Called with every tick's input and decision (the parity test; per-tick analyses).
    on_tick: Callable[[ControllerInput, Decision], None] | None = None,
    policy: Policy | None = None,
) -> PolicyRun:
    """Replay ``scenario`` under one policy (a name, a ``static:CAP[:BATCH]`` spec, or a Policy object) and
    return its figures; ``policy``: a ready one (e.g. the cluster replay's) named ``policy_name`` in the figures."""
    started = time.perf_counter()
    prep = prepared if prepared is not None else prepare(scenario)
    now = [0.0]

    def clock() -> float:
        return now[0]

    policy = (
        policy
        if policy is not None
        else policy_name
        if not isinstance(policy_name, str)
        else make_policy(
            policy_name,
            registry,
            truths=prep.truths,
            requests=prep.requests,
            configured_max_num_seqs=max(s.max_num_seqs for s in scenario.engines),
            qos_window_s=scenario.qos_window_s,
            config=config,
        )
    )
    # A policy that sets clocks (``clocks``) gets the locked-clock knob on every GPU, as ``[clocks] enabled``.
    node = ReplayNode(scenario, prep.truths, prep.requests, clock, clocks=bool(getattr(policy, "clocks", False)))
    engines, engine_gpus, sessions = node.engines, node.engine_gpus, node.sessions
    targets: dict[str, EngineTargets] = {s.engine_id: s.targets for s in scenario.engines}
    gpu_idx = {e.engine_id: tuple(g.identity.index for g in gs) for e, gs in zip(engines, engine_gpus, strict=True)}
    qos = {e.engine_id: QosWindows() for e in engines}
    tl = Timeline()
    for e in engines:
        tl.cap_w[e.engine_id] = []
        tl.batch[e.engine_id] = []
        tl.tokens_per_s[e.engine_id] = []
        tl.predicted_ttft_p90_ms[e.engine_id] = []
        tl.predicted_tpot_p90_ms[e.engine_id] = []
    period = scenario.period_s
    n_ticks = int(math.ceil(scenario.duration_s / period - 1e-9))
    n_gpus = len(node.gpus)
    # Timeline samples kept: every tick up to MAX_TIMELINE_SAMPLES, decimated beyond (week-long traces).
    stride = max(1, n_ticks // MAX_TIMELINE_SAMPLES)
    over_s = longest_s = run_s = 0.0
    limit_over_ticks = 0
    max_excess = 0.0
    last_t = 0.0
    base: list[tuple[int, int, float, int]] | None = None
    t_base = 0.0
    for k in range(n_ticks):
        t = k * period
        now[0] = t
        elapsed = max(t - last_t, 1e-6)
        last_t = t
        budget_w = scenario.budget.gpu_w(t, n_gpus)
        inp = node.observe(t, elapsed, budget_w, targets)
        decision = policy.decide(inp)
        if on_tick is not None:
            on_tick(inp, decision)
        if progress is not None and (k % 200 == 0 or k == n_ticks - 1):
            progress((k + 1) / n_ticks)
        node.actuate(decision, t)
        requested_mw = node.requested_mw()
        if base is None and t >= scenario.warmup_s:
            base = [
                (
                    e.totals.output_tokens,
                    e.totals.prefill_tokens,
                    sum(g.energy_j(t) for g in gs),
                    len(e.totals.finished),
                )
                for e, gs in zip(engines, engine_gpus, strict=True)
            ]
            t_base = t
        # Accounting (Daemon._account; after the warm-up) and the budget checks (always).
        if base is not None and t > t_base:
            for o in inp.engines:
                tgt = targets.get(o.engine_id, EngineTargets()).tokens_per_s
                qos[o.engine_id].add(o.decode_tokens, o.window_s, scenario.qos_window_s, tgt)
        power_w = sum(g.power_avg_w for g in inp.gpus)
        if budget_w is not None:
            excess = sum(mw_to_w(v) for v in requested_mw.values()) - budget_w
            if excess > 1e-6:
                limit_over_ticks += 1
                max_excess = max(max_excess, excess)
            if k > 0 and power_w > budget_w + 1e-6:
                over_s += period
                run_s += period
                longest_s = max(longest_s, run_s)
            else:
                run_s = 0.0
        if k % stride:
            continue
        tl.t_s.append(t)
        tl.gpu_power_w.append(power_w)
        tl.budget_w.append(math.nan if budget_w is None else budget_w)
        for idx, mw in requested_mw.items():
            tl.gpu_cap_w.setdefault(idx, []).append(mw_to_w(mw))
        for e, session, o in zip(engines, sessions, inp.engines, strict=True):
            tl.cap_w[e.engine_id].append(mw_to_w(requested_mw[gpu_idx[e.engine_id][0]]))
            tl.batch[e.engine_id].append(session.current_max_num_seqs)
            tl.tokens_per_s[e.engine_id].append(o.throughput_tokens_per_s)
            d = decision.engines.get(e.engine_id)
            tl.predicted_ttft_p90_ms[e.engine_id].append(_predicted(d, "predicted_ttft_p90_ms"))
            tl.predicted_tpot_p90_ms[e.engine_id].append(_predicted(d, "predicted_tpot_p90_ms"))

    t_end = scenario.duration_s
    now[0] = t_end
    for e in engines:
        e.advance(t_end)
    results = []
    total_gpu_j = 0.0
    span_s = t_end - t_base
    for (tok0, pre0, j0, fin0), e, spec, gpus in zip(base or [], engines, scenario.engines, engine_gpus, strict=True):
        gpu_j = sum(g.energy_j(t_end) for g in gpus) - j0
        total_gpu_j += gpu_j
        tot = e.totals
        tg = spec.targets
        finished = tot.finished[fin0:]
        results.append(
            EngineResult(
                engine_id=e.engine_id,
                model=spec.model,
                gpu_indices=gpu_idx[e.engine_id],
                output_tokens=tot.output_tokens - tok0,
                prompt_tokens=tot.prefill_tokens - pre0,
                gpu_energy_j=gpu_j,
                server_energy_j=server_energy_j(gpu_j, spec.num_gpus, span_s),
                requests_arrived=tot.requests_arrived,
                requests_finished=len(finished),
                qos_windows=qos[e.engine_id].windows,
                qos_violations=qos[e.engine_id].violations,
                slo_attainment=_slo(finished, tg) if (tg.ttft_ms or tg.tpot_ms) else None,
                ttft_p90_ms=_p90([f.ttft_ms for f in finished]),
                tpot_p90_ms=_p90([f.tpot_ms for f in finished if f.output_tokens > 1]),
                target_tokens_per_s=tg.tokens_per_s,
                ttft_p50_ms=_pct([f.ttft_ms for f in finished], 50),
                ttft_p99_ms=_pct([f.ttft_ms for f in finished], 99),
                tpot_p50_ms=_pct([f.tpot_ms for f in finished if f.output_tokens > 1], 50),
                tpot_p99_ms=_pct([f.tpot_ms for f in finished if f.output_tokens > 1], 99),
                finished=_finished_array(finished),
            )
        )
    return PolicyRun(
        policy=policy_name if isinstance(policy_name, str) else policy.name,
        scenario=scenario.name,
        duration_s=span_s,
        run_s=t_end,
        num_gpus=n_gpus,
        engines=results,
        gpu_energy_j=total_gpu_j,
        server_energy_j=server_energy_j(total_gpu_j, n_gpus, span_s),
        time_over_budget_s=over_s,
        longest_excursion_s=longest_s,
        limit_over_budget_ticks=limit_over_ticks,
        max_limit_excess_w=max_excess,
        wall_s=time.perf_counter() - started,
        timeline=tl,
    )


def server_energy_j(gpu_energy_j: float, num_gpus: int, duration_s: float) -> float:
    """Server energy with the paper's fit: 1.05 x GPU energy + 345 W per 4-GPU server (pro rata)."""
    return SERVER_POWER_SLOPE * gpu_energy_j + SERVER_BASE_W_PER_SERVER * (num_gpus / GPUS_PER_SERVER) * duration_s


def run_scenario(
    scenario: Scenario,
    registry: ProfileRegistry,
    policies: Sequence[str] = POLICIES,
    show_progress: bool = False,
    config: ControllerConfig | None = None,
) -> Mapping[str, PolicyRun]:
    """Every policy on the same scenario (same truths, same requests), in order."""
    prep = prepare(scenario)
    out: dict[str, PolicyRun] = {}
    for name in policies:
        bar = progress_bar(f"{scenario.name}: {name:<10}") if show_progress else None
        out[name] = run_policy(scenario, name, registry, prep, bar, config)
    return out
