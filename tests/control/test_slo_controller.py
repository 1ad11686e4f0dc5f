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
