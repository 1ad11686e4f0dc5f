"""Parity of the shared tick pipeline: the live daemon and pals-replay decide the same, tick for tick.

The same scenario (two engines on eight simulated A100s, bursty loads out of phase, expert-load skew,
throughput and latency targets, a budget that binds, truth off the profile) runs twice:

- through ``run_policy`` (pals-replay: ``replay/node.py`` steps the node through ``pals_daemon/tick.py``);
- through the live daemon in this process: ``Daemon`` on the sim backend, its ``EngineLinkServicer`` on a
  real Unix socket, each simulated engine a real gRPC client sending its StepReport and ExpertLoadReports
  and applying the directives it reads back, as ``sim/link.py`` does.

The daemon's clock is a manual clock the test moves to each tick time; it calls ``Daemon.tick`` itself
instead of ``Daemon.run`` (whose sleeps and wake-ups would make tick times depend on the scheduler), and
waits until the servicer has folded a tick's reports before ticking. Not covered here (each has its own
tests in tests/server): the control loop's timing, directive expiry, faults, external caps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import async_helpers
import grpc

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.config import DaemonConfig
from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.types import ControllerInput, Decision, EngineTargets
from pals_daemon.model.profile import ProfileRegistry, load_profile, load_profiles
from pals_daemon.replay.scenario import Budget, BurstyLoad, EngineSpec, Scenario
from pals_daemon.replay.simulate import Prepared, prepare, run_policy
from pals_daemon.server.daemon import Daemon, default_profiles_dir
from pals_daemon.server.engine_link import EngineLinkServicer
from pals_daemon.server.engines import EngineSession
from pals_daemon.sim.engine import SimEngine
from pals_daemon.sim.gpu import SimBackend, SimGpu, make_sim_gpus
from pals_daemon.sim.link import expert_load_reports, register_message, step_report
from pals_daemon.sim.truth import Perturbation

REGISTRY = load_profiles(str(default_profiles_dir()))
CONFIG = ControllerConfig(gpu_kind="A100-SXM4")
BUDGET_W = 1200.0
DURATION_S = 30.0
READ_TIMEOUT_S = 10.0


class ManualClock:
    """Simulated time that moves only when the test sets it (Daemon.run, which sleeps on it, is not used)."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        raise AssertionError("the parity test drives Daemon.tick itself; nothing may sleep on its clock")


def _scenario() -> Scenario:
    engines = (
        EngineSpec(
            "mixtral",
            "mixtral-8x7b-instruct",
            BurstyLoad(8.0, 1.0, on_s=8.0, off_s=8.0, prompt_tokens=512, output_tokens=128, seed=11),
            targets=EngineTargets(tokens_per_s=300.0, ttft_ms=2000.0, tpot_ms=150.0),
            perturbation=Perturbation(throughput_factor=0.9, power_factor=1.08),
            expert_load_share=(0.4, 0.2, 0.2, 0.2),
        ),
        EngineSpec(
            "olmoe",
            "olmoe-1b-7b",
            BurstyLoad(40.0, 5.0, on_s=6.0, off_s=6.0, prompt_tokens=256, output_tokens=128, seed=12),
            targets=EngineTargets(tokens_per_s=1500.0),
            perturbation=Perturbation(throughput_factor=1.1),
        ),
    )
    return Scenario("parity", engines, duration_s=DURATION_S, budget=Budget.constant(BUDGET_W))


def _replay(
    sc: Scenario,
    prep: Prepared,
    policy: str = "pals",
    registry: ProfileRegistry = REGISTRY,
    config: ControllerConfig = CONFIG,
) -> list[tuple[ControllerInput, Decision]]:
    ticks: list[tuple[ControllerInput, Decision]] = []
    run_policy(sc, policy, registry, prep, config=config, on_tick=lambda inp, d: ticks.append((inp, d)))
    return ticks


class _EngineClient:
    """One simulated engine on the engine socket: what ``SimEngineLink`` sends and applies, stepped by the test."""

    def __init__(self, engine: SimEngine, model: str, gpus: list[SimGpu], stub: pals_pb2_grpc.EngineLinkStub) -> None:
        self.engine = engine
        self.uuids = [g.identity.uuid for g in gpus]
        self.outgoing: asyncio.Queue[pals_pb2.EngineMessage | None] = asyncio.Queue()
        self.outgoing.put_nowait(register_message(engine, model, self.uuids))
        self.call = stub.Connect(self._messages())

    async def _messages(self) -> AsyncIterator[pals_pb2.EngineMessage]:
        while (msg := await self.outgoing.get()) is not None:
            yield msg

    async def read(self) -> pals_pb2.DaemonMessage:
        msg = await asyncio.wait_for(self.call.read(), READ_TIMEOUT_S)
        assert msg is not grpc.aio.EOF, "the daemon ended the session"
        return msg

    def report(self, now_s: float) -> tuple[float, int]:
        """Advance to ``now_s`` and send the window; returns what the session must show once it is folded."""
        self.engine.advance(now_s)
        window = self.engine.take_window()
        if window.window_s == 0:
            return 0.0, 0  # nothing ran yet: SimEngineLink sends its first report one interval after registering
        self.outgoing.put_nowait(pals_pb2.EngineMessage(step=step_report(window)))
        experts = expert_load_reports(window, self.uuids)
        for rep in experts:
            self.outgoing.put_nowait(pals_pb2.EngineMessage(expert_load=rep))
        return window.window_s, len(experts)

    async def apply_directive(self) -> None:
        msg = await self.read()
        assert msg.WhichOneof("body") == "directive"
        self.engine.apply_limits(msg.directive.max_num_seqs, msg.directive.max_num_batched_tokens)


async def _folded(session: EngineSession, window_s: float, expert_gpus: int) -> None:
    """Wait until the servicer has folded this tick's report (a session's window is fresh after every tick)."""
    await async_helpers.eventually(
        lambda: session.window.window_s == window_s and len(session.expert_load.tokens_by_gpu) == expert_gpus,
        READ_TIMEOUT_S,
    )


async def _live_daemon(
    sc: Scenario,
    prep: Prepared,
    tmp: Path,
    clocks_enabled: bool,
    registry: ProfileRegistry = REGISTRY,
    controller_config: ControllerConfig = CONFIG,
) -> list[tuple[ControllerInput, Decision]]:
    clock = ManualClock()
    engines, engine_gpus = [], []
    first = 0
    for spec in sc.engines:
        gpus = make_sim_gpus(spec.gpu_kind, spec.num_gpus, clock.now, first_index=first)
        first += spec.num_gpus
        engine_gpus.append(gpus)
        engines.append(
            SimEngine(
                spec.engine_id,
                prep.truths[spec.engine_id],
                gpus,
                prep.requests[spec.engine_id],
                spec.max_num_seqs,
                spec.max_num_batched_tokens,
                expert_load_share=spec.expert_load_share,
            )
        )
    config = DaemonConfig(
        backend="sim",
        mode="enforce",
        period_s=sc.period_s,
        runtime_dir=str(tmp / "run"),
        state_dir=str(tmp / "state"),
        engine_socket_group="",
        metrics_port=0,
        budget_w=BUDGET_W,
        clocks_enabled=clocks_enabled,
    )
    all_gpus = [g for gs in engine_gpus for g in gs]
    daemon = Daemon(config, SimBackend(all_gpus), registry, clock, controller_config)
    await daemon.start()
    # A spy, not a stand-in: records what the controller is given, then runs it.
    inputs: list[ControllerInput] = []
    step = daemon.controller.step

    def recording_step(inp: ControllerInput) -> Decision:
        inputs.append(inp)
        return step(inp)

    daemon.controller.step = recording_step  # type: ignore[method-assign]
    for spec in sc.engines:
        daemon.set_targets(spec.engine_id, spec.targets)
    server = grpc.aio.server()
    link = EngineLinkServicer(daemon.engines, daemon.resolve_gpus, sc.period_s, now=clock.now)
    pals_pb2_grpc.add_EngineLinkServicer_to_server(link, server)
    socket_path = tmp / "engine.sock"
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    ticks: list[tuple[ControllerInput, Decision]] = []
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            stub = pals_pb2_grpc.EngineLinkStub(channel)
            clients = []
            # One after the other: the daemon observes engines in registration order, as the replay does.
            for e, spec, gs in zip(engines, sc.engines, engine_gpus, strict=True):
                clients.append(_EngineClient(e, spec.model, gs, stub))
                assert (await clients[-1].read()).WhichOneof("body") == "registered"
            sessions = [daemon.engines.get(e.engine_id) for e in engines]
            assert all(sessions)
            for k in range(int(round(sc.duration_s / sc.period_s))):
                clock.t = k * sc.period_s
                sent = [c.report(clock.t) for c in clients]
                for session, (window_s, experts) in zip(sessions, sent, strict=True):
                    assert session is not None
                    await _folded(session, window_s, experts)
                decision = await daemon.tick()
                ticks.append((inputs[-1], decision))
                for c in clients:
                    await c.apply_directive()
            for c in clients:
                c.outgoing.put_nowait(None)
    finally:
        await server.stop(0)
        await daemon.close()
    return ticks


def _lowers_and_raises(before: Mapping[int, float], after: Mapping[int, float]) -> bool:
    return any(after[i] < before[i] for i in after) and any(after[i] > before[i] for i in after)


def test_daemon_and_replay_make_identical_decisions(short_tmp: Path) -> None:
    # The locked-clock knob is off here (the next tests turn it on).
    sc = _scenario()
    prep = prepare(sc)
    replay = _replay(sc, prep)
    live = async_helpers.drive(_live_daemon(sc, prep, short_tmp, clocks_enabled=False), 120.0)
    assert len(live) == len(replay) == int(DURATION_S / sc.period_s)
    # The case exercises what the pipeline orders: per-GPU caps that differ, a budget that binds, ticks that
    # lower some GPUs while raising others, and batch limits that move.
    decided = [d.gpu_limits_w for _, d in replay]
    assert any(d[0] != d[1] for d in decided)
    assert all(sum(d.values()) <= BUDGET_W + 1e-6 for d in decided)
    assert any(sum(d.values()) == BUDGET_W for d in decided)
    assert any(_lowers_and_raises(a, b) for a, b in zip(decided, decided[1:], strict=False))
    assert len({d.engines["mixtral"].max_num_seqs for _, d in replay}) > 1
    for k, ((inp_r, dec_r), (inp_d, dec_d)) in enumerate(zip(replay, live, strict=True)):
        assert inp_d == inp_r, f"tick {k}: the daemon observed something else than the replay"
        _assert_same_decision(k, dec_d, dec_r)


def test_with_the_clock_knob_on_both_offer_it_and_decide_the_same(short_tmp: Path) -> None:
    """The A100 scenario with the knob on in both (the replay's "pals-clock"): the same inputs, clock fields
    included, and the same decisions (no clock dimension in these profiles: every GPU stays unlocked)."""
    sc = _scenario()
    prep = prepare(sc)
    replay = _replay(sc, prep, "pals-clock")
    live = async_helpers.drive(_live_daemon(sc, prep, short_tmp, clocks_enabled=True), 120.0)
    for k, ((inp_r, dec_r), (inp_d, dec_d)) in enumerate(zip(replay, live, strict=True)):
        assert all(g.clock_control and g.max_clock_mhz > g.min_clock_mhz > 0 for g in inp_d.gpus)
        assert inp_d == inp_r, f"tick {k}: the daemon observed something else than the replay"
        _assert_same_decision(k, dec_d, dec_r)
        assert all(v is None for v in dec_d.gpu_locked_clocks_mhz.values())


H100_REGISTRY = ProfileRegistry(
    [
        load_profile(
            Path(__file__).resolve().parents[2]
            / "profiles"
            / "h100"
            / "qwen3-30b-a3b-instruct-2507.h100-80gb-hbm3.tp1.json"
        )
    ]
)
# A short forecast window, so that the planner starts locking within the test's 30 s.
H100_CONFIG = ControllerConfig(gpu_kind="H100 80GB HBM3", slo_forecast_window_s=5.0)


def test_the_clock_planner_locks_the_same_clocks_in_daemon_and_replay(short_tmp: Path) -> None:
    """A light H100 engine under latency SLOs: the planner locks clocks, and the daemon (its clock actuator on the
    simulated GPU) and the replay (tick.LockedClockKnob) observe and decide the same, locks included."""
    sc = Scenario(
        "parity-h100",
        (
            EngineSpec(
                "qwen",
                "Qwen/Qwen3-30B-A3B-Instruct-2507",
                BurstyLoad(6.0, 2.0, on_s=5.0, off_s=5.0, prompt_tokens=512, output_tokens=128, seed=21),
                targets=EngineTargets(ttft_ms=2000.0, tpot_ms=100.0),
                gpu_kind="H100-SXM5",
                num_gpus=1,
                max_num_seqs=64,
            ),
        ),
        duration_s=DURATION_S,
        budget=Budget.constant(BUDGET_W),  # the live daemon's (it does not bind one H100)
    )
    prep = prepare(sc)
    replay = _replay(sc, prep, "pals-clock", H100_REGISTRY, H100_CONFIG)
    live = async_helpers.drive(_live_daemon(sc, prep, short_tmp, True, H100_REGISTRY, H100_CONFIG), 120.0)
    locks = [d.gpu_locked_clocks_mhz.get(0) for _, d in replay]
    assert any(lk is not None for lk in locks), "the planner never locked a clock"
    # The lock in force reaches the next tick's input in both.
    assert any(inp.gpus[0].locked_clock_mhz is not None for inp, _ in replay)
    for k, ((inp_r, dec_r), (inp_d, dec_d)) in enumerate(zip(replay, live, strict=True)):
        assert inp_d == inp_r, f"tick {k}: the daemon observed something else than the replay"
        _assert_same_decision(k, dec_d, dec_r)


def _assert_same_decision(k: int, dec_d: Decision, dec_r: Decision) -> None:
    assert dict(dec_d.gpu_limits_w) == dict(dec_r.gpu_limits_w), f"tick {k}: power limits differ"
    batches_d = {e: (d.max_num_seqs, d.max_num_batched_tokens) for e, d in dec_d.engines.items()}
    batches_r = {e: (d.max_num_seqs, d.max_num_batched_tokens) for e, d in dec_r.engines.items()}
    assert batches_d == batches_r, f"tick {k}: batch limits differ"
    locks_d, locks_r = dict(dec_d.gpu_locked_clocks_mhz), dict(dec_r.gpu_locked_clocks_mhz)
    assert locks_d == locks_r, f"tick {k}: locked clocks differ"
