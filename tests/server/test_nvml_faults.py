"""NVML faults mid-run: the daemon in this process, enforcing a budget on four fake A100s through pynvml's real
ctypes path (tests/fake_nvml). One GPU is lost, one refuses the setter, one is capped by someone else; the
fourth keeps being controlled and the sum of the limits the fake driver enforces stays within the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import async_helpers
import grpc
import pytest
from fake_nvml import FakeNvmlEnv, FakeNvmlState
from fake_nvml.state import (
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_RESET_REQUIRED,
    NVML_ERROR_TIMEOUT,
    NVML_ERROR_UNKNOWN,
)
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.clock import MonotonicClock
from pals_daemon.config import DaemonConfig
from pals_daemon.control.config import ControllerConfig
from pals_daemon.errors import GpuError
from pals_daemon.gpu.nvml import NvmlBackend
from pals_daemon.model.profile import load_profiles
from pals_daemon.server import daemon as daemon_module
from pals_daemon.server.daemon import Daemon, default_profiles_dir
from pals_daemon.server.runner import Runner

PROFILES = load_profiles(default_profiles_dir())
PERIOD_S = 0.1
TEST_TIMEOUT_S = 40.0
# Every call a read makes, and the setter: a lost GPU answers none of them (nvml.h: NVML_ERROR_GPU_IS_LOST).
LOST_FUNCTIONS = (
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetPowerManagementLimit",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetFieldValues",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceSetPowerManagementLimit",
)


@pytest.fixture
def env(fake_pynvml: FakeNvmlEnv, short_tmp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Four A100s on the fake, short socket paths, no systemd; the process umask put back afterwards."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    fake_pynvml.write_state(FakeNvmlState.of(*["A100-SXM4"] * 4))
    umask = os.umask(0o022)
    os.umask(umask)
    yield fake_pynvml, short_tmp / "run", tmp_path / "state"
    os.umask(umask)


def config(run_dir: Path, state_dir: Path, **overrides: Any) -> DaemonConfig:
    values: dict[str, Any] = {
        "backend": "nvml",
        "mode": "enforce",
        "runtime_dir": str(run_dir),
        "state_dir": str(state_dir),
        "engine_socket_group": "",
        "metrics_port": 0,
        "period_s": PERIOD_S,
        "directive_ttl_s": 1.0,
    }
    values.update(overrides)
    return DaemonConfig(**values)


@contextlib.asynccontextmanager
async def running(cfg: DaemonConfig) -> AsyncIterator[tuple[Runner, pals_pb2_grpc.PowerAdminStub]]:
    runner = Runner(cfg, NvmlBackend(), PROFILES, MonotonicClock())
    await runner.start()
    task = asyncio.create_task(runner.run())
    try:
        async with grpc.aio.insecure_channel(f"unix:{cfg.admin_socket_path}") as channel:
            yield runner, pals_pb2_grpc.PowerAdminStub(channel)
    finally:
        runner.daemon.request_stop()
        await asyncio.wait_for(task, 10.0)


def enforced_mw(fake: FakeNvmlEnv) -> list[int]:
    """What the fake driver enforces now (ground truth, not the daemon's view)."""
    return [g.enforced_mw for g in fake.read_state().gpus]


def metric_values(runner: Runner, name: str) -> dict[str, float]:
    """gpu label -> value of one gauge, from a real scrape of the daemon's registry."""
    text = generate_latest(runner.metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {s.labels["gpu"]: s.value for s in family.samples}
    return {}


def test_lost_gpu_permission_denied_and_external_cap_mid_run(env: Any, caplog: pytest.LogCaptureFixture) -> None:
    fake, run_dir, state_dir = env
    caplog.set_level(logging.INFO, logger="pals_daemon")

    async def body() -> None:
        async with running(config(run_dir, state_dir, budget_w=1200.0)) as (runner, admin):
            daemon = runner.daemon
            # Ground truth after every tick: the enforced limits the fake reports, and the budget then.
            samples: list[tuple[float, int]] = []
            daemon.on_tick.append(
                lambda d: samples.append((d.budget.effective_w(d.clock.now()), sum(enforced_mw(fake))))
            )
            await async_helpers.eventually(lambda: enforced_mw(fake) == [300_000] * 4, 5.0)

            samples.clear()  # from here on, every tick, the failing ones included, must end within budget
            state = fake.read_state()
            for function in LOST_FUNCTIONS:
                state.inject(function, NVML_ERROR_GPU_IS_LOST, gpu=0)
            state.inject("nvmlDeviceSetPowerManagementLimit", NVML_ERROR_NO_PERMISSION, gpu=1)
            state.gpus[2].external_limit_mw = 150_000
            fake.write_state(state)
            await admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=1000))

            async def settled() -> bool:
                s = await admin.GetStatus(pals_pb2.GetStatusRequest())
                return [g.controlled for g in s.gpus] == [False, False, True, True] and s.gpus[2].limit_drift

            await async_helpers.eventually(settled, 5.0)
            # Past the meter window after the budget drop (limits are held lower for it: control/meter.py).
            await asyncio.sleep(ControllerConfig().meter_window_s + 5 * PERIOD_S)
            status = await admin.GetStatus(pals_pb2.GetStatusRequest())
            g0, g1, g2, g3 = status.gpus
            assert "GPU_IS_LOST" in g0.fault and "NO_PERMISSION" in g1.fault
            assert (g2.fault, g3.fault) == ("", "")
            assert g2.external_limit_w == 150.0 and not g3.limit_drift
            # The lost and the refusing GPU are budgeted at their enforced 300 W, the capped one at its cap:
            # the controlled GPU gets the rest, and the GPU under the external cap is requested at most that.
            assert g2.requested_limit_w <= 150.0
            assert g3.requested_limit_w == pytest.approx(1000 - 300 - 300 - 150, abs=1.0)
            assert status.budget.min_budget_w == pytest.approx(300 + 300 + 100 + 100)
            assert samples and all(total <= budget * 1000 for budget, total in samples)

            # The others keep being controlled: a lower budget moves the controlled GPUs' limits at once.
            before_g3 = enforced_mw(fake)[3]
            await admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=900))
            now = enforced_mw(fake)
            assert now[3] < before_g3 and sum(now) <= 900_000
            assert now[:2] == [300_000, 300_000]  # the failed GPUs were not touched
            with pytest.raises(grpc.aio.AioRpcError) as info:  # the failed GPUs' limits bound the budget
                await admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=790))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            # The other tool lifts its cap: the GPU was requested under it, so the budget still holds.
            samples.clear()
            state = fake.read_state()
            state.gpus[2].external_limit_mw = None
            fake.write_state(state)
            assert sum(enforced_mw(fake)) <= 900_000
            await asyncio.sleep(5 * PERIOD_S)
            assert samples and all(total <= 900_000 for _, total in samples)

            # Metrics show the failed GPUs and the drift; the status and metrics agree.
            assert metric_values(runner, "pals_gpu_failed") == {"0": 1.0, "1": 1.0, "2": 0.0, "3": 0.0}
            assert metric_values(runner, "pals_gpu_controlled") == {"0": 0.0, "1": 0.0, "2": 1.0, "3": 1.0}
            assert metric_values(runner, "pals_gpu_power_limit_drift")["2"] == 1.0
            assert metric_values(runner, "pals_gpu_power_limit_external_watts") == {"2": 150.0}

            # While running, a failed GPU is not retried every tick: GPU 1 refused once, GPU 0 was never
            # written after it was lost (its only write is the first 300 W).
            calls = fake.set_limit_calls()
            assert [rc for gpu, _, rc in calls if gpu == 1].count(NVML_ERROR_NO_PERMISSION) == 1
            assert [rc for gpu, _, rc in calls if gpu == 0] == [0]
            assert all(rc == 0 for gpu, _, rc in calls if gpu in (2, 3))
        # The exit path still tries to restore every GPU, the failed ones included (their records are kept).
        assert {gpu for gpu, mw, _ in fake.set_limit_calls()[len(calls) :] if mw == 400_000} == {0, 1, 2, 3}

    async_helpers.drive(body(), TEST_TIMEOUT_S)
    messages = [r.getMessage() for r in caplog.records]
    # One log line per fault, not one per tick.
    assert sum("GPU 0 no longer controlled" in m for m in messages) == 1
    assert sum("GPU 1 no longer controlled" in m for m in messages) == 1
    assert sum("GPU 2: enforced limit 150000 mW is below" in m for m in messages) == 1


def test_a_gpu_failing_at_start_up_is_dropped_and_reported(env: Any) -> None:
    fake, run_dir, state_dir = env
    state = fake.read_state()
    state.inject("nvmlDeviceGetPowerUsage", NVML_ERROR_GPU_IS_LOST, gpu=1)
    fake.write_state(state)

    async def body() -> None:
        async with running(config(run_dir, state_dir, budget_w=1000.0)) as (runner, admin):
            status = await admin.GetStatus(pals_pb2.GetStatusRequest())
            assert [g.controlled for g in status.gpus] == [True, False, True, True]
            assert "GPU_IS_LOST" in status.gpus[1].fault
            # Never read: budgeted at its maximum (400 W), so the other three share 600 W.
            assert status.budget.min_budget_w == pytest.approx(400 + 3 * 100)
            await async_helpers.eventually(lambda: sum(enforced_mw(fake)[i] for i in (0, 2, 3)) <= 600_000, 5.0)
            assert metric_values(runner, "pals_gpu_failed")["1"] == 1.0
        # The dropped GPU was never written, nor recorded as an original limit to restore.
        assert all(gpu != 1 for gpu, _, _ in fake.set_limit_calls())
        assert fake.read_state().gpus[1].limit_mw == 400_000

    async_helpers.drive(body(), TEST_TIMEOUT_S)


def test_start_up_fails_only_when_every_gpu_fails(env: Any) -> None:
    fake, run_dir, state_dir = env
    state = fake.read_state()
    state.inject("nvmlDeviceGetPowerManagementLimitConstraints", NVML_ERROR_UNKNOWN)
    fake.write_state(state)

    async def body() -> None:
        runner = Runner(config(run_dir, state_dir), NvmlBackend(), PROFILES, MonotonicClock())
        with pytest.raises(GpuError, match="GetPowerManagementLimitConstraints"):
            await runner.start()

    async_helpers.drive(body(), TEST_TIMEOUT_S)
    assert fake.set_limit_calls() == []
    # NVML was shut down again on the way out.
    assert [e.function for e in fake.log()] == ["nvmlInitWithFlags", "nvmlShutdown"]


def test_a_hung_gpu_is_dropped_within_the_timeout_and_does_not_stall_the_others(env: Any) -> None:
    fake, run_dir, state_dir = env
    timeout_s = 1.0

    async def body() -> None:
        async with running(config(run_dir, state_dir, budget_w=1200.0, gpu_timeout_s=timeout_s)) as (runner, admin):
            daemon = runner.daemon
            await async_helpers.eventually(lambda: enforced_mw(fake) == [300_000] * 4, 5.0)
            state = fake.read_state()
            state.slow("nvmlDeviceGetPowerUsage", 3_000, gpu=3)  # far beyond the timeout: hung
            fake.write_state(state)
            durations: list[float] = []
            daemon.on_tick.append(lambda d: durations.append(d.last_tick_duration_s))
            await async_helpers.eventually(lambda: not daemon.gpus[3].controlled, 5.0)
            assert "timed out" in daemon.gpus[3].fault or "never returned" in daemon.gpus[3].fault
            durations.clear()
            # The others are still controlled, and ticks are fast again: the hung worker is not waited on.
            await admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=1000))
            limits = enforced_mw(fake)
            assert limits[3] == 300_000 and sum(limits) <= 1_000_000 and limits[:3] != [300_000] * 3
            await asyncio.sleep(4 * PERIOD_S)
            # Waiting on the hung GPU again would take the whole timeout every tick.
            assert durations and max(durations) < timeout_s

    async_helpers.drive(body(), TEST_TIMEOUT_S)


def test_external_cap_is_rechecked_and_a_foreign_write_is_set_back(
    env: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake, run_dir, state_dir = env
    caplog.set_level(logging.INFO, logger="pals_daemon")

    async def status(admin: pals_pb2_grpc.PowerAdminStub) -> pals_pb2.NodeStatus:
        return await admin.GetStatus(pals_pb2.GetStatusRequest())

    async def body() -> None:
        async with running(config(run_dir, state_dir, budget_w=1200.0)) as (runner, admin):
            await async_helpers.eventually(lambda: enforced_mw(fake) == [300_000] * 4, 5.0)
            state = fake.read_state()
            state.gpus[2].external_limit_mw = 200_000
            fake.write_state(state)
            await async_helpers.eventually(lambda: runner.daemon.gpus[2].requested_limit_mw <= 200_000, 5.0)
            # Counted once the tick that lowered GPU 2 is over: its raising phase (the others get the watts GPU 2
            # cannot use) runs after the lowering one, and a loaded machine can poll in between.
            ticks = runner.daemon.ticks
            await async_helpers.eventually(lambda: runner.daemon.ticks > ticks, 5.0)
            writes_capped = len(fake.set_limit_calls())
            # Capped and held under the cap: no write every tick, and the budget holds.
            await asyncio.sleep(0.3)
            assert len(fake.set_limit_calls()) == writes_capped
            assert sum(enforced_mw(fake)) <= 1_200_000
            # The cap goes; after the recheck interval (0.5 s here instead of 30 s, to see the whole cycle
            # in a short test) GPU 2 is asked above the old cap and gets it.
            monkeypatch.setattr(daemon_module, "EXTERNAL_CAP_RECHECK_S", 0.5)
            state = fake.read_state()
            state.gpus[2].external_limit_mw = None
            fake.write_state(state)

            async def lifted() -> bool:
                s = await status(admin)
                return not s.gpus[2].limit_drift and s.gpus[2].enforced_limit_w > 200.0

            await async_helpers.eventually(lifted, 5.0)
            assert sum(enforced_mw(fake)) <= 1_200_000

            # Someone overwrites GPU 3's management limit with 400 W (over the budget): set back in a tick.
            state = fake.read_state()
            state.gpus[3].limit_mw = 400_000
            fake.write_state(state)
            await async_helpers.eventually(lambda: sum(enforced_mw(fake)) <= 1_200_000, 5.0)
            assert (await status(admin)).gpus[3].controlled

    async_helpers.drive(body(), TEST_TIMEOUT_S)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("GPU 2: the external cap of 200000 mW is gone" in m for m in messages) == 1
    assert sum("GPU 3: power limit changed to 400000 mW by someone else" in m for m in messages) == 1


@pytest.mark.parametrize(
    "code,name",
    [
        (NVML_ERROR_GPU_IS_LOST, "GPU_IS_LOST"),
        (NVML_ERROR_RESET_REQUIRED, "RESET_REQUIRED"),
        (NVML_ERROR_NO_PERMISSION, "NO_PERMISSION"),
        (NVML_ERROR_NOT_SUPPORTED, "NOT_SUPPORTED"),
    ],
)
def test_each_fatal_code_fails_only_its_gpu(env: Any, code: int, name: str) -> None:
    fake, _, state_dir = env
    cfg = config(Path("/nonexistent"), state_dir, budget_w=1000.0)

    async def body() -> None:
        daemon = Daemon(cfg, NvmlBackend(), PROFILES, MonotonicClock())
        await daemon.start()
        try:
            await daemon.tick()
            state = fake.read_state()
            state.inject("nvmlDeviceGetEnforcedPowerLimit", code, gpu=2)
            fake.write_state(state)
            await daemon.tick()
            assert [g.controlled for g in daemon.gpus] == [True, True, False, True]
            assert name in daemon.gpus[2].fault
            # The failed GPU stays at its enforced 250 W and is budgeted there; the others take the cut.
            await daemon.set_budget(700.0)
            limits = enforced_mw(fake)
            assert limits[2] == 250_000 and sum(limits) <= 700_000
        finally:
            await daemon.close()

    async_helpers.drive(body(), TEST_TIMEOUT_S)


def test_a_transient_error_is_retried_not_fatal(env: Any) -> None:
    fake, _, state_dir = env
    cfg = config(Path("/nonexistent"), state_dir, budget_w=1000.0)

    async def body() -> None:
        daemon = Daemon(cfg, NvmlBackend(), PROFILES, MonotonicClock())
        await daemon.start()
        try:
            state = fake.read_state()
            state.inject("nvmlDeviceGetPowerUsage", NVML_ERROR_TIMEOUT, gpu=2, times=2)
            fake.write_state(state)
            for _ in range(4):
                await daemon.tick()
            assert all(g.controlled for g in daemon.gpus) and daemon.gpus[2].fault == ""
        finally:
            await daemon.close()

    async_helpers.drive(body(), TEST_TIMEOUT_S)


def test_advise_mode_follows_a_foreign_limit_and_reports_an_external_cap(
    env: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fake, _, state_dir = env
    caplog.set_level(logging.INFO, logger="pals_daemon")
    cfg = config(Path("/nonexistent"), state_dir, mode="advise", budget_w=1000.0)

    async def body() -> None:
        daemon = Daemon(cfg, NvmlBackend(), PROFILES, MonotonicClock())
        await daemon.start()
        try:
            state = fake.read_state()
            state.gpus[0].limit_mw = 300_000  # someone runs nvidia-smi -pl 300
            state.gpus[1].external_limit_mw = 200_000  # an out-of-band cap
            fake.write_state(state)
            await daemon.tick()
            await daemon.tick()
            g0, g1 = daemon.build_status().gpus[:2]
            assert g0.requested_limit_w == 300.0 and not g0.limit_drift
            assert g1.limit_drift and g1.external_limit_w == 200.0
        finally:
            await daemon.close()

    async_helpers.drive(body(), TEST_TIMEOUT_S)
    assert fake.set_limit_calls() == []  # advise mode never writes
    assert not any("setting it back" in r.getMessage() for r in caplog.records)
