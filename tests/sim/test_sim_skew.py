"""SimEngine under expert-routing skew: per-GPU caps, the straggler sets the pace, expert-load counts."""

from __future__ import annotations

import pytest

from pals_daemon.sim.engine import Request, SimEngine
from pals_daemon.sim.gpu import SimGpu, make_sim_gpus
from pals_daemon.sim.trace import poisson_requests
from pals_daemon.sim.truth import ModelTruth, load_a100_truth

MODEL = "mixtral-8x7b-instruct"
SKEW = (0.4, 0.2, 0.2, 0.2)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _setup() -> tuple[ModelTruth, list[SimGpu], FakeClock]:
    clock = FakeClock()
    return load_a100_truth(MODEL), make_sim_gpus("A100-SXM4", 4, clock, cap_delay_s=0.0), clock


def _run(engine: SimEngine, clock: FakeClock, until_s: float) -> None:
    t = 0.0
    while t < until_s:
        t += 0.5
        clock.t = t
        engine.advance(t)


def _requests() -> list[Request]:
    return poisson_requests(6.0, 20.0, [256, 512], [64, 128], seed=5)


def test_no_share_is_todays_engine_bit_for_bit() -> None:
    runs = []
    for share in (None, "absent"):
        truth, gpus, clock = _setup()
        kwargs = {} if share == "absent" else {"expert_load_share": None}
        engine = SimEngine("e", truth, gpus, _requests(), 32, 4096, **kwargs)
        _run(engine, clock, 30.0)
        w = engine.take_window()
        assert w.expert_tokens_per_gpu == ()
        runs.append((engine.totals.output_tokens, engine.totals.busy_s, [g.energy_j(30.0) for g in gpus]))
    assert runs[0] == runs[1]


def test_uniform_share_matches_uniform_decode() -> None:
    truth, gpus, clock = _setup()
    engine = SimEngine("e", truth, gpus, [Request(0.0, 1, 41)], 8, 4096, expert_load_share=(1, 1, 1, 1))
    assert engine.expert_load_share == (0.25, 0.25, 0.25, 0.25)
    _run(engine, clock, 20.0)
    [f] = engine.totals.finished
    assert f.tpot_ms == pytest.approx(truth.decode_step(400, 1).step_time_s * 1000, rel=1e-6)


def test_skew_straggler_sets_pace_and_cold_gpus_can_be_capped_lower() -> None:
    truth = load_a100_truth(MODEL)
    results = {}
    for name, caps in (("uniform", (300, 300, 300, 300)), ("aware", (300, 180, 180, 180))):
        clock = FakeClock()
        gpus = make_sim_gpus("A100-SXM4", 4, clock, cap_delay_s=0.0)
        for g, c in zip(gpus, caps, strict=True):
            g.set_power_limit_mw(c * 1000)
        engine = SimEngine("e", truth, gpus, _requests(), 32, 4096, expert_load_share=SKEW)
        _run(engine, clock, 40.0)
        results[name] = (engine.totals.output_tokens, engine.totals.busy_s, sum(g.energy_j(40.0) for g in gpus))
        # Skew is slower than uniform routing at the same caps (the hot GPU is the straggler).
        if name == "uniform":
            assert truth.decode_step_skewed(caps, 32, SKEW).step_time_s > truth.decode_step(300, 32).step_time_s
            # Each GPU records its own power: the hot GPU draws more than the cold ones.
            assert gpus[0].energy_j(40.0) > gpus[1].energy_j(40.0)
    tok_u, _, j_u = results["uniform"]
    tok_a, _, j_a = results["aware"]
    # Prefill still runs at the lowest cap (modelled), so the aware caps lose a little throughput; tokens/J gains.
    assert tok_a >= 0.9 * tok_u
    assert tok_a / j_a > 1.03 * tok_u / j_u


def test_expert_tokens_follow_the_share() -> None:
    truth, gpus, clock = _setup()
    engine = SimEngine("e", truth, gpus, _requests(), 32, 4096, expert_load_share=(2, 1, 1, 1))
    _run(engine, clock, 10.0)
    w = engine.take_window()
    counts = w.expert_tokens_per_gpu
    assert len(counts) == 4 and sum(counts) > 0
    assert counts[0] == pytest.approx(2 * counts[1], rel=0.01)
    top_k = truth.spec.top_k
    assert sum(counts) == pytest.approx((w.prefill_tokens + w.decode_tokens) * top_k, rel=0.01)


@pytest.mark.parametrize("bad", [(1, 1, 1), (1, -1, 1, 1), (0, 0, 0, 0), (1, float("nan"), 1, 1)])
def test_bad_share_refused(bad: tuple[float, ...]) -> None:
    truth, gpus, _ = _setup()
    with pytest.raises(ValueError, match="expert_load_share"):
        SimEngine("e", truth, gpus, [], 8, 4096, expert_load_share=bad)


def test_link_expert_load_reports_give_the_daemon_the_share() -> None:
    from pals_daemon.server.engines import EngineRegistration, EngineSession
    from pals_daemon.sim.link import expert_load_reports

    truth, gpus, clock = _setup()
    engine = SimEngine("e", truth, gpus, _requests(), 32, 4096, expert_load_share=SKEW)
    _run(engine, clock, 5.0)
    window = engine.take_window()
    uuids = [g.identity.uuid for g in gpus]
    reports = expert_load_reports(window, uuids)
    assert [r.gpu_uuid for r in reports] == uuids
    session = EngineSession(EngineRegistration("e", MODEL, (0, 1, 2, 3), 32, 4096), "s1")
    for i, rep in enumerate(reports):
        assert rep.window_s == window.window_s
        session.add_expert_load(rep, i)
    obs = session.take_observation(5.0)
    assert obs.expert_load_share == pytest.approx({0: 0.4, 1: 0.2, 2: 0.2, 3: 0.2}, rel=1e-3)
    # No share: no reports (today's link traffic unchanged).
    plain = SimEngine("p", truth, make_sim_gpus("A100-SXM4", 4, clock), [], 8, 4096)
    assert expert_load_reports(plain.take_window(), uuids) == []


def test_daemon_over_real_socket_lowers_the_cold_gpus(tmp_path) -> None:
    """The daemon's own path: SimEngineLink sends ExpertLoadReports, the daemon caps the cold GPUs lower."""
    import asyncio

    import uvloop

    from pals_daemon.clock import ScaledClock
    from pals_daemon.config import DaemonConfig
    from pals_daemon.control.types import EngineTargets
    from pals_daemon.model.profile import load_profile_tree
    from pals_daemon.server.daemon import default_profiles_dir
    from pals_daemon.server.runner import Runner
    from pals_daemon.sim.gpu import SimBackend
    from pals_daemon.sim.link import SimEngineLink

    async def scenario() -> list[dict[int, float]]:
        clock = ScaledClock(20.0)
        gpus = make_sim_gpus("A100-SXM4", 4, clock.now)
        config = DaemonConfig(
            backend="sim",
            mode="enforce",
            period_s=0.5,
            runtime_dir=f"{tmp_path}/run",
            state_dir=f"{tmp_path}/state",
            engine_socket_group="",
            metrics_port=0,
            sim_gpu_kind="A100-SXM4",
            sim_gpu_count=4,
            sim_speed=20.0,
        )
        runner = Runner(config, SimBackend(gpus), load_profile_tree(str(default_profiles_dir())), clock)
        # Every tick's limits once the controller has settled (a tick whose window caught no expert-load
        # report, or the one after the engine left, decides uniform caps: judge the run, not one tick).
        decided: list[dict[int, float]] = []
        runner.daemon.on_tick.append(
            lambda d: (
                decided.append(dict(d.last_decision.gpu_limits_w))
                if d.last_decision and d.engines.get("e") and d.last_tick_s > 10.0
                else None
            )
        )
        await runner.start()
        runner.daemon.set_targets("e", EngineTargets(tokens_per_s=200.0))
        reqs = poisson_requests(3.0, 40.0, 256, 256, seed=2)
        engine = SimEngine(
            "e", load_a100_truth(MODEL), gpus, reqs, 64, 8192, start_s=clock.now(), expert_load_share=SKEW
        )
        link = SimEngineLink(engine, MODEL, [g.identity.uuid for g in gpus], str(config.engine_socket_path), clock)
        stop = asyncio.Event()
        control = asyncio.create_task(runner.run())
        task = asyncio.create_task(link.run(stop))
        try:
            await clock.sleep(20.0)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10.0)
            runner.daemon.request_stop()
            await control
        return decided

    decided = uvloop.run(scenario())
    # The hot GPU above every cold one. The cold GPUs need not match to the watt: under load a tick's window can
    # hold one GPU's expert-load report and not the next one's, so the measured shares differ a little (CI, on
    # a loaded 2-core machine, saw 155/155/150 W and failed the old `lim[1] == lim[2] == lim[3]`).
    skewed = [lim for lim in decided if lim[0] > max(lim[1], lim[2], lim[3])]
    assert decided and len(skewed) >= len(decided) / 2, (len(skewed), len(decided), decided[-5:])
