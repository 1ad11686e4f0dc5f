"""``pals-daemon restore`` (restore_originals) with clock records, through pynvml's real ctypes path against the
fake libnvidia-ml.so.1: limits first, then clocks; a refused reset keeps its record; an absent GPU's record is
kept and never applied elsewhere."""

from __future__ import annotations

from fake_nvml import FakeNvmlEnv, FakeNvmlState
from fake_nvml.state import NVML_ERROR_NO_PERMISSION, fake_uuid

from pals_daemon.gpu.nvml import NvmlBackend
from pals_daemon.restore import restore_originals
from pals_daemon.state import DaemonState, OriginalClock, OriginalLimit, StateStore


def crashed(fake: FakeNvmlEnv, store: StateStore) -> None:
    """Two H100s left capped at 300 W and locked at 1200 MHz by a run that was killed, and its records."""
    state = FakeNvmlState.of("H100-SXM5", "H100-SXM5")
    for g in state.gpus:
        g.limit_mw, g.locked_min_mhz, g.locked_max_mhz = 300_000, 345, 1200
    fake.write_state(state)
    saved = DaemonState()
    for i in (0, 1):
        saved = saved.with_original(fake_uuid(i), OriginalLimit(i, 700_000))
        saved = saved.with_original_clock(fake_uuid(i), OriginalClock(i))
    store.save(saved)


def test_restore_resets_clocks_and_limits(fake_pynvml: FakeNvmlEnv, tmp_path) -> None:
    store = StateStore(tmp_path / "state")
    crashed(fake_pynvml, store)
    assert restore_originals(NvmlBackend(), store) == []
    assert [(g.limit_mw, g.locked_max_mhz) for g in fake_pynvml.read_state().gpus] == [(700_000, None)] * 2
    assert store.load() == DaemonState()
    functions = [e.function for e in fake_pynvml.log() if e.function.startswith("nvmlDevice")]
    assert functions == ["nvmlDeviceSetPowerManagementLimit"] * 2 + ["nvmlDeviceResetGpuLockedClocks"] * 2


def test_a_refused_reset_keeps_its_record_for_the_next_try(fake_pynvml: FakeNvmlEnv, tmp_path) -> None:
    store = StateStore(tmp_path / "state")
    crashed(fake_pynvml, store)
    state = fake_pynvml.read_state()
    state.inject("nvmlDeviceResetGpuLockedClocks", NVML_ERROR_NO_PERMISSION, gpu=1, times=1)
    fake_pynvml.write_state(state)
    problems = restore_originals(NvmlBackend(), store)
    assert len(problems) == 1 and "NO_PERMISSION" in problems[0] and "record kept (locked_clock)" in problems[0]
    left = store.load()
    assert left.original_limits == {} and set(left.original_clocks) == {fake_uuid(1)}
    assert restore_originals(NvmlBackend(), store) == []
    assert store.load() == DaemonState()
    assert [g.locked_max_mhz for g in fake_pynvml.read_state().gpus] == [None, None]


def test_a_clock_record_of_an_absent_gpu_is_kept(fake_pynvml: FakeNvmlEnv, tmp_path) -> None:
    store = StateStore(tmp_path / "state")
    fake_pynvml.write_state(FakeNvmlState.of("H100-SXM5"))
    store.save(DaemonState().with_original_clock("GPU-gone", OriginalClock(3)))
    problems = restore_originals(NvmlBackend(), store)
    assert problems == ["GPU GPU-gone (index 3) not found; record kept (locked_clock)"]
    assert set(store.load().original_clocks) == {"GPU-gone"}
    assert not any(e.function == "nvmlDeviceResetGpuLockedClocks" for e in fake_pynvml.log())
