"""The SLO-driven planner (control/slo.py, control/latency.py) through the pure controller core.

Synthetic windows stand in for an engine: a light load with slack, a queue that builds, an overload. The
physics they follow is the engine's own profile (no simulator), so these check the planner's rules, not its
tuning: the cap comes down under slack, goes back up within one period when the queue grows, and the batch
limit never drops below the configured maximum under overload.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.core import Controller
from pals_daemon.control.latency import LatencyModel
from pals_daemon.control.types import EngineObservation, EngineTargets
from pals_daemon.model.perf_model import PerfModel
from tests.control.test_controller_core import REG, engine, gpu, inp

MODEL = "olmoe-1b-7b"
SLO = EngineTargets(ttft_ms=2000.0, tpot_ms=100.0)


def _window(
    *,
    requests: int,
    prompt: int = 1000,
    output: int = 20,
    busy: float = 0.2,
    steps: int = 40,
    waiting: int = 0,
    running: int = 2,
    ttft99: float | None = 150.0,
    tpot99: float | None = 20.0,
) -> EngineObservation:
    base = engine("e0", MODEL, [0, 1, 2, 3], busy=busy, waiting=waiting, running=running, max_seqs=64)
    return replace(
        base,
        prefill_tokens=requests * prompt,
        decode_tokens=requests * output,
        throughput_tokens_per_s=requests * output / base.window_s,
        arrived_requests=requests,
        num_steps=steps,
        ttft_p90_ms=ttft99,
        tpot_p90_ms=tpot99,
        ttft_p99_ms=ttft99,
        tpot_p99_ms=tpot99,
    )


BATCHES: list[int] = []


def _run(ctrl: Controller, windows: list[EngineObservation], start_w: float = 400.0) -> list[float]:
    """Feed the windows tick by tick with the GPUs at the limits decided the tick before; the caps chosen (the
    batch limits chosen go to BATCHES)."""
    cap = start_w
    caps = []
    BATCHES.clear()
    for k, w in enumerate(windows):
        gpus = [gpu(i, limit=cap, power=min(cap, 120.0)) for i in range(4)]
        d = ctrl.step(inp(gpus, [w], {"e0": SLO}, now=0.5 * k))
        cap = d.gpu_limits_w[0]
        caps.append(cap)
        e = d.engines["e0"]
        BATCHES.append(e.max_num_seqs)
        # The step token budget follows the batch limit (8192 tokens at the configured 64).
        assert e.max_num_batched_tokens == 8192 * e.max_num_seqs // 64
    return caps


def test_light_load_with_slack_lowers_the_cap() -> None:
    ctrl = Controller(REG)
    caps = _run(ctrl, [_window(requests=1) for _ in range(200)])
    assert caps[0] == 400.0
    assert caps[-1] < 400.0, "a light load far inside its SLO keeps the top cap"
    # Descent is rate-limited: never more than one step down per tick.
    steps = np.diff(caps)
    assert steps.min() >= -ControllerConfig().slo_step_down_w - 1e-9
    # And it reports what it predicts at the chosen cap.
    d = ctrl.step(inp([gpu(i, limit=caps[-1]) for i in range(4)], [_window(requests=1)], {"e0": SLO}, now=100.0))
    assert d.engines["e0"].predicted_ttft_p90_ms is not None and d.engines["e0"].predicted_tpot_p90_ms is not None


def test_a_breach_with_a_growing_queue_raises_the_cap_within_one_period() -> None:
    ctrl = Controller(REG)
    caps = _run(ctrl, [_window(requests=1) for _ in range(200)])
    low = caps[-1]
    assert low < 400.0
    burst = [
        _window(requests=20, busy=1.0, steps=10, waiting=5, running=20, ttft99=2600.0, tpot99=60.0),
        _window(requests=20, busy=1.0, steps=10, waiting=12, running=40, ttft99=3100.0, tpot99=60.0),
    ]
    after = _run(ctrl, burst, start_w=low)
    release = ControllerConfig().slo_release_w
    assert after[0] >= min(400.0, low + release), (low, after)
    assert after[1] >= after[0]


def test_overload_keeps_the_configured_batch_and_the_top_cap() -> None:
    ctrl = Controller(REG)
    over = [
        _window(requests=200, busy=1.0, steps=5, waiting=300 + 20 * k, running=64, ttft99=9000.0, tpot99=400.0)
        for k in range(40)
    ]
    caps = _run(ctrl, over)
    assert caps[-1] == 400.0
    assert set(BATCHES) == {64}, "under overload the batch limit must not drop below what keeps up with arrivals"


def test_step_time_model_learns_the_prefill_cost_from_windows() -> None:
    """RLS on (steps x decode prior, prefill tokens x prefill prior) recovers a 3x prefill and a 1.2x decode error."""
    profile = REG.find(MODEL)
    assert profile is not None
    lat = LatencyModel(PerfModel(profile), tput_scale=1.0)
    rng = np.random.default_rng(0)
    cap = np.float64(300.0)
    for _ in range(200):
        steps = int(rng.integers(5, 50))
        batch = float(rng.integers(1, 32))
        prefill = int(rng.integers(0, 20_000))
        busy = 1.2 * steps * float(lat.decode_step_s(cap, np.float64(batch))) + 3.0 * prefill * float(
            lat.prefill_s_per_token(cap) / lat.theta[1]
        )
        lat.observe_window(300.0, steps, int(steps * batch), prefill, busy)
    theta_d, theta_p = lat.theta
    assert abs(theta_d - 1.2) < 0.05
    assert abs(theta_p - 3.0) < 0.15


def test_budget_still_binds_engines_under_slos() -> None:
    ctrl = Controller(REG)
    for k in range(20):
        gpus = [gpu(i, limit=400.0) for i in range(4)]
        d = ctrl.step(inp(gpus, [_window(requests=5)], {"e0": SLO}, budget=700.0, now=0.5 * k))
        assert sum(d.gpu_limits_w.values()) <= 700.0 + 1e-6


def test_a_binding_budget_gives_an_engine_short_of_its_slo_the_highest_cap_that_fits() -> None:
    """When no cap within the budget meets the SLO, the split keeps the one closest to it (the highest), not
    the most efficient one (the throughput fraction cannot tell them apart: every cap serves the arrivals)."""
    ctrl = Controller(REG)
    heavy = _window(requests=20, busy=0.9, steps=10, waiting=0, running=20, ttft99=2600.0, tpot99=60.0)
    d = None
    for k in range(10):
        gpus = [gpu(i, limit=250.0) for i in range(4)]
        d = ctrl.step(inp(gpus, [heavy], {"e0": SLO}, budget=1000.0, now=0.5 * k))
    assert d is not None
    assert sum(d.gpu_limits_w.values()) <= 1000.0 + 1e-6
    assert min(d.gpu_limits_w.values()) >= 250.0 - 1e-6, d.gpu_limits_w


def test_prefill_overload_without_decode_demand_predicts_overload_instead_of_failing() -> None:
    """No decode tokens forecast but more prefill work than a cap can do: the step time is infinite at that cap,
    and 0 x inf must not reach the power model as NaN (it raised 'batch must be >= 1' inside the tick)."""
    profile = REG.find("mixtral-8x7b-instruct")
    assert profile is not None
    lat = LatencyModel(PerfModel(profile), tput_scale=1.0)
    caps = np.array([100.0, 200.0, 400.0])
    pred = lat.predict(caps, 0.0, 5e6, 64, 15_000.0, 0.0, chunk_tokens=8192.0, step_tokens=8192.0)
    assert pred.overloaded.all()
    assert np.isfinite(pred.batch).all() and (pred.batch >= 1).all()


def test_a_breach_at_a_low_cap_leaves_a_floor_while_the_load_stays() -> None:
    """After a measured breach at a low cap the planner may come down again once the hold is over, but not to the
    cap that breached (nor below) while the load stays near the one it breached at: the model's error there is
    learned. A much lighter load is planned without the floor."""
    cfg = ControllerConfig()
    ctrl = Controller(REG, cfg)
    caps = _run(ctrl, [_window(requests=1) for _ in range(200)])
    low = caps[-1]
    assert low < 300.0
    breach = _window(requests=1, ttft99=2500.0, tpot99=20.0)  # the SLO missed at the low cap, no queue
    after = _run(ctrl, [breach] + [_window(requests=1) for _ in range(200)], start_w=low)
    assert after[0] == 400.0, "a measured breach releases to the top cap the next tick"
    assert min(after[1:]) >= low + cfg.slo_step_down_w - 1e-9, (low, min(after[1:]))
    assert after[-1] < 400.0, "the cap still comes down to the floor after the hold"
    # The floor holds only near the load it was learned at: with arrivals a tenth as dense it is not applied.
    ctrl2 = Controller(REG, cfg)
    _run(ctrl2, [_window(requests=10) for _ in range(200)])
    slo = ctrl2._slo["e0"]
    slo.floor_w, slo._floor_load = 300.0, slo.forecast()[0]
    free = _run(ctrl2, [_window(requests=1) for _ in range(400)], start_w=300.0)
    assert free[-1] < 300.0, "a floor learned at ten times the load held the cap up"


def test_the_floor_comes_down_one_step_per_regime_window_without_a_breach() -> None:
    cfg = ControllerConfig()
    ctrl = Controller(REG, cfg)
    _run(ctrl, [_window(requests=1) for _ in range(10)])
    slo = ctrl._slo["e0"]
    slo.floor_w, slo._floor_load, slo._floor_set_s = 300.0, slo.forecast()[0], slo._clock_s
    windows = int(cfg.slo_regime_window_s / 0.5) + 2
    _run(ctrl, [_window(requests=1) for _ in range(windows)], start_w=300.0)
    assert slo.floor_w == 300.0 - cfg.slo_step_down_w


def test_no_batch_limit_below_the_requests_present() -> None:
    """A batch column below the requests running and waiting now is never feasible (the forecast lags a burst's
    onset; cutting there queues requests for a seat), whatever the latency model predicts for it."""
    profile = REG.find(MODEL)
    assert profile is not None
    ctrl = Controller(REG)
    _run(ctrl, [_window(requests=1) for _ in range(100)])
    slo = ctrl._slo["e0"]
    caps = np.array([200.0, 300.0, 400.0])
    args = (caps, 4, 400.0, [16, 32, 64], [2048, 4096, 8192])
    _, ok_idle, _ = slo.plan(*args, 0, 1.0, SLO, num_running=2)
    assert ok_idle[:, 0].any(), "a light load: the quarter batch is feasible somewhere (else the test proves nothing)"
    _, ok, _ = slo.plan(*args, 5, 1.0, SLO, num_running=20)
    assert not ok[:, 0].any() and (ok[:, 1] == ok_idle[:, 1]).all()
    _, ok, _ = slo.plan(*args, 10, 1.0, SLO, num_running=30)
    assert not ok[:, :2].any()


def test_tails_are_learned_per_request_and_per_batch_column() -> None:
    """Finished requests set the tails as percentiles (a window's p99 over a handful of requests is their
    maximum); the TPOT excess is learned per batch column (step token budget), the pooled one stands in for a
    column not run yet."""
    profile = REG.find(MODEL)
    assert profile is not None
    lat = LatencyModel(PerfModel(profile), tput_scale=1.0)
    caps = np.array([400.0])

    def pred(step_tokens: float) -> object:
        return lat.predict(caps, 100.0, 2000.0, 64, 1000.0, 0.0, chunk_tokens=2000.0, step_tokens=step_tokens)

    big = pred(8192.0)
    mean_ms = 1000.0 * float(big.ttft_mean_s[0])
    tau_ms, chunk_ms = 1000.0 * float(big.step_s[0]), 1000.0 * float(big.chunk_s[0])
    rng = np.random.default_rng(1)
    ratios = rng.uniform(1.0, 3.0, 400)
    excess = rng.uniform(0.0, 2.0, 400)
    finished = [(r * mean_ms, tau_ms + x * chunk_ms) for r, x in zip(ratios, excess, strict=True)]
    finished += [(mean_ms, float("nan"))] * 10  # single-token requests: judged on TTFT only
    lat.calibrate(big, 0, {}, finished)
    assert abs(lat.cal[("ttft", 99)] - np.percentile(np.r_[ratios, np.ones(10)], 99)) < 1e-9
    assert abs(lat.tpot_chunks_by_column[8192][99] - np.percentile(excess, 99)) < 1e-9
    # Another column has no samples of its own: the pooled tail; once it has, its own.
    small = pred(2048.0)
    assert np.isclose(
        float(small.tpot_p99_ms[0]), 1000.0 * (float(small.step_s[0]) + lat.tpot_chunks[99] * float(small.chunk_s[0]))
    )
    lat.calibrate(small, 0, {}, [(mean_ms, 1000.0 * float(small.step_s[0]))] * 50)  # no excess at all
    assert lat.tpot_chunks_by_column[2048][99] == 0.0
    assert np.isclose(float(pred(2048.0).tpot_p99_ms[0]), 1000.0 * float(pred(2048.0).step_s[0]))
    assert lat.tpot_chunks_by_column[8192][99] > 1.0


def test_attainment_carries_each_requests_deviation_to_every_cap() -> None:
    """The predicted share of requests meeting the SLOs: the learned request-level deviations (TTFT / mean, TPOT
    excess in chunks) at each cap's predicted mean; none before enough requests finished; lower at a lower cap."""
    profile = REG.find(MODEL)
    assert profile is not None
    lat = LatencyModel(PerfModel(profile), tput_scale=1.0)
    caps = np.array([150.0, 250.0, 400.0])

    def pred() -> object:
        return lat.predict(caps, 300.0, 6000.0, 64, 1000.0, 0.0, chunk_tokens=2000.0, step_tokens=8192.0)

    p = pred()
    assert lat.attainment(p, 2000.0, 100.0) is None, "no requests finished: nothing learned"
    mean_ms, tau_ms, chunk_ms = (1000.0 * float(a[-1]) for a in (p.ttft_mean_s, p.step_s, p.chunk_s))
    ratios = np.linspace(1.0, 4.0, 200)
    finished = [(r * mean_ms, tau_ms + 0.5 * chunk_ms) for r in ratios]
    lat.calibrate(p, 2, {}, finished)
    p = pred()
    ttft_slo = 3.0 * 1000.0 * float(p.ttft_mean_s[-1])  # at the top cap, ratios up to 3 meet it: 2/3 of them
    att = lat.attainment(p, ttft_slo, None)
    assert att is not None
    assert abs(att[-1] - np.mean(ratios <= 3.0 + 1e-9)) < 1e-9
    assert att[0] <= att[1] <= att[2] and att[0] < att[2], "a slower cap meets the same SLO for fewer requests"
    # TPOT: every request's excess is half a chunk; an SLO below the step time + half a chunk misses them all.
    tight = 1000.0 * float(p.step_s[-1] + 0.4 * p.chunk_s[-1])
    loose = 1000.0 * float(p.step_s[-1] + 0.6 * p.chunk_s[-1])
    assert lat.attainment(p, None, tight)[-1] == 0.0  # type: ignore[index]
    assert lat.attainment(p, None, loose)[-1] == 1.0  # type: ignore[index]


def test_where_no_setting_meets_the_slo_the_least_energy_of_equal_goodput_wins() -> None:
    """Nothing predicted within the SLO: not the top cap by reflex, but the least energy among the settings whose
    predicted attainment is within slo_attainment_tolerance of the best; with a tolerance of 1.0 any setting
    that keeps up is equal, with 0 only the best."""
    ctrl = Controller(REG)
    _run(ctrl, [_window(requests=1) for _ in range(100)])
    slo = ctrl._slo["e0"]
    caps = np.array([200.0, 300.0, 400.0])
    slo.plan(caps, 4, 400.0, [16, 32, 64], [2048, 4096, 8192], 0, 1.0, SLO, num_running=2)
    slo.attainment = np.array([[0.90, 0.90, 0.90], [0.95, 0.96, 0.96], [0.97, 0.97, 0.97]])
    slo._too_small = np.zeros(3, dtype=bool)
    energy = np.array([[1.0, 1.1, 1.2], [2.0, 2.1, 2.2], [3.0, 3.1, 3.2]])
    nothing = np.zeros((3, 3), dtype=bool)
    slo._clock_s = 1000.0  # past the start-up hold
    slo.breach = slo.queue_growing = False
    slo.config = replace(slo.config, slo_attainment_tolerance=0.015, slo_step_down_w=1000.0)
    ch = slo.choose(energy, nothing, caps, (2, 2))
    # 0.96 is within 1.5 pp of 0.97, 0.95 and 0.90 are not: the cheapest of the rest.
    assert (ch.row, ch.col, ch.cause) == (1, 1, "slo-goodput"), ch
    slo.config = replace(slo.config, slo_attainment_tolerance=0.0)
    ch = slo.choose(energy, nothing, caps, (2, 2))
    assert (ch.row, ch.col) == (2, 0), ch  # only the top cap's attainment is the best: its cheapest batch
    # A setting that cannot seat the requests present is never chosen, whatever its attainment.
    slo.config = replace(slo.config, slo_attainment_tolerance=0.5)
    slo._too_small = np.array([True, True, False])
    ch = slo.choose(energy, nothing, caps, (2, 2))
    assert (ch.row, ch.col) == (0, 2), ch
    # Requests waiting are not in the prediction (it is for arrivals from now on): they are drained at the top cap.
    slo.last_waiting = 3
    ch = slo.choose(energy, nothing, caps, (2, 2))
    assert ch.row == 2 and ch.cause != "slo-goodput", ch


def test_a_transient_lift_comes_straight_back_to_the_cap_it_left_but_not_after_a_breach() -> None:
    """A tick with nothing predicted feasible (a long prompt waiting) lifts the cap to the top; once the plan
    wants lower again the cap returns straight to the cap it left, not one descent step per tick from the top,
    and no lower than that in one move. After a measured breach the cap it left is forgotten."""
    ctrl = Controller(REG)
    _run(ctrl, [_window(requests=1) for _ in range(100)])
    slo = ctrl._slo["e0"]
    caps = np.array([200.0, 300.0, 400.0, 500.0])
    slo.plan(caps, 4, 500.0, [16, 32, 64], [2048, 4096, 8192], 0, 1.0, SLO, num_running=2)
    energy = np.array([[1.0, 1.1, 1.2], [2.0, 2.1, 2.2], [3.0, 3.1, 3.2], [4.0, 4.1, 4.2]])
    nothing = np.zeros((4, 3), dtype=bool)
    every = np.ones((4, 3), dtype=bool)
    slo._clock_s = 1000.0  # past the start-up hold
    slo.breach = slo.queue_growing = False
    slo.last_waiting = 1  # requests wait: no goodput choice, the top cap
    lift = slo.choose(energy, nothing, caps, (1, 2))
    assert (lift.row, lift.cause) == (3, "slo-infeasible"), lift
    slo.last_waiting = 0
    slo._clock_s += 0.5
    back = slo.choose(energy, every, caps, (3, lift.col))
    assert back.row == 1, f"stepped down from the top instead of returning to the cap it left: {back}"
    slo._clock_s += 0.5
    on = slo.choose(energy, every, caps, (1, back.col))
    assert on.row == 1, "below the cap it left in one move"  # 25 W per tick from 300 W is still row 1
    # A lift whose cap is then found wrong (a breach measured): the descent is rate-limited again.
    slo.last_waiting = 1
    slo._clock_s += 100.0
    lift = slo.choose(energy, nothing, caps, (1, 2))
    assert lift.row == 3, lift
    slo.last_waiting = 0
    slo._last_breach_s = slo._clock_s
    slo._clock_s += 0.5
    held = slo.choose(energy, every, caps, (3, lift.col))
    assert held.row == 3, held  # the breach hold
    slo._clock_s += ctrl.config.slo_breach_hold_s
    slo.config = replace(slo.config, slo_step_down_w=100.0)  # one grid row per tick here
    down = slo.choose(energy, every, caps, (3, held.col))
    assert down.row == 2, f"after a breach the descent is one step at a time: {down}"


def test_a_settings_own_requests_judge_it_both_ways_and_probe_one_cap_below() -> None:
    """Where a (cap, batch) setting has enough finished requests of its own, their tails decide its feasibility
    instead of the model, whichever way the model errs; one cap step below the setting in force, the requests in
    force scaled by the model's ratio of the two (a probe). Fewer than the minimum: the model stands."""
    from pals_daemon.control.measured import MEASURED_MIN_REQUESTS

    ctrl = Controller(REG)
    _run(ctrl, [_window(requests=1) for _ in range(100)])
    slo = ctrl._slo["e0"]
    lat = slo.latency
    caps = np.array([200.0, 250.0, 300.0, 400.0])
    batches, tokens = [16, 32, 64], [2048, 4096, 8192]

    def plan(measured: bool = True) -> np.ndarray:
        slo.use_measured = measured
        _, ok, _ = slo.plan(caps, 4, 400.0, batches, tokens, 0, 1.0, SLO, num_running=2)
        slo.use_measured = True
        return ok

    def fed(cap_w: float, batch: int, ttft_ms: float, tpot_ms: float, n: int) -> None:
        w = replace(_window(requests=1), current_max_num_seqs=batch, finished_ms=((ttft_ms, tpot_ms),) * n)
        slo.observe(w, cap_w, cap_w >= 400.0, SLO, 100.0)

    def model(tail: float) -> None:
        """Set the model's tails (a request's learning moved them): x ``tail`` the mean, no TPOT excess."""
        slo.margin = 0.1
        lat.cal = {("ttft", 90): tail, ("ttft", 99): tail}
        lat.tpot_chunks = {90: 0.0, 99: 0.0}
        lat.tpot_chunks_by_column = {}

    # The top cap's own requests missed TPOT: infeasible there, though the model has it feasible.
    fed(400.0, 64, 100.0, 2.0 * SLO.tpot_ms, MEASURED_MIN_REQUESTS)
    model(1.0)
    assert plan(measured=False)[3, 2] and not plan()[3, 2]
    # Too few requests at a setting: the model's verdict stands.
    fed(300.0, 64, 100.0, 2.0 * SLO.tpot_ms, MEASURED_MIN_REQUESTS - 1)
    model(1.0)
    assert plan(measured=False)[2, 2] and plan()[2, 2]
    # A setting the model rejects (its TTFT tail 1e4 x the mean) is feasible on its own requests' evidence ...
    fed(250.0, 32, 100.0, 10.0, MEASURED_MIN_REQUESTS)
    model(1e4)
    assert not plan(measured=False).any()
    ok = plan()
    assert ok[1, 1], "its own requests met the SLO with room"
    # ... and so is the next cap down at the same batch, by the probe (the model's ratio of the two is modest),
    # and nothing else.
    assert ok[0, 1]
    assert ok.sum() == 2
    # The requests in force came close to the SLO: scaled to the cap below by the model's ratio, they cross it.
    pred = slo.predictions[1]
    ratio = float(pred.ttft_p99_ms[0] / pred.ttft_p99_ms[1])
    assert ratio > 1.01, "the lower cap is predicted slower"
    allowed = (1 - slo.margin) * SLO.ttft_ms
    fed(250.0, 32, allowed / ratio**0.5, 10.0, 4 * MEASURED_MIN_REQUESTS)
    model(1e4)
    ok = plan()
    assert ok[1, 1] and not ok[0, 1]
