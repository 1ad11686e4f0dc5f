"""The simulated truth under a locked SM clock: the clock in force is min(lock, the cap's clock), and step time
and power follow it at any load (issue 11, item 4)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pals_daemon.sim.engine import Request, SimEngine
from pals_daemon.sim.fitted import a100_physics
from pals_daemon.sim.gpu import make_sim_gpus
from pals_daemon.sim.h100 import load_h100_truth
from pals_daemon.sim.truth import load_a100_truth
from tests.sim.test_sim_gpu_clocks import ManualClock

H100_MODEL = ("Qwen/Qwen3-30B-A3B-Instruct-2507", 1)


def test_lock_lowers_power_and_lengthens_steps_where_the_cap_does_not_bind() -> None:
    truth = load_h100_truth(*H100_MODEL)
    free = truth.decode_step(700.0, 8)
    assert free.power_w_per_gpu < 600.0  # light load: the 700 W cap does not bind (clock at the top)
    assert free.sm_clock_mhz == pytest.approx(1980.0)
    locked = truth.decode_step(700.0, 8, locked_clock_mhz=1200)
    assert locked.sm_clock_mhz == pytest.approx(1200.0)
    assert locked.power_w_per_gpu < 0.85 * free.power_w_per_gpu
    assert locked.step_time_s > free.step_time_s
    # Decode is memory-bound: the step slows far less than the clock falls, so energy per token drops.
    assert locked.step_time_s < free.step_time_s * 1980 / 1200 * 0.8
    e_free = free.power_w_per_gpu * free.step_time_s
    e_locked = locked.power_w_per_gpu * locked.step_time_s
    assert e_locked < 0.9 * e_free


@pytest.mark.parametrize("cap_w", [200.0, 300.0, 450.0, 700.0])
@pytest.mark.parametrize("batch", [1, 8, 64, 256])
def test_a_lock_never_raises_power_nor_speeds_a_step(cap_w: float, batch: int) -> None:
    truth = load_h100_truth(*H100_MODEL)
    free = truth.decode_step(cap_w, batch)
    for lock in (345, 600, 1000, 1500, 1980, 2500):
        locked = truth.decode_step(cap_w, batch, locked_clock_mhz=lock)
        assert locked.power_w_per_gpu <= free.power_w_per_gpu + 1e-9
        assert locked.step_time_s >= free.step_time_s - 1e-12
        assert locked.sm_clock_mhz == pytest.approx(min(free.sm_clock_mhz, max(lock, 0.17 * 1980)), rel=1e-9)
        pre_free, pre_locked = truth.prefill_step(cap_w, 2048), truth.prefill_step(cap_w, 2048, lock)
        assert pre_locked.power_w_per_gpu <= pre_free.power_w_per_gpu + 1e-9
        assert pre_locked.time_s >= pre_free.time_s - 1e-12
        assert pre_locked.power_w_per_gpu <= cap_w + 1e-9


def test_lower_locks_draw_less_monotonically() -> None:
    truth = load_h100_truth(*H100_MODEL)
    locks = [345, 600, 900, 1200, 1500, 1800, 1980]
    powers = [truth.decode_step(700.0, 32, lk).power_w_per_gpu for lk in locks]
    times = [truth.decode_step(700.0, 32, lk).step_time_s for lk in locks]
    assert powers == sorted(powers) and times == sorted(times, reverse=True)


def test_unlocked_truth_is_unchanged() -> None:
    # A lock at or above the clock the cap leaves is the unlocked truth, exactly.
    for truth, caps in ((load_a100_truth("mixtral-8x7b-instruct"), (150.0, 250.0, 400.0)),
                        (load_h100_truth(*H100_MODEL), (250.0, 700.0))):  # fmt: skip
        top = truth.hardware.max_sm_clock_mhz
        for cap in caps:
            for b in (1, 16, 64):
                assert truth.decode_step(cap, b, top) == truth.decode_step(cap, b)
                assert truth.decode_step(cap, b, None) == truth.decode_step(cap, b)
                assert truth.prefill_step(cap, 512, top) == truth.prefill_step(cap, 512)
    # The A100 physics has no SM share of memory power: its energy is the pre-issue-11 formula to the bit.
    ph = a100_physics("mixtral-8x7b-instruct")
    assert ph is not None and ph.core_mem_share == 0.0
    t_mem, t_clk = ph.times_s(np.array([1.0, 32.0]))
    f = np.array([0.4, 0.9])
    old = ph.p_mem_w * t_mem + ph.p_sm_w * np.power(f, ph.alpha - 1.0) * t_clk
    assert np.array_equal(ph.dynamic_energy_j(t_mem, t_clk, f), old)
    # The SM share only matters below the top clock: at f = 1 the power is the same with or without it.
    shared = replace(ph, core_mem_share=0.5)
    assert np.allclose(shared.busy_power_w(t_mem, t_clk, 1.0), ph.busy_power_w(t_mem, t_clk, 1.0))
    assert np.all(shared.busy_power_w(t_mem, t_clk, 0.5) < ph.busy_power_w(t_mem, t_clk, 0.5))


def test_skewed_steps_follow_the_lock() -> None:
    truth = load_h100_truth("Qwen/Qwen3-30B-A3B-Instruct-2507", 2)
    share = (0.6, 0.4)
    free = truth.decode_step_skewed([700.0, 700.0], 16, share)
    locked = truth.decode_step_skewed([700.0, 700.0], 16, share, locked_clock_mhz=1000)
    assert locked.step_time_s > free.step_time_s
    assert all(lk < fr for lk, fr in zip(locked.power_w_per_gpu, free.power_w_per_gpu, strict=True))
    assert max(locked.sm_clock_mhz_per_gpu) == pytest.approx(1000.0)


def _serve(lock_mhz: int | None) -> tuple[float, float, float]:
    """(energy J per output token, mean TPOT s, busy s) of a light load on one simulated H100."""
    clock = ManualClock()
    truth = load_h100_truth(*H100_MODEL)
    gpus = make_sim_gpus("H100-SXM5", 1, clock, cap_delay_s=0.0)
    if lock_mhz is not None:
        gpus[0].set_locked_clocks_mhz(345, lock_mhz)
    reqs = [Request(0.5 * i, 200, 100) for i in range(40)]
    engine = SimEngine("e", truth, gpus, reqs, 64, 8192)
    t = 0.0
    while not engine.done and t < 600.0:
        t += 0.5
        clock.t = t
        engine.advance(t)
    assert engine.done
    end = max(f.finish_s for f in engine.totals.finished)
    tpot = [f.tpot_ms / 1000 for f in engine.totals.finished]
    return gpus[0].energy_j(end) / engine.totals.output_tokens, float(np.mean(tpot)), engine.totals.busy_s


def test_an_engine_on_a_locked_gpu_spends_less_energy_per_token_at_light_load() -> None:
    e_free, tpot_free, busy_free = _serve(None)
    e_locked, tpot_locked, busy_locked = _serve(1100)
    assert e_locked < 0.9 * e_free
    assert tpot_locked > tpot_free and busy_locked > busy_free
