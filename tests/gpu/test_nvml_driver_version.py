"""nvmlSystemGetDriverVersion: the NVML backend's driver_version() and the fake's model of it."""

from __future__ import annotations

import ctypes

import pytest
from fake_nvml import FakeNvmlEnv, FakeNvmlState
from fake_nvml.state import DEFAULT_DRIVER_VERSION, NVML_ERROR_GPU_IS_LOST

from pals_daemon.errors import GpuLibraryError, GpuLostError
from pals_daemon.gpu.nvml import NvmlBackend
from pals_daemon.sim.gpu import SIM_DRIVER_VERSION, SimBackend

# nvmlReturn_t NVML_ERROR_INSUFFICIENT_SIZE and NVML_SUCCESS (nvml.h).
NVML_ERROR_INSUFFICIENT_SIZE = 7


def test_default_and_configured_driver_version(fake_pynvml: FakeNvmlEnv) -> None:
    fake_pynvml.write_state(FakeNvmlState.of("A100-SXM4"))
    backend = NvmlBackend()
    backend.open()
    assert backend.driver_version() == DEFAULT_DRIVER_VERSION
    state = fake_pynvml.read_state()
    state.driver_version = "570.124.06"
    fake_pynvml.write_state(state)
    assert backend.driver_version() == "570.124.06"
    backend.close()
    # The fake rewrites its state file on a setter; the version survives that round trip.
    assert fake_pynvml.read_state().driver_version == "570.124.06"


def test_driver_version_needs_an_open_session(fake_pynvml: FakeNvmlEnv) -> None:
    fake_pynvml.write_state(FakeNvmlState.of("A100-SXM4"))
    with pytest.raises(GpuLibraryError, match="UNINITIALIZED"):
        NvmlBackend().driver_version()


def test_driver_version_fault_is_typed(fake_pynvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("A100-SXM4")
    state.inject("nvmlSystemGetDriverVersion", NVML_ERROR_GPU_IS_LOST)
    fake_pynvml.write_state(state)
    backend = NvmlBackend()
    backend.open()
    with pytest.raises(GpuLostError):
        backend.driver_version()
    backend.close()


def test_fake_reports_insufficient_size(fake_pynvml: FakeNvmlEnv) -> None:
    # The C signature from nvml.h, called directly: a buffer too short for the string and its NUL.
    fake_pynvml.write_state(FakeNvmlState.of("A100-SXM4"))
    lib = ctypes.CDLL(str(fake_pynvml.lib_path))
    assert lib.nvmlInitWithFlags(ctypes.c_uint(0)) == 0
    try:
        exact = len(DEFAULT_DRIVER_VERSION) + 1
        short = ctypes.create_string_buffer(exact - 1)
        assert lib.nvmlSystemGetDriverVersion(short, ctypes.c_uint(exact - 1)) == NVML_ERROR_INSUFFICIENT_SIZE
        fits = ctypes.create_string_buffer(exact)
        assert lib.nvmlSystemGetDriverVersion(fits, ctypes.c_uint(exact)) == 0
        assert fits.value.decode() == DEFAULT_DRIVER_VERSION
    finally:
        assert lib.nvmlShutdown() == 0


def test_state_text_round_trip_and_bad_version() -> None:
    state = FakeNvmlState.of("H100-SXM5")
    state.driver_version = "535.183.01"
    assert FakeNvmlState.from_text(state.to_text()).driver_version == "535.183.01"
    state.driver_version = "two words"
    with pytest.raises(ValueError, match="driver_version"):
        state.to_text()


def test_sim_backend_labels_its_driver_version() -> None:
    assert SimBackend([]).driver_version() == SIM_DRIVER_VERSION
    assert "sim" in SIM_DRIVER_VERSION
