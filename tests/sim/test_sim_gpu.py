"""SimGpu / SimBackend: energy, averaging, cap delay, clamping, validation, faults."""

from __future__ import annotations

import random

import pytest

from pals_daemon.errors import GpuInvalidArgumentError, GpuLostError, GpuTransientError
from pals_daemon.gpu.backend import CLOCK_EVENT_SW_POWER_CAP
from pals_daemon.sim.gpu import CLOCK_EVENT_GPU_IDLE, SimBackend, SimGpu, make_sim_gpus, sim_uuid
from pals_daemon.sim.hardware import A100_SXM4, H100_SXM5, hardware_profile, known_hardware


class FakeClock:
    """A settable simulated clock."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _gpu(delay: float = 0.2) -> tuple[SimGpu, FakeClock]:
    clock = FakeClock()
    return make_sim_gpus("A100-SXM4", 1, clock, cap_delay_s=delay)[0], clock


def test_hardware_profiles_from_csv() -> None:
    a = hardware_profile("a100-sxm4")
    assert (a.min_limit_w, a.max_limit_w, a.default_limit_w) == (100, 400, 400)
    assert a.idle_power_w == 60.0  # midpoint of 52-68 W
    assert hardware_profile("H100-SXM5-80GB") is H100_SXM5
    assert (H100_SXM5.min_limit_w, H100_SXM5.max_limit_w, H100_SXM5.idle_power_w) == (200, 700, 73.5)
    with pytest.raises(ValueError, match="A100-SXM4.*H100-SXM5"):
        hardware_profile("V100")
    assert known_hardware() == ["A100-SXM4", "H100-SXM5", "H200-SXM"]


def test_make_sim_gpus_identities_and_backend() -> None:
    clock = FakeClock()
    gpus = make_sim_gpus("H100-SXM5", 3, clock)
    assert [g.identity.index for g in gpus] == [0, 1, 2]
    assert gpus[2].identity.uuid == "GPU-sim-00000002-0000-0000-0000-000000000000" == sim_uuid(2)
    assert len({g.identity.uuid for g in gpus}) == 3
    assert gpus[0].identity.name == "NVIDIA H100 80GB HBM3"
    c = gpus[0].constraints()
    assert (c.min_limit_mw, c.max_limit_mw, c.default_limit_mw) == (200_000, 700_000, 700_000)
    backend = SimBackend(reversed(gpus))
    assert backend.name == "sim"
    assert [g.identity.index for g in backend.open()] == [0, 1, 2]
    backend.close()
    backend.close()
    with pytest.raises(GpuLostError):
        SimBackend(gpus, open_error=GpuLostError("gone")).open()


def test_idle_reading() -> None:
    gpu, clock = _gpu()
    clock.t = 10.0
    r = gpu.read()
    assert r.power_instant_mw == r.power_avg_mw == 60_000
    assert r.energy_mj == 600_000
    assert r.enforced_limit_mw == r.requested_limit_mw == 400_000
    assert r.sm_clock_mhz == A100_SXM4.max_sm_clock_mhz
    assert r.clock_event_reasons == CLOCK_EVENT_GPU_IDLE and not r.power_capped


def test_energy_counter_is_monotonic_and_the_integral_of_power() -> None:
    gpu, clock = _gpu()
    rng = random.Random(1)
    t = 0.0
    segments = []
    for _ in range(300):
        t += rng.uniform(0.0, 0.3)  # idle gap (may be zero)
        dur = rng.uniform(0.001, 0.4)
        p = rng.uniform(80.0, 390.0)
        gpu.record_activity(t, t + dur, p, 1200, p)
        segments.append((t, t + dur, p))
        t += dur
    end = t

    def integral(upto: float) -> float:
        e, cursor = 0.0, 0.0
        for a, b, p in segments:
            if a >= upto:
                break
            e += 60.0 * (a - cursor) + p * (min(b, upto) - a)
            cursor = min(b, upto)
        return e + 60.0 * max(0.0, upto - cursor)

    last = -1
    now = 0.0
    while now < end + 2:
        now += rng.uniform(0.01, 0.5)
        clock.t = now
        r = gpu.read()
        assert r.energy_mj >= last
        last = r.energy_mj
        assert r.energy_mj == pytest.approx(integral(now) * 1000, abs=2)
    assert gpu.energy_j(clock.t) == pytest.approx(integral(clock.t), rel=1e-9)


def test_power_average_lags_instant_after_step() -> None:
    gpu, clock = _gpu()
    gpu.record_activity(10.0, 20.0, 300.0, 1410, 300.0)
    clock.t = 10.25
    r = gpu.read()
    assert r.power_instant_mw == 300_000
    assert r.power_avg_mw == pytest.approx(0.75 * 60_000 + 0.25 * 300_000, abs=1)
    clock.t = 11.0
    assert gpu.read().power_avg_mw == pytest.approx(300_000, abs=1)
    clock.t = 20.5  # back to idle: the average still remembers the busy half second
    r = gpu.read()
    assert r.power_instant_mw == 60_000
    assert r.power_avg_mw == pytest.approx(180_000, abs=1)


def test_cap_takes_effect_after_delay_and_clamps_power() -> None:
    gpu, clock = _gpu(delay=0.25)
    clock.t = 5.0
    assert gpu.set_power_limit_mw(200_000) == 200_000  # the register reads back at once
    assert gpu.calls == [("set_power_limit_mw", 200_000)]
    assert gpu.effective_limit_w(5.2) == 400.0
    assert gpu.effective_limit_w(5.25) == 200.0
    assert gpu.next_limit_change_s(5.0) == pytest.approx(5.25)
    gpu.record_activity(5.0, 7.0, 350.0, 1410, 350.0)
    clock.t = 5.1
    r = gpu.read()
    assert r.power_instant_mw == 350_000 and not r.power_capped
    assert r.enforced_limit_mw == r.requested_limit_mw == 200_000
    clock.t = 7.0
    r = gpu.read()
    assert r.power_instant_mw == 200_000
    assert r.clock_event_reasons & CLOCK_EVENT_SW_POWER_CAP
    expected_j = 5.0 * 60 + 0.25 * 350 + 1.75 * 200
    assert r.energy_mj == pytest.approx(expected_j * 1000, abs=1)


def test_capped_power_never_exceeds_effective_cap() -> None:
    gpu, clock = _gpu(delay=0.1)
    rng = random.Random(7)
    t = 0.0
    for _ in range(200):
        clock.t = t
        if rng.random() < 0.3:
            gpu.set_power_limit_mw(rng.randrange(100_000, 400_001, 1000))
        dur = rng.uniform(0.01, 0.3)
        demand = rng.uniform(100, 420)
        gpu.record_activity(t, t + dur, demand, 1410, demand)
        probe = t + rng.uniform(0.0, dur)
        clock.t = probe
        r = gpu.read()
        limit_mw = gpu.effective_limit_w(probe - 1e-9) * 1000
        assert r.power_instant_mw <= limit_mw + 1
        assert r.power_capped == (demand * 1000 > limit_mw)
        t += dur


def test_demand_not_given_uses_clamping_for_the_cap_bit() -> None:
    gpu, clock = _gpu(delay=0.0)
    gpu.set_power_limit_mw(150_000)
    gpu.record_activity(0.0, 1.0, 140.0, 1410)
    gpu.record_activity(1.0, 2.0, 180.0, 1410)
    clock.t = 0.5
    assert not gpu.read().power_capped
    clock.t = 1.5
    r = gpu.read()
    assert r.power_capped and r.power_instant_mw == 150_000


@pytest.mark.parametrize("bad", [99_999, 400_001, -1, 250_000.0, True, "300000", None])
def test_invalid_limit_is_refused_without_change(bad: object) -> None:
    gpu, clock = _gpu()
    with pytest.raises(GpuInvalidArgumentError) as info:
        gpu.set_power_limit_mw(bad)  # type: ignore[arg-type]
    assert info.value.gpu_index == 0
    assert gpu.calls == [("set_power_limit_mw", bad)]
    r = gpu.read()
    assert r.requested_limit_mw == r.enforced_limit_mw == 400_000
    assert gpu.next_limit_change_s(0.0) is None


def test_same_limit_twice_is_idempotent() -> None:
    gpu, clock = _gpu()
    gpu.set_power_limit_mw(300_000)
    clock.t = 1.0
    gpu.set_power_limit_mw(300_000)
    assert gpu.effective_limit_w(0.2) == 300.0
    assert gpu.next_limit_change_s(0.2) is None


def test_fault_injection_next_call_and_all_calls() -> None:
    gpu, clock = _gpu()
    gpu.inject_fault(GpuTransientError("busy", 0), times=1)
    with pytest.raises(GpuTransientError):
        gpu.read()
    gpu.read()  # the fault was for one call only
    lost = GpuLostError("fell off the bus", 0)
    gpu.inject_fault(lost, methods=["set_power_limit_mw"])
    gpu.read()
    for _ in range(3):
        with pytest.raises(GpuLostError):
            gpu.set_power_limit_mw(200_000)
    assert gpu.read().requested_limit_mw == 400_000
    assert len(gpu.calls) == 3
    gpu.inject_fault(None)
    assert gpu.set_power_limit_mw(200_000) == 200_000
    with pytest.raises(ValueError):
        gpu.inject_fault(lost, methods=["reset"])


def test_external_limit_is_enforced_when_lower() -> None:
    gpu, clock = _gpu(delay=0.0)
    gpu.set_power_limit_mw(300_000)
    gpu.set_external_limit_w(250)
    r = gpu.read()
    assert (r.requested_limit_mw, r.enforced_limit_mw) == (300_000, 250_000)
    assert gpu.effective_limit_w(0.0) == 250.0
    gpu.set_external_limit_w(None)
    assert gpu.read().enforced_limit_mw == 300_000


def test_attached_gpu_reads_up_to_engine_horizon() -> None:
    gpu, clock = _gpu()
    gpu.attach()
    gpu.record_activity(0.0, 5.0, 200.0, 1410, 200.0)
    gpu.set_horizon(2.0)
    clock.t = 3.0  # the engine has only simulated up to 2 s
    r = gpu.read()
    assert r.energy_mj == 400_000
    gpu.set_horizon(3.0)
    assert gpu.read().energy_mj == 600_000


def test_long_history_is_folded_without_changing_energy() -> None:
    gpu, clock = _gpu()
    t = 0.0
    for i in range(5000):
        p = 100.0 + (i % 7) * 10
        gpu.record_activity(t, t + 0.01, p, 1410, p)
        t += 0.02
        clock.t = t
    expected = sum((100.0 + (i % 7) * 10) * 0.01 + 60.0 * 0.01 for i in range(5000))
    assert gpu.read().energy_mj == pytest.approx(expected * 1000, abs=2)
    assert len(gpu._segments) < 600  # noqa: SLF001 - checks the bounded history
