"""The clock dimension of the SLO planner (control/clock_plan.py) through the pure controller core.

Synthetic windows of a light H100 load stand in for an engine (no simulator; the closed loop with the simulated
truth is tests/replay/test_clock_replay.py): the planner locks a lower clock once the engine has been watched
for a forecast window, releases it the tick after a breach, leaves GPUs without the knob alone, and never lets
the clock replace the cap under a budget.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pals_daemon.control.clock_plan import CLOCK_RELEASE_HOLD_S, CLOCK_STEP_DOWN_MHZ
from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.core import Controller
from pals_daemon.control.types import Decision, EngineObservation, EngineTargets, GpuObservation
from pals_daemon.model.profile import ProfileRegistry, load_profile
from tests.control.test_controller_core import engine, gpu, inp

PROFILE = load_profile(
    Path(__file__).resolve().parents[2] / "profiles" / "h100" / "qwen3-30b-a3b-instruct-2507.h100-80gb-hbm3.tp1.json"
)
REG = ProfileRegistry([PROFILE])
MODEL = "Qwen/Qwen3-30B-A3B-Instruct-2507"
SLO = EngineTargets(ttft_ms=2000.0, tpot_ms=100.0)


def _window(*, requests: int = 2, ttft: float = 150.0, tpot: float = 15.0, waiting: int = 0) -> EngineObservation:
    base = engine("e0", MODEL, [0], busy=0.15, waiting=waiting, running=2, max_seqs=64)
    return replace(
        base,
        prefill_tokens=requests * 500,
        decode_tokens=requests * 100,
        throughput_tokens_per_s=requests * 100 / base.window_s,
        arrived_requests=requests,
        num_steps=60,
        ttft_p90_ms=ttft,
        tpot_p90_ms=tpot,
        ttft_p99_ms=ttft,
        tpot_p99_ms=tpot,
    )


def _gpu(limit: float, lock: int | None, knob: bool = True, lo: float = 200.0) -> GpuObservation:
    g = gpu(0, lo=lo, hi=700.0, default=700.0, limit=limit, power=min(limit, 300.0))
    return replace(
        g, clock_control=knob, min_clock_mhz=345, max_clock_mhz=1980, locked_clock_mhz=lock if knob else None
    )


def _run(
    ctrl: Controller,
    windows: list[EngineObservation],
    knob: bool = True,
    budget: float | None = None,
    lo: float = 200.0,
) -> list[Decision]:
    """Feed the windows with the GPU at the limit and lock decided the tick before."""
    limit, lock = 700.0, None
    out = []
    for k, w in enumerate(windows):
        d = ctrl.step(inp([_gpu(limit, lock, knob, lo)], [w], {"e0": SLO}, budget=budget, now=0.5 * k))
        limit, lock = d.gpu_limits_w[0], d.gpu_locked_clocks_mhz.get(0)
        out.append(d)
    return out


def test_light_load_with_slack_locks_a_lower_clock_after_the_start_up_hold() -> None:
    # No cap in the GPU's range binds (as on H200, whose decode draws below the 200 W minimum limit, arXiv
    # 2605.11999): only the clock can save energy.
    ctrl = Controller(REG)
    ds = _run(ctrl, [_window() for _ in range(200)], lo=700.0)
    assert all(d.gpu_limits_w[0] == 700.0 for d in ds)
    locks = [d.gpu_locked_clocks_mhz[0] for d in ds]
    # Not before the engine has been watched as long as the cap waits (slo_startup_hold_s, at 0.5 s a tick).
    hold_ticks = int(ControllerConfig().slo_startup_hold_s / 0.5)
    assert hold_ticks >= 10
    assert all(lk is None for lk in locks[: hold_ticks - 2])
    assert locks[-1] is not None and locks[-1] < 1500
    # Descent is rate-limited: at most 300 MHz per tick.
    seq = [1980 if lk is None else lk for lk in locks]
    assert min(b - a for a, b in zip(seq, seq[1:], strict=False)) >= -300
    # The decision says what it predicts at the lock: still inside the SLO with the margin.
    e = ds[-1].engines["e0"]
    assert e.predicted_tpot_p90_ms is not None and e.predicted_tpot_p90_ms < SLO.tpot_ms
    assert any(d.changed for d in ds[hold_ticks - 2 :])


def test_where_caps_bind_the_lock_leads_while_the_cap_descends() -> None:
    # With the whole H100 range (200-700 W) the profile predicts that a binding cap saves about as much as a
    # lock: the lock comes first (a clock step is 300 MHz a tick, a cap step 25 W) and the cap follows it down.
    ds = _run(Controller(REG), [_window() for _ in range(200)])
    first = next(k for k, d in enumerate(ds) if d.gpu_locked_clocks_mhz[0] is not None)
    assert ds[first].gpu_limits_w[0] > 600.0
    assert ds[-1].gpu_limits_w[0] < 300.0


def test_a_breach_unlocks_the_next_tick() -> None:
    ctrl = Controller(REG)
    ds = _run(ctrl, [_window() for _ in range(200)], lo=700.0)
    assert ds[-1].gpu_locked_clocks_mhz[0] is not None
    limit, lock = ds[-1].gpu_limits_w[0], ds[-1].gpu_locked_clocks_mhz[0]
    d = ctrl.step(inp([_gpu(limit, lock, lo=700.0)], [_window(tpot=180.0, ttft=3000.0)], {"e0": SLO}, now=100.0))
    assert d.gpu_locked_clocks_mhz[0] is None and d.changed
    # ...stays unlocked while the burst may go on, then comes back no lower than one step above the lock that
    # breached (the learned floor).
    seen = []
    for k in range(60):
        g = _gpu(d.gpu_limits_w[0], d.gpu_locked_clocks_mhz[0], lo=700.0)
        d = ctrl.step(inp([g], [_window()], {"e0": SLO}, now=100.5 + 0.5 * k))
        seen.append(d.gpu_locked_clocks_mhz[0])
    hold_ticks = int(CLOCK_RELEASE_HOLD_S / 0.5) - 1
    assert all(lk is None for lk in seen[:hold_ticks])
    assert any(lk is not None for lk in seen)
    assert all(lk is None or lk >= lock + CLOCK_STEP_DOWN_MHZ for lk in seen)


def test_a_growing_queue_the_lock_cannot_serve_unlocks() -> None:
    ctrl = Controller(REG)
    ds = _run(ctrl, [_window() for _ in range(200)], lo=700.0)
    limit, lock = ds[-1].gpu_limits_w[0], ds[-1].gpu_locked_clocks_mhz[0]
    assert lock is not None
    d = ctrl.step(inp([_gpu(limit, lock, lo=700.0)], [_window(requests=400, waiting=300)], {"e0": SLO}, now=100.0))
    assert d.gpu_locked_clocks_mhz[0] is None


def test_gpus_without_the_knob_get_no_lock_and_the_same_caps() -> None:
    windows = [_window() for _ in range(150)]
    with_knob_off = _run(Controller(REG), windows, knob=False)
    assert all(d.gpu_locked_clocks_mhz == {} for d in with_knob_off)
    # Cap-only control: the same caps as a controller that never heard of clocks (no clock dimension at all).
    no_clock_profile = ProfileRegistry([replace(PROFILE, clock_points=())])
    cap_only = _run(Controller(no_clock_profile), windows, knob=True)
    assert [d.gpu_limits_w for d in with_knob_off] == [d.gpu_limits_w for d in cap_only]
    assert all(d.gpu_locked_clocks_mhz == {0: None} for d in cap_only)


def test_under_a_budget_the_cap_still_bounds_power() -> None:
    ds = _run(Controller(REG), [_window() for _ in range(200)], budget=300.0)
    assert all(d.gpu_limits_w[0] <= 300.0 + 1e-6 for d in ds)
    # The lock comes on top of the cap, never instead of it.
    assert any(d.gpu_locked_clocks_mhz[0] is not None for d in ds)
