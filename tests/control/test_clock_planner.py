"""The clock dimension of the SLO planner (control/clock_plan.py) through the pure controller core.

Synthetic windows of a light H100 load stand in for an engine (no simulator; the closed loop with the simulated
truth is tests/replay/test_clock_replay.py): the planner locks a lower clock once the engine has been watched
for a forecast window, releases it the tick after a breach, leaves GPUs without the knob alone, and never lets
the clock replace the cap under a budget.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pals_daemon.control.clock_plan import (
    CLOCK_RELEASE_HOLD_S,
    CLOCK_STEP_DOWN_MHZ,
    ClockPlanner,
    Setting,
)
from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.core import Controller
from pals_daemon.control.measured import MEASURED_MEMORY_S, MEASURED_MIN_REQUESTS
from pals_daemon.control.slo import SloEngine
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


def test_a_lock_runs_at_the_slo_planners_cap_not_the_top_cap() -> None:
    # With the whole H100 range (200-700 W) the SLO planner alone brings the cap down (it binds in prefill); with
    # the clock knob the lock comes on top of that cap (the clock in force is the lower of the two), budget or
    # not: the cap still bounds prefill's near-TDP draw, which a lock at the top cap would leave unbounded.
    no_clock = _run(Controller(ProfileRegistry([replace(PROFILE, clock_points=())])), [_window() for _ in range(200)])
    assert no_clock[-1].gpu_limits_w[0] < 300.0
    ds = _run(Controller(REG), [_window() for _ in range(200)])
    locked = [d for d in ds[100:] if d.gpu_locked_clocks_mhz[0] is not None]
    assert locked, "no lock at a light load on the clocked profile"
    assert all(d.gpu_limits_w[0] < 700.0 for d in locked), sorted({d.gpu_limits_w[0] for d in locked})
    e = locked[-1].engines["e0"]
    assert e.predicted_tpot_p90_ms is not None and e.predicted_tpot_p90_ms < SLO.tpot_ms


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


# ---- measured feasibility and the joint (clock, batch) choice (clock_plan.py) ------------------------------


def _planner_and_slo() -> tuple[ClockPlanner, SloEngine]:
    """A fresh clock planner and the SLO planner of an engine the controller has watched for 30 s (its learned
    latency model; taken from the controller's per-engine state, the only place it lives)."""
    ctrl = Controller(REG)
    _run(ctrl, [_window() for _ in range(60)], lo=700.0)
    slo = ctrl._slo["e0"]
    return ClockPlanner(ctrl._clocks["e0"].response), slo


def _setting(tpot_ms: float) -> Setting:
    return Setting(
        cap_w=700.0,
        n_gpus=1,
        max_limit_w=700.0,
        batch_limit=64,
        tokens_limit=8192,
        num_waiting=0,
        power_ratio=1.0,
        target=EngineTargets(ttft_ms=2000.0, tpot_ms=tpot_ms),
        batch_limits=(16, 32, 64),
        tokens_limits=(2048, 4096, 8192),
    )


def _locks(planner: ClockPlanner, slo: SloEngine, at: Setting, ticks: int = 60) -> list[int | None]:
    cfg = ControllerConfig()
    out = []
    for _ in range(ticks):
        ch = planner.choose(slo, 0.5, (345, 1980), at, 0.5, cfg.slo_min_saving, 60.0, cfg.slo_startup_hold_s)
        out.append(ch.clock_mhz)
        # Unlocked, the batch limit is the SLO planner's (its last column, the configured 64).
        assert ch.clock_mhz is not None or ch.column == 2
    return out


def test_measured_tails_with_slack_admit_a_lock_the_model_alone_refuses() -> None:
    planner, slo = _planner_and_slo()
    # A TPOT SLO the model's p99 at the top clock only just meets: no lock is feasible by the model alone.
    top_p99 = float(planner.evaluate(slo, [1980], _setting(100.0))[2][2].tpot_p99_ms[0])
    at = _setting(top_p99 / (1 - slo.margin) + 1e-6)
    assert all(lk is None for lk in _locks(planner, slo, at))
    # The engine's own requests at the setting in force (unlocked, batch 64) measured well under it: their
    # tail, scaled by the model's ratio between a lock and the setting in force, admits locks.
    planner, slo = _planner_and_slo()
    planner.observe([(100.0, 0.5 * top_p99)] * MEASURED_MIN_REQUESTS, None, 64)
    locks = _locks(planner, slo, at)
    assert min(lk or 1980 for lk in locks) < 1980
    # ...while a measured tail as high as the model's admits none.
    planner, slo = _planner_and_slo()
    planner.observe([(100.0, top_p99)] * MEASURED_MIN_REQUESTS, None, 64)
    assert all(lk is None for lk in _locks(planner, slo, at))


def test_measured_tails_are_kept_per_setting_and_need_enough_requests() -> None:
    planner, _ = _planner_and_slo()
    planner.observe([(100.0, 5.0)] * (MEASURED_MIN_REQUESTS - 1), None, 64)
    assert planner.measured_tails(99) is None
    planner.observe([(300.0, 9.0)], None, 64)
    # The 99th percentile of 20 requests (linear between order statistics: 0.81 of the way to the worst).
    assert planner.measured_tails(99) == {"ttft": pytest.approx(262.0), "tpot": pytest.approx(8.24)}
    # A new lock: the setting in force has too few of its own requests; the unlocked ones are kept for their own.
    planner.observe([(100.0, 5.0)] * 5, 1530, 64)
    assert planner.measured_tails(99) is None
    assert planner.measured_tails(99, None, 64) is not None
    planner.observe([(100.0, 6.0)] * MEASURED_MIN_REQUESTS, 1530, 32)
    assert planner.measured_tails(99) == {"ttft": 100.0, "tpot": 6.0}
    assert planner.measured_tails(99, 1530, 64) is None


def test_measured_tails_are_forgotten_after_the_memory() -> None:
    planner, slo = _planner_and_slo()
    planner.observe([(100.0, 5.0)] * MEASURED_MIN_REQUESTS, None, 64)
    assert planner.measured_tails(99) is not None
    # Ticks advance the planner's clock; a window with no requests drops those older than the memory.
    _locks(planner, slo, _setting(100.0), ticks=int(MEASURED_MEMORY_S / 0.5) + 2)
    planner.observe([], None, 64)
    assert planner.measured_tails(99, None, 64) is None
