"""Online profiling sweeps locked clocks too (issue 11): the real daemon (Runner, gRPC on Unix sockets) on a
simulated H100 SXM5 with the clock knob, a simulated Qwen3-30B-A3B engine over the real engine socket under a
saturating Poisson load, a ScaledClock. The clock points are measured at the highest cap, written as the profile's
clock_points, and the GPU's clocks are reset afterwards (and on stop); advise mode and bad requests set nothing.

No pytest-asyncio: every test is a sync function running one coroutine with ``drive()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import async_helpers
import grpc
import pytest
from async_helpers import expect_rpc_error
from daemon_harness import Dirs
from fake_nvml import FakeNvmlEnv, FakeNvmlState
from fake_nvml.state import fake_uuid

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.cli import palsctl
from pals_daemon.clock import ScaledClock
from pals_daemon.config import DaemonConfig
from pals_daemon.gpu.nvml import NvmlBackend
from pals_daemon.model.clock_model import clock_response
from pals_daemon.model.profile import load_profile, load_profiles
from pals_daemon.server.runner import Runner
from pals_daemon.sim.engine import SimEngine
from pals_daemon.sim.gpu import RESET_LOCKED_CLOCKS, SET_LOCKED_CLOCKS, SimBackend, SimGpu, make_sim_gpus
from pals_daemon.sim.h100 import load_h100_truth
from pals_daemon.sim.link import SimEngineLink
from pals_daemon.sim.trace import poisson_requests

PROFILES = load_profiles(Path(__file__).resolve().parents[2] / "profiles" / "h100")
MODEL = "Qwen/Qwen3-30B-A3B-Instruct-2507"
ENGINE = "engine0"
SPEED = 30.0
PERIOD_S = 0.5
MAX_NUM_SEQS = 64
# Saturating: 80 requests/s of 64 output tokens asks 5,120 tokens/s of an engine that gives ~2,200 at batch 64.
RATE_PER_S = 80.0
TEST_TIMEOUT_S = 90.0
DONE = pals_pb2.PROFILE_STATE_DONE
FAILED = pals_pb2.PROFILE_STATE_FAILED
CANCELLED = pals_pb2.PROFILE_STATE_CANCELLED
RUNNING = pals_pb2.PROFILE_STATE_RUNNING


@dataclass
class Node:
    runner: Runner
    gpu: SimGpu
    admin: pals_pb2_grpc.PowerAdminStub

    def clock_calls(self) -> list[tuple[str, int]]:
        return [c for c in self.gpu.calls if c[0] in (SET_LOCKED_CLOCKS, RESET_LOCKED_CLOCKS)]


@contextlib.asynccontextmanager
async def h100_node(dirs: Dirs, mode: str = "enforce", clocks: bool = True, nvml: bool = False) -> AsyncIterator[Node]:
    """A running daemon with one engine connected. ``nvml``: the daemon drives a fake H100 through pynvml's real
    ctypes path (the ``fake_pynvml`` fixture must be active) in real time, and the engine is simulated on a GPU
    model of its own (its speed is then not the fake's); else simulated H100s at SPEED."""
    runtime, state = dirs.runtime, dirs.state
    clock = ScaledClock(1.0 if nvml else SPEED)
    gpus = make_sim_gpus("H100-SXM5", 1, clock.now)
    config = DaemonConfig(
        backend="nvml" if nvml else "sim",
        mode=mode,
        period_s=0.1 if nvml else PERIOD_S,
        runtime_dir=str(runtime),
        state_dir=str(state),
        engine_socket_group="",
        metrics_port=0,
        sim_gpu_kind="H100-SXM5",
        sim_gpu_count=1,
        sim_speed=1.0 if nvml else SPEED,
        clocks_enabled=clocks,
        directive_ttl_s=20.0,
    )
    runner = Runner(config, NvmlBackend() if nvml else SimBackend(gpus), PROFILES, clock)
    await runner.start()
    control = asyncio.create_task(runner.run())
    requests = poisson_requests(RATE_PER_S, 3600.0, 32, 64, seed=1)
    engine = SimEngine(ENGINE, load_h100_truth(MODEL, 1), gpus, requests, MAX_NUM_SEQS, 8192, start_s=clock.now())
    uuids = [fake_uuid(0)] if nvml else [g.identity.uuid for g in gpus]
    link = SimEngineLink(engine, MODEL, uuids, str(config.engine_socket_path), clock, PERIOD_S / 2)
    stop = asyncio.Event()
    link_task = asyncio.create_task(link.run(stop))
    try:
        await async_helpers.eventually(lambda: runner.daemon.engines.get(ENGINE) is not None, 10.0)
        async with grpc.aio.insecure_channel(f"unix:{config.admin_socket_path}") as channel:
            yield Node(runner, gpus[0], pals_pb2_grpc.PowerAdminStub(channel))
    finally:
        stop.set()
        runner.daemon.request_stop()
        await asyncio.wait_for(control, 10.0)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
            await asyncio.wait_for(link_task, 5.0)


def sweep(**overrides: Any) -> pals_pb2.StartProfileRequest:
    values: dict[str, Any] = {
        "engine_id": ENGINE,
        "caps_w": [400.0, 700.0],
        "batches": [8, 32],
        "clocks_mhz": [1230],
        "hold_s": 4.0,
        "settle_s": 1.0,
    }
    values.update(overrides)
    return pals_pb2.StartProfileRequest(**values)


async def wait_job(node: Node, *states: int, timeout_s: float = 60.0) -> pals_pb2.ProfileJob:
    job: list[pals_pb2.ProfileJob] = []

    async def reached() -> bool:
        job[:] = [await node.admin.GetProfile(pals_pb2.GetProfileRequest(engine_id=ENGINE))]
        return job[0].state in states

    await async_helpers.eventually(reached, timeout_s)
    return job[0]


def test_a_clock_sweep_writes_clock_points_and_unlocks_afterwards(dirs: Dirs) -> None:
    async def body() -> Path:
        async with h100_node(dirs) as node:
            started = await node.admin.StartProfile(sweep())
            # (2 caps + 1 clock) x 2 batches.
            assert started.points_total == 6
            job = node.runner.daemon.profiler.jobs[ENGINE]
            # While a clock point is held, the GPU runs under the lock at the highest cap.
            await async_helpers.eventually(lambda: job.clock_mhz == 1230 and job.phase.value == "holding", 40.0)
            assert node.gpu.locked_clock_max_mhz() == 1230
            assert node.gpu.read().enforced_limit_mw == 700_000
            done = await wait_job(node, DONE, FAILED, CANCELLED)
            assert done.state == DONE, done.error
            assert [p.clock_mhz for p in done.points if p.HasField("clock_mhz")] == [1230, 1230]
            # The controller has the GPU back: the engine has no SLO, so no lock, and the actuator resets it.
            await async_helpers.eventually(lambda: node.gpu.locked_clock_max_mhz() is None, 10.0)
            assert node.clock_calls()[-1] == (RESET_LOCKED_CLOCKS, 0)
            return Path(done.output_path)

    path = async_helpers.drive(body(), TEST_TIMEOUT_S)
    profile = load_profile(path)
    assert profile.method == "measured" and profile.caps_w == (400.0, 700.0)
    assert {(p.cap_w, p.batch) for p in profile.points} == {(c, b) for c in (400.0, 700.0) for b in (8, 32)}
    clocked = {(p.clock_mhz, p.batch): p for p in profile.clock_points}
    assert set(clocked) == {(c, b) for c in (1230, 1980) for b in (8, 32)}
    assert all(p.cap_w == 700.0 for p in profile.clock_points)
    for b in (8, 32):
        locked, top = clocked[1230, b], clocked[1980, b]
        # Measured: the lock lowers power by more than the hold's noise and costs little throughput (decode is
        # memory-bound: the truth loses 5% at batch 8, 13% at 32; a 4 s hold's noise is a few percent).
        assert locked.gpu_power_w < 0.9 * top.gpu_power_w, (locked, top)
        assert 0.7 * top.tokens_per_s < locked.tokens_per_s < 1.05 * top.tokens_per_s, (locked, top)
    # The written profile feeds the planner's clock model.
    resp = clock_response(profile)
    assert resp is not None and resp.top_clock_mhz == 1980.0
    r_t, r_p = resp.ratios(1230.0, 8.0)
    assert 0.7 < float(r_t) < 1.0 and float(r_p) < 1.0


def test_stop_during_a_clock_point_resets_the_clock(dirs: Dirs) -> None:
    async def body() -> Node:
        async with h100_node(dirs) as node:
            await node.admin.StartProfile(sweep(caps_w=[650.0, 700.0], batches=[8, 16], clocks_mhz=[930]))
            job = node.runner.daemon.profiler.jobs[ENGINE]
            await async_helpers.eventually(lambda: node.gpu.locked_clock_max_mhz() == 930, 40.0)
            assert job.running
            return node
        # (leaving the context stops the daemon mid-sweep)

    node = async_helpers.drive(body(), TEST_TIMEOUT_S)
    assert node.gpu.locked_clock_max_mhz() is None
    assert node.clock_calls()[-1] == (RESET_LOCKED_CLOCKS, 0)


@pytest.mark.parametrize(
    ("clocks", "match"),
    [([100], "outside GPU 0's lockable range"), ([1980], "outside GPU 0's lockable range"), ([1230, 1231], "repeats")],
)
def test_bad_clocks_are_refused_and_set_nothing(dirs: Dirs, clocks: list[int], match: str) -> None:
    async def body() -> None:
        async with h100_node(dirs) as node:
            await expect_rpc_error(
                node.admin.StartProfile(sweep(clocks_mhz=clocks)), grpc.StatusCode.INVALID_ARGUMENT, match
            )
            assert node.runner.daemon.profiler.jobs == {}
            assert node.clock_calls() == []

    async_helpers.drive(body(), TEST_TIMEOUT_S)


def test_without_the_clock_knob_a_clock_sweep_is_refused(dirs: Dirs) -> None:
    async def body() -> None:
        async with h100_node(dirs, clocks=False) as node:
            await expect_rpc_error(
                node.admin.StartProfile(sweep()), grpc.StatusCode.FAILED_PRECONDITION, "clock knob", "disabled"
            )
            assert node.runner.daemon.profiler.jobs == {} and node.clock_calls() == []

    async_helpers.drive(body(), TEST_TIMEOUT_S)


def test_advise_mode_refuses_a_clock_sweep_and_writes_nothing(dirs: Dirs) -> None:
    async def body() -> None:
        async with h100_node(dirs, mode="advise") as node:
            await expect_rpc_error(node.admin.StartProfile(sweep()), grpc.StatusCode.FAILED_PRECONDITION, "advise")
            assert node.runner.daemon.profiler.jobs == {}
            assert node.gpu.calls == []

    async_helpers.drive(body(), TEST_TIMEOUT_S)


def test_palsctl_profile_clocks_reaches_the_daemon(
    dirs: Dirs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "qwen.json"

    async def body() -> int:
        async with h100_node(dirs) as node:
            argv = ["--socket", str(node.runner.config.admin_socket_path), "profile", ENGINE]
            argv += ["--caps", "600,700", "--batches", "8,16", "--clocks", "1380", "--hold", "2", "--settle", "0.5"]
            argv += ["--output", str(out_path), "--wait", "--poll", "0.05"]
            return await asyncio.to_thread(palsctl.main, argv)

    rc = async_helpers.drive(body(), TEST_TIMEOUT_S)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "6 points" in out and "1380 MHz" in out
    assert {p.clock_mhz for p in load_profile(out_path).clock_points} == {1380, 1980}


# ------------------------------------------------------------------------------------------ fake NVML


def test_a_clock_sweep_through_real_pynvml_locks_then_resets(fake_pynvml: FakeNvmlEnv, dirs: Dirs) -> None:
    """The same sweep on a fake H100 through pynvml's real ctypes path (tests/fake_nvml): the lock is written as
    nvmlDeviceSetGpuLockedClocks at the point's clock, recorded first, and reset once the controller has the GPU
    back (the NVML calls are what is checked here, not the engine's speed)."""
    state = FakeNvmlState.of("H100-SXM5")
    state.gpus[0].energy_step_mj = 50_000  # the energy counter advances per read: each hold measures a power
    fake_pynvml.write_state(state)
    state_json = dirs.state / "state.json"
    seen_records: list[set[str]] = []

    def locked() -> bool:
        if fake_pynvml.read_state().gpus[0].locked_max_mhz != 1230:
            return False
        seen_records.append(set(json.loads(state_json.read_text())["original_clocks"]))
        return True

    async def body() -> pals_pb2.ProfileJob:
        async with h100_node(dirs, nvml=True) as node:
            await node.admin.StartProfile(sweep(caps_w=[600.0, 700.0], batches=[8, 16], hold_s=0.5, settle_s=0.0))
            await async_helpers.eventually(locked, 20.0)
            job = await wait_job(node, DONE, FAILED, CANCELLED, timeout_s=30.0)
            await async_helpers.eventually(lambda: fake_pynvml.read_state().gpus[0].locked_max_mhz is None, 10.0)
            return job

    job = async_helpers.drive(body(), TEST_TIMEOUT_S)
    assert job.state == DONE, job.error
    # Recorded before the lock was written; nothing left to restore after the daemon stopped.
    assert seen_records and seen_records[0] == {fake_uuid(0)}
    assert json.loads(state_json.read_text())["original_clocks"] == {}
    calls = [c for c in fake_pynvml.clock_calls() if c[1] == 0]
    assert calls[0][0] == "nvmlDeviceSetGpuLockedClocks" and calls[0][2][1] == 1230
    assert calls[-1][0] == "nvmlDeviceResetGpuLockedClocks"
    assert fake_pynvml.read_state().gpus[0].locked_max_mhz is None
