"""The locked-clock actuator in the daemon (this process), on fake H100s through pynvml's real ctypes path
(tests/fake_nvml): records before the first lock, read-back, reset on close, advise mode, cap-only fallback,
operators' clock settings left alone, the [clocks] switch. The controller's clock choice comes from
tests/server/clock_shim.py (the SLO-driven controller that will choose clocks is not built yet)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import async_helpers
import pytest
from clock_shim import lock_clocks
from fake_nvml import FakeNvmlEnv, FakeNvmlState
from fake_nvml.state import NVML_ERROR_GPU_IS_LOST, NVML_ERROR_NO_PERMISSION, NVML_ERROR_NOT_SUPPORTED, fake_uuid

from pals_daemon.clock import MonotonicClock
from pals_daemon.config import DaemonConfig
from pals_daemon.gpu.nvml import NvmlBackend
from pals_daemon.model.profile import load_profiles
from pals_daemon.server.daemon import Daemon, default_profiles_dir
from pals_daemon.state import DaemonState, OriginalClock, StateStore

PROFILES = load_profiles(default_profiles_dir())
TEST_TIMEOUT_S = 30.0
LOCK = "nvmlDeviceSetGpuLockedClocks"
RESET = "nvmlDeviceResetGpuLockedClocks"
# The fake H100's lowest supported clock (tests/fake_nvml/state.py): the floor of every lock.
H100_MIN_MHZ = 345


@pytest.fixture
def fake(fake_pynvml: FakeNvmlEnv) -> Iterator[FakeNvmlEnv]:
    fake_pynvml.write_state(FakeNvmlState.of("H100-SXM5", "H100-SXM5"))
    umask = os.umask(0o022)
    os.umask(umask)
    yield fake_pynvml
    os.umask(umask)


def config(tmp_path: Path, **overrides: Any) -> DaemonConfig:
    values: dict[str, Any] = {
        "backend": "nvml",
        "runtime_dir": str(tmp_path / "run"),
        "state_dir": str(tmp_path / "state"),
        "engine_socket_group": "",
        "metrics_port": 0,
        "period_s": 0.1,
    }
    values.update(overrides)
    return DaemonConfig(**values)


def clock_records(tmp_path: Path) -> dict[str, dict]:
    return json.loads((tmp_path / "state" / "state.json").read_text())["original_clocks"]


def locks(fake: FakeNvmlEnv) -> list[tuple[int | None, int | None]]:
    return [(g.locked_min_mhz, g.locked_max_mhz) for g in fake.read_state().gpus]


def run(body: Any) -> None:
    async_helpers.drive(body(), TEST_TIMEOUT_S)


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, plan: dict[int, int | None], seen: list[Any] | None = None, **overrides: Any
) -> AsyncIterator[Daemon]:
    """A started daemon whose controller asks for the clock ceilings in ``plan``; closed afterwards."""
    daemon = Daemon(config(tmp_path, **overrides), NvmlBackend(), PROFILES, MonotonicClock())
    await daemon.start()
    lock_clocks(daemon.controller, plan, seen)
    try:
        yield daemon
    finally:
        await daemon.close()


def inject(fake: FakeNvmlEnv, function: str, code: int, gpu: int) -> None:
    state = fake.read_state()
    state.inject(function, code, gpu=gpu)
    fake.write_state(state)


def test_lock_recorded_first_read_back_changed_unlocked_and_reset_on_close(fake: FakeNvmlEnv, tmp_path: Path) -> None:
    async def body() -> None:
        seen: list[Any] = []
        plan = {0: 1500, 1: 1507}
        async with running(tmp_path, plan, seen) as daemon:
            # No lock yet: nothing recorded (a record exists only for a GPU about to be locked).
            assert clock_records(tmp_path) == {}
            await daemon.tick()
            assert locks(fake) == [(H100_MIN_MHZ, 1500), (H100_MIN_MHZ, 1500)]  # 1507 snapped down to 1500
            assert set(clock_records(tmp_path)) == {fake_uuid(0), fake_uuid(1)}
            # Read-back: the next tick's reading shows the clock in force under the lock.
            await daemon.tick()
            gpus = daemon.build_status().gpus
            assert [(g.locked_clock_requested_mhz, g.sm_clock_mhz, g.clock_control) for g in gpus] == [
                (1500, 1500, True),
                (1500, 1500, True),
            ]
            assert (gpus[0].min_clock_mhz, gpus[0].max_clock_mhz) == (H100_MIN_MHZ, 1980)
            # The controller sees the knob: available, its range, the ceiling in force.
            g0 = seen[-1].gpus[0]
            assert (g0.clock_control, g0.min_clock_mhz, g0.max_clock_mhz, g0.locked_clock_mhz) == (
                True,
                H100_MIN_MHZ,
                1980,
                1500,
            )
            plan[0] = 1200
            plan[1] = None  # unlocked: reset, and its record goes
            await daemon.tick()
            assert locks(fake) == [(H100_MIN_MHZ, 1200), (None, None)]
            assert set(clock_records(tmp_path)) == {fake_uuid(0)}
            assert not daemon.build_status().gpus[1].HasField("locked_clock_requested_mhz")
            # An unchanged decision writes nothing.
            calls = len(fake.clock_calls())
            await daemon.tick()
            assert len(fake.clock_calls()) == calls
        assert locks(fake) == [(None, None), (None, None)]
        assert clock_records(tmp_path) == {}
        calls = fake.clock_calls()
        # Calls to different GPUs of one tick run concurrently: compared tick by tick, unordered.
        assert sorted(calls[:2]) == [(LOCK, 0, (H100_MIN_MHZ, 1500), 0), (LOCK, 1, (H100_MIN_MHZ, 1500), 0)]
        assert sorted(calls[2:4]) == sorted([(LOCK, 0, (H100_MIN_MHZ, 1200), 0), (RESET, 1, (), 0)])
        assert calls[4:] == [(RESET, 0, (), 0)]

    run(body)


def test_a_ceiling_at_or_above_the_top_clock_is_no_lock(fake: FakeNvmlEnv, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(tmp_path, {0: 1980, 1: 5000}) as daemon:
            await daemon.tick()
            await daemon.tick()
        assert fake.clock_calls() == []

    run(body)


def test_advise_mode_never_calls_a_setter(fake: FakeNvmlEnv, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(tmp_path, {0: 1200, 1: 1000}, mode="advise", budget_w=600.0) as daemon:
            for _ in range(3):
                await daemon.tick()
            gpus = daemon.build_status().gpus
            # The choice is shown (1000 snapped down to the supported 990), not applied.
            assert [g.locked_clock_decided_mhz for g in gpus] == [1200, 990]
            assert not any(g.HasField("locked_clock_requested_mhz") for g in gpus)
        setters = [e for e in fake.log() if e.function.startswith("nvmlDeviceSet") or e.function == RESET]
        assert setters == []

    run(body)


def test_not_supported_leaves_that_gpu_on_cap_only_control(fake: FakeNvmlEnv, tmp_path: Path) -> None:
    inject(fake, LOCK, NVML_ERROR_NOT_SUPPORTED, gpu=1)

    async def body() -> None:
        async with running(tmp_path, {0: 1410, 1: 1410}, budget_w=600.0) as daemon:
            for _ in range(3):
                await daemon.tick()
            g0, g1 = daemon.build_status().gpus
            assert g0.clock_control and g0.locked_clock_requested_mhz == 1410
            assert not g1.clock_control and "NOT_SUPPORTED" in g1.clock_control_note
            assert "cap-only control" in g1.clock_control_note
            # The power cap still works on both: the budget binds.
            assert g1.controlled and sum(g.limit_mw for g in fake.read_state().gpus) <= 600_000
            # Nothing was locked on GPU 1, so nothing is recorded for it; one refusal, never retried.
            assert set(clock_records(tmp_path)) == {fake_uuid(0)}
            assert sorted((fn, i) for fn, i, _, _ in fake.clock_calls()) == [(LOCK, 0), (LOCK, 1)]
        assert locks(fake) == [(None, None), (None, None)]

    run(body)


def test_a_gpu_listing_no_clocks_is_cap_only_from_the_start(fake: FakeNvmlEnv, tmp_path: Path) -> None:
    state = fake.read_state()
    state.gpus[0].max_sm_clock_mhz = 0
    fake.write_state(state)

    async def body() -> None:
        async with running(tmp_path, {0: 1400, 1: 1400}) as daemon:
            await daemon.tick()
            g0 = daemon.build_status().gpus[0]
            assert not g0.clock_control and "supported clocks unreadable" in g0.clock_control_note
        assert [(fn, i) for fn, i, _, _ in fake.clock_calls()] == [(LOCK, 1), (RESET, 1)]

    run(body)


def test_no_permission_keeps_power_control(fake: FakeNvmlEnv, tmp_path: Path) -> None:
    inject(fake, LOCK, NVML_ERROR_NO_PERMISSION, gpu=0)

    async def body() -> None:
        async with running(tmp_path, {0: 1400}) as daemon:
            await daemon.tick()
            g0 = daemon.build_status().gpus[0]
            assert g0.controlled and not g0.clock_control and "NO_PERMISSION" in g0.clock_control_note

    run(body)


def test_a_lost_gpu_during_a_lock_stops_control_of_that_gpu(fake: FakeNvmlEnv, tmp_path: Path) -> None:
    inject(fake, LOCK, NVML_ERROR_GPU_IS_LOST, gpu=1)

    async def body() -> None:
        async with running(tmp_path, {0: 1400, 1: 1400}) as daemon:
            await daemon.tick()
            assert [g.controlled for g in daemon.gpus] == [True, False]
            # Its record stays: the exit path still tries to reset it.
            assert set(clock_records(tmp_path)) == {fake_uuid(0), fake_uuid(1)}

    run(body)


def test_an_operators_lock_found_at_start_is_never_touched(fake: FakeNvmlEnv, tmp_path: Path) -> None:
    state = fake.read_state()
    state.gpus[0].locked_min_mhz, state.gpus[0].locked_max_mhz = 1000, 1000  # nvidia-smi -lgc 1000,1000
    fake.write_state(state)

    async def body() -> None:
        async with running(tmp_path, {0: 1400, 1: 1400}) as daemon:
            await daemon.tick()
            g0 = daemon.build_status().gpus[0]
            assert g0.clock_external and not g0.clock_control and g0.sm_clock_mhz == 1000
        assert [(fn, i) for fn, i, _, _ in fake.clock_calls()] == [(LOCK, 1), (RESET, 1)]
        assert locks(fake)[0] == (1000, 1000)

    run(body)


def test_application_clocks_set_by_an_operator_count_as_their_setting(fake: FakeNvmlEnv, tmp_path: Path) -> None:
    state = fake.read_state()
    state.gpus[1].app_clock_mhz = 1500  # nvidia-smi -ac 2619,1500 (not holding the clock down right now)
    fake.write_state(state)

    async def body() -> None:
        async with running(tmp_path, {0: 1400, 1: 1400}) as daemon:
            await daemon.tick()
            assert "applications clock 1500 MHz" in daemon.build_status().gpus[1].clock_control_note
        assert all(i == 0 for _, i, _, _ in fake.clock_calls())

    run(body)


def test_a_lock_replaced_by_an_operator_mid_run_is_respected(fake: FakeNvmlEnv, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(tmp_path, {0: 1200, 1: 1200}) as daemon:
            await daemon.tick()
            # Someone runs nvidia-smi -rgc -i 0 and then -lgc 1600,1800: the clock runs above the daemon's lock.
            state = fake.read_state()
            state.gpus[0].locked_min_mhz, state.gpus[0].locked_max_mhz = 1600, 1800
            fake.write_state(state)
            for _ in range(3):
                await daemon.tick()
            g0 = daemon.build_status().gpus[0]
            assert g0.clock_external and not g0.clock_control and g0.sm_clock_mhz == 1800
            # No record left for GPU 0: the exit path must not reset the operator's lock.
            assert set(clock_records(tmp_path)) == {fake_uuid(1)}
        assert locks(fake) == [(1600, 1800), (None, None)]
        assert sorted((fn, i) for fn, i, _, _ in fake.clock_calls()) == sorted([(LOCK, 0), (LOCK, 1), (RESET, 1)])

    run(body)


def test_clocks_disabled_by_the_operator(fake: FakeNvmlEnv, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(tmp_path, {0: 1400, 1: 1400}, clocks_enabled=False) as daemon:
            await daemon.tick()
            assert all("[clocks] enabled = false" in g.clock_control_note for g in daemon.build_status().gpus)
        assert fake.clock_calls() == []

    run(body)


def test_clocks_left_locked_by_a_crashed_run_are_reset_at_start_even_when_disabled(
    fake: FakeNvmlEnv, tmp_path: Path
) -> None:
    state = fake.read_state()
    state.gpus[1].locked_min_mhz, state.gpus[1].locked_max_mhz = H100_MIN_MHZ, 1200  # the crashed run's lock
    fake.write_state(state)
    (tmp_path / "state").mkdir(mode=0o700)
    record = {"gpu_index": 1, "boot_id": None, "driver_version": None}
    doc = {"version": 2, "budget_w": None, "original_clocks": {fake_uuid(1): record}}
    (tmp_path / "state" / "state.json").write_text(json.dumps(doc))
    (tmp_path / "state" / "state.json").chmod(0o600)

    async def body() -> None:
        async with running(tmp_path, {}, clocks_enabled=False) as daemon:
            assert locks(fake)[1] == (None, None)
            assert clock_records(tmp_path) == {}
            # Reset before control starts, so the leftover lock was not taken for an operator's.
            assert not daemon.build_status().gpus[1].clock_external
        assert fake.clock_calls() == [(RESET, 1, (), 0)]

    run(body)


def test_advise_mode_leaves_a_crashed_runs_lock_and_says_so(fake: FakeNvmlEnv, tmp_path: Path) -> None:
    state = fake.read_state()
    state.gpus[0].locked_min_mhz, state.gpus[0].locked_max_mhz = H100_MIN_MHZ, 1200
    fake.write_state(state)
    store = StateStore(tmp_path / "state")
    store.save(DaemonState().with_original_clock(fake_uuid(0), OriginalClock(0)))

    async def body() -> None:
        async with running(tmp_path, {0: 1500}, mode="advise") as daemon:
            await daemon.tick()
            g0 = daemon.build_status().gpus[0]
            assert not g0.clock_external and "run 'pals-daemon restore'" in g0.clock_control_note
        assert fake.clock_calls() == [] and locks(fake)[0] == (H100_MIN_MHZ, 1200)
        assert set(clock_records(tmp_path)) == {fake_uuid(0)}

    run(body)
