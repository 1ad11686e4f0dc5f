"""The fake libnvidia-ml.so.1 itself, called through raw pynvml (no backend checks in front): range and root
checks, slow calls, and that its state format round-trips. The backend tests rely on these behaviours."""

from __future__ import annotations

import concurrent.futures
import time

import pynvml
import pytest
from fake_nvml import FakeNvmlEnv, FakeNvmlState
from fake_nvml.state import NVML_ERROR_GPU_IS_LOST, NVML_ERROR_INVALID_ARGUMENT, NVML_ERROR_NO_PERMISSION

from pals_daemon.errors import GpuError
from pals_daemon.gpu.nvml import NvmlBackend

# A delay long enough to stand out from a normal fake call (well under 10 ms) on a loaded 2-core machine,
# short enough to keep the tests fast (chosen test value).
SLOW_MS = 400


@pytest.fixture
def nvml(fake_pynvml: FakeNvmlEnv):  # type: ignore[no-untyped-def]
    """pynvml initialised on the fake; shut down afterwards."""
    yield fake_pynvml
    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pass


def init(fake: FakeNvmlEnv, state: FakeNvmlState) -> list[object]:
    fake.write_state(state)
    pynvml.nvmlInit()
    return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(len(state.gpus))]


@pytest.mark.parametrize("profile,low_mw,high_mw", [("H100-SXM5", 200_000, 700_000), ("A100-SXM4", 100_000, 400_000)])
def test_set_limit_range_is_inclusive_and_checked_by_the_driver(
    nvml: FakeNvmlEnv, profile: str, low_mw: int, high_mw: int
) -> None:
    (handle,) = init(nvml, FakeNvmlState.of(profile))
    assert pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle) == [low_mw, high_mw]
    for bad in (low_mw - 1, high_mw + 1, 0):
        with pytest.raises(pynvml.NVMLError) as info:
            pynvml.nvmlDeviceSetPowerManagementLimit(handle, bad)
        assert info.value.value == NVML_ERROR_INVALID_ARGUMENT
    for good in (low_mw, high_mw):
        pynvml.nvmlDeviceSetPowerManagementLimit(handle, good)
        assert pynvml.nvmlDeviceGetPowerManagementLimit(handle) == good
    assert [rc for _, _, rc in nvml.set_limit_calls()] == [2, 2, 2, 0, 0]


def test_non_root_cannot_set_but_can_read(nvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("A100-SXM4")
    state.nonroot = True
    (handle,) = init(nvml, state)
    with pytest.raises(pynvml.NVMLError) as info:
        pynvml.nvmlDeviceSetPowerManagementLimit(handle, 200_000)
    assert info.value.value == NVML_ERROR_NO_PERMISSION
    assert pynvml.nvmlDeviceGetPowerManagementLimit(handle) == 400_000
    assert nvml.read_state().gpus[0].limit_mw == 400_000


def timed(fn, *args):  # type: ignore[no-untyped-def]
    started = time.monotonic()
    fn(*args)
    return time.monotonic() - started


def test_delay_per_gpu_slows_only_that_gpu_and_only_that_function(nvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("H100-SXM5", "H100-SXM5")
    state.slow("nvmlDeviceGetPowerUsage", SLOW_MS, gpu=1)
    h0, h1 = init(nvml, state)
    assert timed(pynvml.nvmlDeviceGetPowerUsage, h1) >= SLOW_MS / 1000
    assert timed(pynvml.nvmlDeviceGetPowerUsage, h0) < SLOW_MS / 1000
    assert timed(pynvml.nvmlDeviceGetEnforcedPowerLimit, h1) < SLOW_MS / 1000


def test_global_delay_applies_to_every_gpu_and_a_gpu_entry_overrides_it(nvml: FakeNvmlEnv) -> None:
    state = FakeNvmlState.of("H100-SXM5", "H100-SXM5")
    state.slow("nvmlDeviceSetPowerManagementLimit", SLOW_MS)
    state.slow("nvmlDeviceSetPowerManagementLimit", 0, gpu=0)
    h0, h1 = init(nvml, state)
    assert timed(pynvml.nvmlDeviceSetPowerManagementLimit, h1, 300_000) >= SLOW_MS / 1000
    assert timed(pynvml.nvmlDeviceSetPowerManagementLimit, h0, 300_000) < SLOW_MS / 1000
    # The slow set still happened, and the rewritten state file kept the delays.
    after = nvml.read_state()
    assert [g.limit_mw for g in after.gpus] == [300_000, 300_000]
    assert after.delays == {"nvmlDeviceSetPowerManagementLimit": SLOW_MS}
    assert after.gpus[0].delays == {"nvmlDeviceSetPowerManagementLimit": 0}


def test_a_hung_gpu_does_not_block_the_others(nvml: FakeNvmlEnv) -> None:
    # The sleep holds neither the process mutex nor the state flock: other GPUs' calls go on meanwhile.
    state = FakeNvmlState.of("H100-SXM5", "H100-SXM5")
    state.slow("nvmlDeviceGetPowerUsage", 3 * SLOW_MS, gpu=0)
    h0, h1 = init(nvml, state)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(pynvml.nvmlDeviceGetPowerUsage, h0)
        time.sleep(0.05)
        assert timed(pynvml.nvmlDeviceGetPowerUsage, h1) < SLOW_MS / 1000
        assert not slow.done()
        assert slow.result(timeout=10) == 350_000


def test_a_fault_injected_while_a_call_sleeps_is_seen_by_that_call(nvml: FakeNvmlEnv) -> None:
    # The state is re-read after the sleep: a GPU lost during a slow call reports the loss.
    state = FakeNvmlState.of("H100-SXM5")
    state.slow("nvmlDeviceGetPowerUsage", 3 * SLOW_MS)
    (h0,) = init(nvml, state)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(pynvml.nvmlDeviceGetPowerUsage, h0)
        time.sleep(0.05)
        lost = nvml.read_state()
        lost.inject("nvmlDeviceGetPowerUsage", NVML_ERROR_GPU_IS_LOST, gpu=0)
        nvml.write_state(lost)
        with pytest.raises(pynvml.NVMLError) as info:
            slow.result(timeout=10)
    assert info.value.value == NVML_ERROR_GPU_IS_LOST


@pytest.mark.parametrize(
    "line",
    ["delay nvmlDeviceGetPowerUsage -5", "delay nvmlDeviceGetPowrUsage 10", "gpu 3 delay nvmlDeviceGetPowerUsage 10"],
)
def test_bad_delay_lines_fail_loudly(fake_pynvml: FakeNvmlEnv, capfd: pytest.CaptureFixture[str], line: str) -> None:
    fake_pynvml.state_path.write_text(FakeNvmlState.of("H100-SXM5").to_text() + line + "\n")
    with pytest.raises(GpuError):
        NvmlBackend().open()
    assert "delay" in capfd.readouterr().err


def test_state_text_round_trips_delays_and_faults() -> None:
    state = FakeNvmlState.of("A100-SXM4", "H100-SXM5")
    state.slow("nvmlDeviceGetPowerUsage", 20)
    state.slow("nvmlDeviceSetPowerManagementLimit", 7000, gpu=1)
    state.inject("nvmlDeviceGetEnforcedPowerLimit", NVML_ERROR_GPU_IS_LOST, gpu=0, times=2)
    state.gpus[1].external_limit_mw = 300_000
    assert FakeNvmlState.from_text(state.to_text()) == state


WRITER = """
import sys, pynvml
pynvml.nvmlInit()
handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(2)]
print("ready", flush=True)
n = 0
while True:
    for h in handles:
        pynvml.nvmlDeviceSetPowerManagementLimit(h, 200_000 + (n % 100) * 1000)
    n += 1
"""


def test_state_file_survives_kill9_mid_write(fake_nvml_env: FakeNvmlEnv) -> None:
    # Every limit write rewrites the state file; a process killed at any moment must leave a whole file
    # (the old or the new), never an empty or torn one (issue 10 B8: truncate-then-write left it empty).
    import random
    import signal
    import subprocess
    import sys

    fake_nvml_env.write_state(FakeNvmlState.of("A100-SXM4", "A100-SXM4"))
    rng = random.Random(10)
    for _ in range(15):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER], env=fake_nvml_env.env, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        state = fake_nvml_env.read_state()  # parses: whole, not empty
        assert len(state.gpus) == 2
        assert all(100_000 <= g.limit_mw <= 400_000 for g in state.gpus)
