"""The simulated node end to end: simulated GPUs and engines, the real daemon, real sockets, real gRPC.

The daemon runs exactly as under systemd (Runner: PowerAdmin and EngineLink on Unix sockets, metrics,
the control loop) on the simulated backend; each simulated engine is a client on the engine socket; the
budget change is a PowerAdmin call on the admin socket. Time is a ScaledClock shared by all of them.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass, field, replace

import grpc

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.clock import ScaledClock
from pals_daemon.config import DaemonConfig
from pals_daemon.control.types import EngineTargets
from pals_daemon.model.profile import load_profile_tree
from pals_daemon.server.daemon import Daemon, default_profiles_dir
from pals_daemon.server.runner import Runner
from pals_daemon.sim.a100 import load_a100_truth
from pals_daemon.sim.engine import Request, SimEngine
from pals_daemon.sim.gpu import SimBackend, make_sim_gpus
from pals_daemon.sim.link import SimEngineLink
from pals_daemon.sim.model_truth import Perturbation
from pals_daemon.sim.trace import DEFAULT_TRACE, load_trace_csv, poisson_requests

log = logging.getLogger(__name__)
ENGINE_ID = "engine0"


@dataclass(frozen=True)
class PoissonLoad:
    """Open-loop Poisson arrivals with fixed lengths (instead of a trace)."""

    rate_per_s: float
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    seed: int = 0


@dataclass(frozen=True)
class SimNodeSpec:
    """What to simulate: one engine on all GPUs of a node, a trace, a budget schedule."""

    model: str = "mixtral-8x7b-instruct"
    gpu_kind: str = "A100-SXM4"
    num_gpus: int = 4
    trace_path: str = str(DEFAULT_TRACE)
    # Columns of the trace CSV: arrival time, input (prompt) tokens, output tokens.
    trace_columns: tuple[str, str, str] = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
    # Replaces the trace when set.
    poisson: PoissonLoad | None = None
    # <1 compresses the trace (higher request rate).
    time_scale: float = 1.0
    # The trace is split round-robin over this many identical nodes; this node serves one share.
    nodes: int = 1
    # Replay only the first part of the trace (simulated seconds); None: all of it.
    duration_s: float | None = None
    speed: float = 30.0
    period_s: float = 0.5
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    initial_budget_w: float | None = None
    # The budget set over PowerAdmin at ``budget_change_at`` (fraction of the trace); None: no change.
    budget_change_w: float | None = None
    budget_change_at: float = 0.5
    mode: str = "enforce"
    targets: EngineTargets = field(default_factory=EngineTargets)
    # The simulated truth deviates from the controller's profile (model mismatch the feedback must absorb).
    truth_throughput_factor: float = 1.0
    truth_power_factor: float = 1.0


@dataclass
class Sample:
    """The node at one control tick."""

    t_s: float
    node_power_w: float
    node_power_instant_w: float
    budget_w: float | None
    enforced_limits_w: list[float]
    max_num_seqs: int
    throughput_tokens_per_s: float


@dataclass
class SimNodeResult:
    """What a run produced."""

    spec: SimNodeSpec
    samples: list[Sample]
    duration_s: float
    output_tokens: int
    prompt_tokens: int
    requests_finished: int
    requests_arrived: int
    # Energy of every GPU of the node, and of the engine's own GPUs (the same set on this one-engine node).
    gpu_energy_j: float
    engine_energy_j: float
    engine_gpus: tuple[int, ...]
    ttft_ms: list[float]
    tpot_ms: list[float]
    qos_windows: int
    qos_violations: int
    limit_calls: int

    @property
    def tokens_per_joule(self) -> float:
        """Output tokens per joule of GPU energy."""
        return self.output_tokens / self.gpu_energy_j if self.gpu_energy_j > 0 else 0.0

    def time_over_budget_s(self) -> float:
        """Seconds the node's averaged power (NVML's 1 s reading, summed) was above the budget in force."""
        over = 0.0
        for prev, cur in zip(self.samples, self.samples[1:], strict=False):
            if cur.budget_w is not None and cur.node_power_w > cur.budget_w:
                over += cur.t_s - prev.t_s
        return over


async def run_sim_node(spec: SimNodeSpec) -> SimNodeResult:
    """Run the trace to completion (or ``duration_s``) and collect the figures."""
    clock = ScaledClock(spec.speed)
    requests = load_requests(spec)
    trace_end_s = requests[-1].arrival_s
    truth = load_a100_truth(spec.model).with_perturbation(
        Perturbation(throughput_factor=spec.truth_throughput_factor, power_factor=spec.truth_power_factor)
    )
    gpus = make_sim_gpus(spec.gpu_kind, spec.num_gpus, clock.now)
    with tempfile.TemporaryDirectory(prefix="pals-simnode-") as tmp:
        config = DaemonConfig(
            backend="sim",
            mode=spec.mode,
            period_s=spec.period_s,
            runtime_dir=f"{tmp}/run",
            state_dir=f"{tmp}/state",
            engine_socket_group="",
            metrics_port=0,
            budget_w=spec.initial_budget_w,
            sim_gpu_kind=spec.gpu_kind,
            sim_gpu_count=spec.num_gpus,
            sim_speed=spec.speed,
        )
        runner = Runner(config, SimBackend(gpus), load_profile_tree(str(default_profiles_dir())), clock)
        samples: list[Sample] = []
        runner.daemon.on_tick.append(lambda d: samples.append(_sample(d)))
        await runner.start()
        if spec.targets != EngineTargets():
            runner.daemon.set_targets(ENGINE_ID, spec.targets)
        engine = SimEngine(
            ENGINE_ID, truth, gpus, requests, spec.max_num_seqs, spec.max_num_batched_tokens, start_s=clock.now()
        )
        link = SimEngineLink(
            engine,
            spec.model,
            [g.identity.uuid for g in gpus],
            str(config.engine_socket_path),
            clock,
            report_interval_s=spec.period_s / 2,
        )
        stop = asyncio.Event()
        control = asyncio.create_task(runner.run())
        tasks = [asyncio.create_task(link.run(stop))]
        if spec.budget_change_w is not None:
            at_s = clock.now() + spec.budget_change_at * trace_end_s
            tasks.append(asyncio.create_task(_change_budget(config, clock, at_s, spec.budget_change_w, stop)))
        try:
            await tasks[0]
        finally:
            stop.set()
            await asyncio.gather(*tasks[1:], return_exceptions=True)
            t_end = clock.now()
            stats = runner.daemon.engine_stats.get(ENGINE_ID)
            runner.daemon.request_stop()
            await control
        totals = engine.totals
        return SimNodeResult(
            spec=spec,
            samples=samples,
            duration_s=t_end,
            output_tokens=totals.output_tokens,
            prompt_tokens=totals.prefill_tokens,
            requests_finished=totals.requests_finished,
            requests_arrived=totals.requests_arrived,
            gpu_energy_j=sum(g.energy_j(engine.time_s) for g in gpus),
            engine_energy_j=sum(g.energy_j(engine.time_s) for g in engine.gpus),
            engine_gpus=tuple(g.identity.index for g in engine.gpus),
            ttft_ms=list(totals.ttft_ms),
            tpot_ms=list(totals.tpot_ms),
            qos_windows=stats.qos.windows if stats else 0,
            qos_violations=stats.qos.violations if stats else 0,
            limit_calls=sum(len(g.calls) for g in gpus),
        )


def load_requests(spec: SimNodeSpec) -> list[Request]:
    """The requests this node serves: its round-robin share of the trace, or the Poisson load."""
    if spec.poisson is not None:
        p = spec.poisson
        requests = poisson_requests(p.rate_per_s, p.duration_s, p.prompt_tokens, p.output_tokens, seed=p.seed)
    else:
        time_column, input_column, output_column = spec.trace_columns
        requests = load_trace_csv(
            spec.trace_path,
            time_column=time_column,
            input_column=input_column,
            output_column=output_column,
            time_scale=spec.time_scale,
            limit_s=spec.duration_s,
        )
    requests = requests[:: spec.nodes]
    if not requests:
        raise ValueError(f"no requests to serve in {spec.trace_path} within {spec.duration_s} s")
    return requests


def _sample(d: Daemon) -> Sample:
    now = d.last_tick_s
    session = d.engines.get(ENGINE_ID)
    decided = d.last_decision.engines.get(ENGINE_ID) if d.last_decision else None
    stats = d.engine_stats.get(ENGINE_ID)
    return Sample(
        t_s=now,
        node_power_w=sum(g.reading.power_avg_mw for g in d.gpus) / 1000.0,
        node_power_instant_w=sum((g.reading.power_instant_mw or 0) for g in d.gpus) / 1000.0,
        budget_w=d.budget.effective_w(now),
        enforced_limits_w=[g.reading.enforced_limit_mw / 1000.0 for g in d.gpus],
        max_num_seqs=(
            decided.max_num_seqs if decided and d.enforcing else session.registration.max_num_seqs if session else 0
        ),
        throughput_tokens_per_s=stats.throughput_tokens_per_s if stats else 0.0,
    )


async def _change_budget(
    config: DaemonConfig, clock: ScaledClock, at_s: float, budget_w: float, stop: asyncio.Event
) -> None:
    """Set the budget over the real admin socket, as an operator's palsctl would."""
    while clock.now() < at_s:
        if stop.is_set():
            return
        await clock.sleep(min(1.0, at_s - clock.now()))
    async with grpc.aio.insecure_channel(f"unix:{config.admin_socket_path}") as channel:
        stub = pals_pb2_grpc.PowerAdminStub(channel)
        await stub.SetBudget(pals_pb2.SetBudgetRequest(budget_w=budget_w))
    log.info("budget changed to %.0f W at t=%.0f s", budget_w, clock.now())


def baseline_of(spec: SimNodeSpec) -> SimNodeSpec:
    """The same run with the daemon in advise mode: GPUs at their default limit, configured batch."""
    return replace(spec, mode="advise")
