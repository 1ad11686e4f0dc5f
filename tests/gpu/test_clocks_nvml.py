"""Locked SM clocks: the fake libnvidia-ml.so.1 against nvml.h's C signatures and pynvml, and NvmlDevice's
clock calls (typed errors through the one NVML error table, read-back of the clock in force)."""

from __future__ import annotations

import ctypes

import pynvml
import pytest
from fake_nvml import FakeNvmlEnv, FakeNvmlState
from fake_nvml.state import (
    CLOCK_EVENT_APPLICATIONS_CLOCKS,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
)
from test_fake_nvml import nvml  # noqa: F401  (fixture: pynvml on the fake, shut down afterwards)

from pals_daemon.errors import GpuInvalidArgumentError, GpuNotSupportedError, GpuPermissionError
from pals_daemon.gpu.nvml import NvmlBackend, NvmlDevice

# nvmlReturn_t NVML_ERROR_INSUFFICIENT_SIZE (nvml.h).
NVML_ERROR_INSUFFICIENT_SIZE = 7
# H100-SXM5 profile of the fake (tests/fake_nvml/state.py): 1980 down to 345 MHz in 15 MHz steps at 2619 MHz.
H100_CLOCKS = tuple(range(1980, 344, -15))


def open_one(fake: FakeNvmlEnv, state: FakeNvmlState) -> list[NvmlDevice]:
    fake.write_state(state)
    return NvmlBackend().open()  # type: ignore[return-value]


def test_c_signatures_of_the_clock_calls(fake_pynvml: FakeNvmlEnv) -> None:
    # nvml.h, called directly: the list protocol (count first, INSUFFICIENT_SIZE), unsigned-int clocks.
    fake_pynvml.write_state(FakeNvmlState.of("H100-SXM5"))
    lib = ctypes.CDLL(str(fake_pynvml.lib_path))
    assert lib.nvmlInitWithFlags(ctypes.c_uint(0)) == 0
    try:
        handle = ctypes.c_void_p()
        assert lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(0), ctypes.byref(handle)) == 0
        count = ctypes.c_uint(0)
        assert lib.nvmlDeviceGetSupportedMemoryClocks(handle, ctypes.byref(count), None) == NVML_ERROR_INSUFFICIENT_SIZE
        assert count.value == 1
        mem = (ctypes.c_uint * 1)()
        assert lib.nvmlDeviceGetSupportedMemoryClocks(handle, ctypes.byref(count), mem) == 0
        assert mem[0] == 2619
        count = ctypes.c_uint(3)
        small = (ctypes.c_uint * 3)()
        rc = lib.nvmlDeviceGetSupportedGraphicsClocks(handle, ctypes.c_uint(2619), ctypes.byref(count), small)
        assert rc == NVML_ERROR_INSUFFICIENT_SIZE and count.value == len(H100_CLOCKS)
        assert lib.nvmlDeviceGetSupportedGraphicsClocks(
            handle, ctypes.c_uint(1000), ctypes.byref(count), small
        ) == NVML_ERROR_NOT_FOUND
        assert lib.nvmlDeviceSetGpuLockedClocks(handle, ctypes.c_uint(345), ctypes.c_uint(1500)) == 0
        clock = ctypes.c_uint()
        assert lib.nvmlDeviceGetClockInfo(handle, ctypes.c_int(1), ctypes.byref(clock)) == 0
        assert clock.value == 1500
        assert lib.nvmlDeviceResetGpuLockedClocks(handle) == 0
        assert lib.nvmlDeviceGetClockInfo(handle, ctypes.c_int(1), ctypes.byref(clock)) == 0
        assert clock.value == 1980
    finally:
        assert lib.nvmlShutdown() == 0
    assert fake_pynvml.clock_calls() == [
        ("nvmlDeviceSetGpuLockedClocks", 0, (345, 1500), 0),
        ("nvmlDeviceResetGpuLockedClocks", 0, (), 0),
    ]


def test_pynvml_clock_calls_and_range_checks(nvml: FakeNvmlEnv) -> None:  # noqa: F811
    nvml.write_state(FakeNvmlState.of("H100-SXM5"))
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetSupportedMemoryClocks(h) == [2619]
    assert tuple(pynvml.nvmlDeviceGetSupportedGraphicsClocks(h, 2619)) == H100_CLOCKS
    assert pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM) == 1980
    assert pynvml.nvmlDeviceGetClock(h, pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_ID_CUSTOMER_BOOST_MAX) == 1980
    for low, high in ((1500, 1400), (300, 1500), (345, 1995)):
        with pytest.raises(pynvml.NVMLError) as info:
            pynvml.nvmlDeviceSetGpuLockedClocks(h, low, high)
        assert info.value.value == NVML_ERROR_INVALID_ARGUMENT
    pynvml.nvmlDeviceSetGpuLockedClocks(h, 345, 1200)
    assert pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) == 1200
    # The lock holds the clock down: the applications-clocks-setting reason shows it.
    assert pynvml.nvmlDeviceGetCurrentClocksEventReasons(h) & CLOCK_EVENT_APPLICATIONS_CLOCKS
    assert [rc for *_, rc in nvml.clock_calls()] == [2, 2, 2, 0]
    assert nvml.read_state().gpus[0].locked_max_mhz == 1200


def test_non_root_cannot_lock_or_reset(nvml: FakeNvmlEnv) -> None:  # noqa: F811
    state = FakeNvmlState.of("H100-SXM5")
    state.nonroot = True
    state.gpus[0].locked_min_mhz, state.gpus[0].locked_max_mhz = 345, 1500  # an operator's lock
    nvml.write_state(state)
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    for call, args in ((pynvml.nvmlDeviceSetGpuLockedClocks, (345, 1000)), (pynvml.nvmlDeviceResetGpuLockedClocks, ())):
        with pytest.raises(pynvml.NVMLError) as info:
            call(h, *args)
        assert info.value.value == NVML_ERROR_NO_PERMISSION
    assert nvml.read_state().gpus[0].locked_max_mhz == 1500


def test_state_round_trips_clock_fields() -> None:
    state = FakeNvmlState.of("A100-SXM4", "H100-SXM5")
    state.gpus[1].locked_min_mhz, state.gpus[1].locked_max_mhz = 345, 1500
    state.gpus[0].app_clock_mhz = 1275
    assert FakeNvmlState.from_text(state.to_text()) == state


def test_backend_reads_supported_and_application_clocks(fake_pynvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("H100-SXM5", "A100-SXM4")
    state.gpus[1].app_clock_mhz = 1275
    h100, a100 = open_one(fake_pynvml, state)
    info = h100.clock_info()
    assert info.supported_sm_clocks_mhz == H100_CLOCKS
    assert (info.min_mhz, info.max_mhz, info.app_clock_mhz, info.default_app_clock_mhz) == (345, 1980, 1980, 1980)
    assert info.snap_down(1500) == 1500 and info.snap_down(1507) == 1500 and info.snap_down(100) == 345
    a = a100.clock_info()
    assert (a.min_mhz, a.max_mhz, a.app_clock_mhz, a.default_app_clock_mhz) == (210, 1410, 1275, 1410)


def test_backend_locks_reads_back_and_resets(fake_pynvml: FakeNvmlEnv) -> None:
    (gpu,) = open_one(fake_pynvml, FakeNvmlState.of("H100-SXM5"))
    assert gpu.set_locked_clocks_mhz(345, 1410) == 1410
    assert gpu.read().sm_clock_mhz == 1410
    assert gpu.reset_locked_clocks() == 1980
    assert fake_pynvml.read_state().gpus[0].locked_max_mhz is None


@pytest.mark.parametrize("low,high", [(345, 2000), (300, 1000), (1500, 1000), (True, 1000), (345, 1000.0), (0, 0)])
def test_backend_refuses_bad_ranges_before_calling_nvml(fake_pynvml: FakeNvmlEnv, low: object, high: object) -> None:
    (gpu,) = open_one(fake_pynvml, FakeNvmlState.of("H100-SXM5"))
    with pytest.raises(GpuInvalidArgumentError):
        gpu.set_locked_clocks_mhz(low, high)  # type: ignore[arg-type]
    assert fake_pynvml.clock_calls() == []


def test_driver_errors_are_typed(fake_pynvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("H100-SXM5", "H100-SXM5")
    state.inject("nvmlDeviceSetGpuLockedClocks", NVML_ERROR_NOT_SUPPORTED, gpu=0)
    state.nonroot = True
    g0, g1 = open_one(fake_pynvml, state)
    with pytest.raises(GpuNotSupportedError) as unsupported:
        g0.set_locked_clocks_mhz(345, 1500)
    assert unsupported.value.gpu_index == 0
    with pytest.raises(GpuPermissionError):
        g1.set_locked_clocks_mhz(345, 1500)
    with pytest.raises(GpuPermissionError):
        g1.reset_locked_clocks()
    assert [(fn, i, rc) for fn, i, _, rc in fake_pynvml.clock_calls()] == [
        ("nvmlDeviceSetGpuLockedClocks", 0, NVML_ERROR_NOT_SUPPORTED),
        ("nvmlDeviceSetGpuLockedClocks", 1, NVML_ERROR_NO_PERMISSION),
        ("nvmlDeviceResetGpuLockedClocks", 1, NVML_ERROR_NO_PERMISSION),
    ]


def test_a_gpu_listing_no_clocks_is_not_supported(fake_pynvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("H100-SXM5")
    state.gpus[0].max_sm_clock_mhz = 0  # an older GPU/driver: no clocks listed, locks refused
    (gpu,) = open_one(fake_pynvml, state)
    with pytest.raises(GpuNotSupportedError):
        gpu.clock_info()
    with pytest.raises(GpuNotSupportedError):
        gpu.reset_locked_clocks()
