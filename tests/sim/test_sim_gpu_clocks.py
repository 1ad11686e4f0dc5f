"""Locked clocks on the simulated GPU: NVML's checks, the clock in force = min(lock, clock the cap leaves),
the reason bit, fault injection and the call record."""

from __future__ import annotations

import pytest

from pals_daemon.errors import GpuInvalidArgumentError, GpuNotSupportedError
from pals_daemon.gpu.backend import CLOCK_EVENT_APPLICATIONS_CLOCKS_SETTING, CLOCK_EVENT_SW_POWER_CAP
from pals_daemon.sim.gpu import RESET_LOCKED_CLOCKS, SET_LOCKED_CLOCKS, make_sim_gpus


class ManualClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_supported_clocks_follow_the_profile() -> None:
    (h100,) = make_sim_gpus("H100-SXM5", 1, ManualClock())
    info = h100.clock_info()
    assert (info.max_mhz, info.min_mhz) == (1980, 345) and len(info.supported_sm_clocks_mhz) == 110
    (a100,) = make_sim_gpus("A100-SXM4", 1, ManualClock())
    assert (a100.clock_info().max_mhz, a100.clock_info().min_mhz) == (1410, 210)


def test_clock_in_force_is_the_lower_of_lock_and_cap_clock() -> None:
    clock = ManualClock()
    (gpu,) = make_sim_gpus("H100-SXM5", 1, clock, cap_delay_s=0.0)
    gpu.attach()
    # The cap leaves 1600 MHz (a binding cap), then the lock at 1200 MHz wins; unlocked, the cap's clock again.
    gpu.record_activity(0.0, 1.0, 300.0, 1600, demand_power_w=900.0)
    gpu.set_horizon(1.0)
    clock.t = 1.0
    assert gpu.read().sm_clock_mhz == 1600
    assert gpu.set_locked_clocks_mhz(345, 1200) == 1200
    assert gpu.locked_clock_max_mhz() == 1200
    reading = gpu.read()
    assert reading.sm_clock_mhz == 1200
    assert reading.clock_event_reasons & CLOCK_EVENT_APPLICATIONS_CLOCKS_SETTING
    assert reading.clock_event_reasons & CLOCK_EVENT_SW_POWER_CAP
    gpu.set_locked_clocks_mhz(345, 1800)  # above the cap's clock: the cap's clock stays in force
    assert gpu.read().sm_clock_mhz == 1600
    assert not gpu.read().clock_event_reasons & CLOCK_EVENT_APPLICATIONS_CLOCKS_SETTING
    gpu.reset_locked_clocks()
    assert gpu.locked_clock_max_mhz() is None
    assert gpu.calls == [(SET_LOCKED_CLOCKS, 1200), (SET_LOCKED_CLOCKS, 1800), (RESET_LOCKED_CLOCKS, 0)]


@pytest.mark.parametrize("low,high", [(300, 1200), (345, 2000), (1500, 1200), (True, 1200), (345, 1200.0)])
def test_bad_ranges_are_refused_and_change_nothing(low: object, high: object) -> None:
    (gpu,) = make_sim_gpus("H100-SXM5", 1, ManualClock())
    with pytest.raises(GpuInvalidArgumentError):
        gpu.set_locked_clocks_mhz(low, high)  # type: ignore[arg-type]
    assert gpu.locked_clock_max_mhz() is None


def test_fault_injection_on_the_clock_calls() -> None:
    (gpu,) = make_sim_gpus("H100-SXM5", 1, ManualClock())
    gpu.inject_fault(GpuNotSupportedError("no locks here", 0), methods=[SET_LOCKED_CLOCKS])
    with pytest.raises(GpuNotSupportedError):
        gpu.set_locked_clocks_mhz(345, 1200)
    assert gpu.reset_locked_clocks() == 1980  # only the named method fails
    with pytest.raises(ValueError):
        gpu.inject_fault(GpuNotSupportedError("x"), methods=["set_memory_clocks"])
