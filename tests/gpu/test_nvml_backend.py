"""NvmlBackend through pynvml's real ctypes path, against the fake libnvidia-ml.so.1 (tests/fake_nvml)."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import textwrap
from pathlib import Path

import pynvml
import pytest
from fake_nvml import FakeNvmlEnv, FakeNvmlState, make_gpu
from fake_nvml.state import (
    CLOCK_EVENT_SW_POWER_CAP,
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_FUNCTION_NOT_FOUND,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_TIMEOUT,
    fake_uuid,
)

from pals_daemon.errors import (
    GpuError,
    GpuFatalError,
    GpuInvalidArgumentError,
    GpuLibraryError,
    GpuLostError,
    GpuNotSupportedError,
    GpuPermissionError,
    GpuResetRequiredError,
    GpuTransientError,
)
from pals_daemon.gpu.backend import PowerConstraints
from pals_daemon.gpu.nvml import NvmlBackend, NvmlDevice

REPO_ROOT = Path(__file__).resolve().parents[2]


def open_backend(fake: FakeNvmlEnv, state: FakeNvmlState, **kwargs: object) -> list[NvmlDevice]:
    """Write ``state`` and open a backend on it (closed by the fixture's reset)."""
    fake.write_state(state)
    devices = NvmlBackend(**kwargs).open()  # type: ignore[arg-type]
    assert all(isinstance(d, NvmlDevice) for d in devices)
    return devices  # type: ignore[return-value]


def test_discovers_every_gpu_with_uuid_and_name(fake_pynvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("H100-SXM5", "A100-SXM4", "H100-SXM5", "A100-SXM4")
    state.gpus[2].name = "NVIDIA H800"
    devices = open_backend(fake_pynvml, state)
    assert [d.identity.index for d in devices] == [0, 1, 2, 3]
    assert [d.identity.uuid for d in devices] == [fake_uuid(i) for i in range(4)]
    assert [d.identity.name for d in devices] == [
        "NVIDIA H100 80GB HBM3",
        "NVIDIA A100-SXM4-80GB",
        "NVIDIA H800",
        "NVIDIA A100-SXM4-80GB",
    ]
    assert all(isinstance(d.identity.uuid, str) and isinstance(d.identity.name, str) for d in devices)


def test_gpu_indices_restrict_and_order(fake_pynvml: FakeNvmlEnv) -> None:
    devices = open_backend(fake_pynvml, FakeNvmlState.of(*["H100-SXM5"] * 4), gpu_indices=[3, 1])
    assert [(d.identity.index, d.identity.uuid) for d in devices] == [(1, fake_uuid(1)), (3, fake_uuid(3))]


@pytest.mark.parametrize("indices", [[0, 2], [-1], [0, 0]])
def test_bad_gpu_index_is_refused_and_nvml_shut_down(fake_pynvml: FakeNvmlEnv, indices: list[int]) -> None:
    fake_pynvml.write_state(FakeNvmlState.of("H100-SXM5", "H100-SXM5"))
    backend = NvmlBackend(gpu_indices=indices)
    with pytest.raises(GpuInvalidArgumentError) as info:
        backend.open()
    assert info.value.gpu_index == indices[-1]
    # The failed open left no NVML session behind.
    assert [e.function for e in fake_pynvml.log()] == ["nvmlInitWithFlags", "nvmlShutdown"]
    backend.close()  # nothing open: no second shutdown
    assert len(fake_pynvml.log()) == 2


def test_constraints_per_profile(fake_pynvml: FakeNvmlEnv) -> None:
    h100, a100 = open_backend(fake_pynvml, FakeNvmlState.of("H100-SXM5", "A100-SXM4"))
    # data/gpu_power_limits.csv: H100-SXM5-80GB 200-700 W default 700; A100-SXM4-80GB 100-400 W default 400.
    assert h100.constraints() == PowerConstraints(200_000, 700_000, 700_000)
    assert a100.constraints() == PowerConstraints(100_000, 400_000, 400_000)


def test_read_with_instant_power(fake_pynvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("A100-SXM4")
    state.gpus[0] = make_gpu(
        "A100-SXM4",
        0,
        power_mw=260_000,
        instant_power_mw=271_500,
        energy_mj=5_000_000,
        energy_step_mj=250,
        sm_clock_mhz=1305,
        clock_event_reasons=0x1,
    )
    (gpu,) = open_backend(fake_pynvml, state)
    first = gpu.read()
    assert first.power_avg_mw == 260_000
    assert first.power_instant_mw == 271_500
    assert first.energy_mj == 5_000_000
    assert first.enforced_limit_mw == first.requested_limit_mw == 400_000
    assert first.sm_clock_mhz == 1305
    assert first.clock_event_reasons == 0x1
    assert not first.power_capped
    # Energy is cumulative: the next read sees the fake's counter advanced.
    assert gpu.read().energy_mj == 5_000_250


def test_read_without_instant_power(fake_pynvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("H100-SXM5", "H100-SXM5")
    state.gpus[1].instant_power_mw = None
    first, second = open_backend(fake_pynvml, state)
    assert first.read().power_instant_mw == 360_000
    reading = second.read()
    assert reading.power_instant_mw is None
    assert reading.power_avg_mw == 350_000


def test_read_shows_the_cap_binding(fake_pynvml: FakeNvmlEnv) -> None:
    (gpu,) = open_backend(fake_pynvml, FakeNvmlState.of("H100-SXM5"))
    assert gpu.set_power_limit_mw(300_000) == 300_000
    reading = gpu.read()
    # The fake clips its 350 W draw to the 300 W cap and reports the SW power cap reason.
    assert reading.power_avg_mw == 300_000
    assert reading.clock_event_reasons & CLOCK_EVENT_SW_POWER_CAP
    assert reading.power_capped


def test_set_within_range_returns_enforced_and_reaches_driver(fake_pynvml: FakeNvmlEnv) -> None:
    gpu0, gpu1 = open_backend(fake_pynvml, FakeNvmlState.of("H100-SXM5", "H100-SXM5"))
    assert gpu1.set_power_limit_mw(250_000) == 250_000
    assert gpu1.set_power_limit_mw(200_000) == 200_000  # inclusive minimum
    assert gpu0.set_power_limit_mw(700_000) == 700_000  # inclusive maximum
    assert fake_pynvml.set_limit_calls() == [(1, 250_000, 0), (1, 200_000, 0), (0, 700_000, 0)]
    assert [g.limit_mw for g in fake_pynvml.read_state().gpus] == [700_000, 200_000]
    assert gpu1.read().requested_limit_mw == 200_000


def test_set_returns_lower_external_cap(fake_pynvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("H100-SXM5")
    state.gpus[0].external_limit_mw = 300_000  # e.g. another tool's cap
    (gpu,) = open_backend(fake_pynvml, state)
    assert gpu.set_power_limit_mw(500_000) == 300_000
    reading = gpu.read()
    assert (reading.requested_limit_mw, reading.enforced_limit_mw) == (500_000, 300_000)


@pytest.mark.parametrize("limit", [199_999, 700_001, 0, -1, 250_000.0, True, "250000", None])
def test_bad_limit_refused_before_the_driver(fake_pynvml: FakeNvmlEnv, limit: object) -> None:
    (gpu,) = open_backend(fake_pynvml, FakeNvmlState.of("H100-SXM5"))
    with pytest.raises(GpuInvalidArgumentError) as info:
        gpu.set_power_limit_mw(limit)  # type: ignore[arg-type]
    assert info.value.gpu_index == 0
    assert fake_pynvml.set_limit_calls() == []
    assert fake_pynvml.read_state().gpus[0].limit_mw == 700_000


def test_driver_invalid_argument_is_typed(fake_pynvml: FakeNvmlEnv) -> None:
    (gpu,) = open_backend(fake_pynvml, FakeNvmlState.of("H100-SXM5"))
    gpu.constraints()
    # The driver's range shrank after the constraints were cached: the driver refuses, the error is typed.
    state = fake_pynvml.read_state()
    state.gpus[0].min_mw = 400_000
    fake_pynvml.write_state(state)
    with pytest.raises(GpuInvalidArgumentError) as info:
        gpu.set_power_limit_mw(300_000)
    assert info.value.gpu_index == 0
    assert fake_pynvml.set_limit_calls() == [(0, 300_000, 2)]


def test_non_root_set_is_permission_error(fake_pynvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("H100-SXM5", "H100-SXM5")
    state.nonroot = True
    _, gpu1 = open_backend(fake_pynvml, state)
    gpu1.read()  # reads need no privilege
    with pytest.raises(GpuPermissionError) as info:
        gpu1.set_power_limit_mw(300_000)
    assert isinstance(info.value, GpuFatalError)
    assert info.value.gpu_index == 1
    assert not isinstance(info.value, pynvml.NVMLError)
    assert isinstance(info.value.__cause__, pynvml.NVMLError)
    assert fake_pynvml.set_limit_calls() == [(1, 300_000, NVML_ERROR_NO_PERMISSION)]


def test_lost_gpu_fails_alone(fake_pynvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("H100-SXM5", "H100-SXM5", "H100-SXM5")
    state.inject("nvmlDeviceGetPowerUsage", NVML_ERROR_GPU_IS_LOST, gpu=1)
    gpu0, gpu1, gpu2 = open_backend(fake_pynvml, state)
    with pytest.raises(GpuLostError) as info:
        gpu1.read()
    assert info.value.gpu_index == 1
    assert "GPU 1" in str(info.value)
    # The other GPUs still read and set.
    assert gpu0.read().power_avg_mw == 350_000
    assert gpu2.set_power_limit_mw(400_000) == 400_000
    with pytest.raises(GpuLostError):
        gpu1.read()  # the fault persists


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (pynvml.NVML_ERROR_UNINITIALIZED, GpuLibraryError),
        (pynvml.NVML_ERROR_INVALID_ARGUMENT, GpuInvalidArgumentError),
        (pynvml.NVML_ERROR_NOT_SUPPORTED, GpuNotSupportedError),
        (pynvml.NVML_ERROR_NO_PERMISSION, GpuPermissionError),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, GpuLibraryError),
        (pynvml.NVML_ERROR_TIMEOUT, GpuTransientError),
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, GpuLibraryError),
        (pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, GpuLibraryError),
        (pynvml.NVML_ERROR_GPU_IS_LOST, GpuLostError),
        (pynvml.NVML_ERROR_RESET_REQUIRED, GpuResetRequiredError),
        (pynvml.NVML_ERROR_IN_USE, GpuTransientError),
        (pynvml.NVML_ERROR_UNKNOWN, GpuTransientError),
        (12345, GpuTransientError),  # a code newer than this pynvml
    ],
)
def test_error_table(fake_pynvml: FakeNvmlEnv, code: int, expected: type[GpuError]) -> None:
    state = FakeNvmlState.of("A100-SXM4", "A100-SXM4")
    state.inject("nvmlDeviceGetEnforcedPowerLimit", code, gpu=1)
    gpu0, gpu1 = open_backend(fake_pynvml, state)
    with pytest.raises(GpuError) as info:
        gpu1.read()
    assert type(info.value) is expected
    assert info.value.gpu_index == 1
    assert gpu0.read().enforced_limit_mw == 400_000


def test_transient_fault_clears(fake_pynvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("H100-SXM5")
    state.inject("nvmlDeviceGetClockInfo", NVML_ERROR_TIMEOUT, gpu=0, times=1)
    (gpu,) = open_backend(fake_pynvml, state)
    with pytest.raises(GpuTransientError):
        gpu.read()
    assert gpu.read().sm_clock_mhz == 1980


def test_clock_reasons_fall_back_to_throttle_reasons(fake_pynvml: FakeNvmlEnv) -> None:
    # An older driver lacks nvmlDeviceGetCurrentClocksEventReasons.
    state = FakeNvmlState.of("H100-SXM5")
    state.gpus[0].clock_event_reasons = 0x20
    state.inject("nvmlDeviceGetCurrentClocksEventReasons", NVML_ERROR_FUNCTION_NOT_FOUND, gpu=0)
    (gpu,) = open_backend(fake_pynvml, state)
    assert gpu.read().clock_event_reasons == 0x20


def test_library_missing_is_library_error(fake_pynvml: FakeNvmlEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    # pynvml loads libnvidia-ml.so.1 only while nvmlLib is None.
    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(pynvml, "CDLL", no_library)
    with pytest.raises(GpuLibraryError) as info:
        NvmlBackend().open()
    assert info.value.gpu_index is None
    assert "LIBRARY_NOT_FOUND" in str(info.value)


def test_init_failure_is_library_error(fake_pynvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("H100-SXM5")
    state.inject("nvmlInitWithFlags", NVML_ERROR_DRIVER_NOT_LOADED)
    fake_pynvml.write_state(state)
    backend = NvmlBackend()
    with pytest.raises(GpuLibraryError, match="DRIVER_NOT_LOADED"):
        backend.open()
    backend.close()
    assert [e.function for e in fake_pynvml.log()] == ["nvmlInitWithFlags"]


def test_close_is_idempotent_and_devices_stop(fake_pynvml: FakeNvmlEnv) -> None:
    fake_pynvml.write_state(FakeNvmlState.of("H100-SXM5"))
    backend = NvmlBackend()
    backend.close()  # before open: nothing to do
    (gpu,) = backend.open()
    assert backend.open() == [gpu]  # open while open: same devices, no second init
    backend.close()
    backend.close()
    assert [e.function for e in fake_pynvml.log()] == ["nvmlInitWithFlags", "nvmlShutdown"]
    with pytest.raises(GpuLibraryError, match="UNINITIALIZED"):
        gpu.read()
    # Reopening works and gives fresh devices.
    (again,) = backend.open()
    assert again is not gpu
    assert again.read().enforced_limit_mw == 700_000
    backend.close()


def test_state_is_shared_with_a_subprocess(fake_nvml_env: FakeNvmlEnv) -> None:
    # The subprocess loads the fake by soname through LD_LIBRARY_PATH, as a daemon under test would.
    fake_nvml_env.write_state(FakeNvmlState.of("A100-SXM4", "A100-SXM4"))
    script = textwrap.dedent(
        """
        from pals_daemon.gpu.nvml import NvmlBackend
        backend = NvmlBackend(gpu_indices=[1])
        (gpu,) = backend.open()
        print(gpu.identity.uuid, gpu.set_power_limit_mw(150_000))
        backend.close()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**fake_nvml_env.env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [fake_uuid(1), "150000"]
    assert [g.limit_mw for g in fake_nvml_env.read_state().gpus] == [400_000, 150_000]
    assert fake_nvml_env.set_limit_calls() == [(1, 150_000, 0)]


def test_fake_fails_loudly_on_unknown_state(fake_pynvml: FakeNvmlEnv, capfd: pytest.CaptureFixture[str]) -> None:
    fake_pynvml.state_path.write_text(FakeNvmlState.of("H100-SXM5").to_text() + "gpu 0 tdp_mw 700000\n")
    with pytest.raises(GpuError):
        NvmlBackend().open()
    assert "unknown GPU key 'tdp_mw'" in capfd.readouterr().err


def test_one_thread_per_gpu_is_safe(fake_pynvml: FakeNvmlEnv) -> None:
    # The daemon drives each GPU from its own worker thread; the fake serialises them like one driver.
    devices = open_backend(fake_pynvml, FakeNvmlState.of(*["H100-SXM5"] * 4))

    def drive(gpu: NvmlDevice) -> int:
        enforced = 0
        for step in range(25):
            enforced = gpu.set_power_limit_mw(200_000 + 1_000 * (gpu.identity.index * 25 + step))
            gpu.read()
        return enforced

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(drive, devices))
    assert results == [224_000, 249_000, 274_000, 299_000]
    assert [g.limit_mw for g in fake_pynvml.read_state().gpus] == results
    assert len(fake_pynvml.set_limit_calls()) == 100
