"""Online profiling on the simulated node: the real daemon (Runner, gRPC on Unix sockets), simulated A100s,
a simulated Mixtral engine over the real engine socket under a saturating Poisson load, a ScaledClock.

No pytest-asyncio: every test is a sync function running one coroutine with ``drive()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import async_helpers
import grpc
import pytest
from async_helpers import expect_rpc_error

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.cli import palsctl
from pals_daemon.clock import ScaledClock
from pals_daemon.config import DaemonConfig
from pals_daemon.control.types import Decision
from pals_daemon.model.profile import load_profile, load_profiles
from pals_daemon.server.daemon import default_profiles_dir
from pals_daemon.server.runner import Runner
from pals_daemon.sim.engine import SimEngine
from pals_daemon.sim.gpu import SimBackend, SimGpu, make_sim_gpus
from pals_daemon.sim.link import SimEngineLink
from pals_daemon.sim.trace import poisson_requests
from pals_daemon.sim.truth import load_a100_truth

T = TypeVar("T")

PROFILES = load_profiles(default_profiles_dir())
MODEL = "mixtral-8x7b-instruct"
ENGINE = "engine0"
SPEED = 30.0  # simulated seconds per wall second
PERIOD_S = 0.5
MAX_NUM_SEQS = 64
# Saturating: ~20 requests/s of 64 output tokens is 1,280 tokens/s asked of an engine that gives <= 435.
RATE_PER_S = 20.0
PROMPT_TOKENS = 32
OUTPUT_TOKENS = 64
TEST_TIMEOUT_S = 60.0
RUNNING = pals_pb2.PROFILE_STATE_RUNNING
DONE = pals_pb2.PROFILE_STATE_DONE
FAILED = pals_pb2.PROFILE_STATE_FAILED
CANCELLED = pals_pb2.PROFILE_STATE_CANCELLED


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test coroutine with this file's hard timeout."""
    return async_helpers.drive(coro, TEST_TIMEOUT_S)


async def eventually(predicate: Callable[[], Awaitable[bool] | bool], timeout_s: float = 20.0) -> None:
    """Poll ``predicate`` until it holds (this file's default patience)."""
    await async_helpers.eventually(predicate, timeout_s)


@pytest.fixture
def dirs(short_tmp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """(runtime dir for the sockets, state dir); no systemd; the process umask put back afterwards."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    umask = os.umask(0o022)
    os.umask(umask)
    yield short_tmp / "run", tmp_path / "state"
    os.umask(umask)  # Runner.start sets 0077 for the whole process


@dataclass
class SimNode:
    """A running daemon on simulated GPUs with one loaded simulated engine, and an admin client."""

    runner: Runner
    gpus: list[SimGpu]
    engine: SimEngine
    admin: pals_pb2_grpc.PowerAdminStub
    clock: ScaledClock
    # Every decision the controller itself returned (before the profiler's override).
    controller_decisions: list[Decision]
    # Per completed tick: (the controller's decision, the decision the daemon applied).
    ticks: list[tuple[Decision, Decision]]

    @property
    def config(self) -> DaemonConfig:
        return self.runner.config

    def enforced_w(self) -> list[float]:
        """What the simulated drivers enforce now."""
        return [g.read().enforced_limit_mw / 1000 for g in self.gpus]

    async def wait_job(self, *states: int, timeout_s: float = 30.0) -> pals_pb2.ProfileJob:
        """Poll GetProfile until the job is in one of ``states``."""
        job: list[pals_pb2.ProfileJob] = []

        async def reached() -> bool:
            job[:] = [await self.admin.GetProfile(pals_pb2.GetProfileRequest(engine_id=ENGINE))]
            return job[0].state in states

        await eventually(reached, timeout_s)
        return job[0]


@contextlib.asynccontextmanager
async def sim_node(
    dirs: tuple[Path, Path], mode: str = "enforce", budget_w: float | None = None
) -> AsyncIterator[SimNode]:
    runtime, state = dirs
    clock = ScaledClock(SPEED)
    gpus = make_sim_gpus("A100-SXM4", 4, clock.now)
    config = DaemonConfig(
        backend="sim",
        mode=mode,
        period_s=PERIOD_S,
        runtime_dir=str(runtime),
        state_dir=str(state),
        engine_socket_group="",
        metrics_port=0,
        budget_w=budget_w,
        sim_gpu_kind="A100-SXM4",
        sim_gpu_count=4,
        sim_speed=SPEED,
        # Generous: on a loaded machine ticks come late in simulated time, and an expired directive would
        # put the engine back to its own batch limit (the profiler then measures the point again).
        directive_ttl_s=20.0,
    )
    runner = Runner(config, SimBackend(gpus), PROFILES, clock)
    decisions: list[Decision] = []
    step = runner.daemon.controller.step

    def recording_step(inp: Any) -> Decision:
        decision = step(inp)
        decisions.append(decision)
        return decision

    runner.daemon.controller.step = recording_step  # type: ignore[method-assign]
    ticks: list[tuple[Decision, Decision]] = []

    def record_tick(daemon: Any) -> None:
        if decisions and daemon.last_decision is not None:
            ticks.append((decisions[-1], daemon.last_decision))

    runner.daemon.on_tick.append(record_tick)
    await runner.start()
    control = asyncio.create_task(runner.run())
    requests = poisson_requests(RATE_PER_S, 3600.0, PROMPT_TOKENS, OUTPUT_TOKENS, seed=1)
    engine = SimEngine(ENGINE, load_a100_truth(MODEL), gpus, requests, MAX_NUM_SEQS, 8192, start_s=clock.now())
    link = SimEngineLink(
        engine,
        MODEL,
        [g.identity.uuid for g in gpus],
        str(config.engine_socket_path),
        clock,
        report_interval_s=PERIOD_S / 2,
    )
    stop = asyncio.Event()
    link_task = asyncio.create_task(link.run(stop))
    try:
        await eventually(lambda: runner.daemon.engines.get(ENGINE) is not None, 10.0)
        async with grpc.aio.insecure_channel(f"unix:{config.admin_socket_path}") as channel:
            yield SimNode(runner, gpus, engine, pals_pb2_grpc.PowerAdminStub(channel), clock, decisions, ticks)
    finally:
        stop.set()
        runner.daemon.request_stop()
        await asyncio.wait_for(control, 10.0)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
            await asyncio.wait_for(link_task, 5.0)


def request(**overrides: Any) -> pals_pb2.StartProfileRequest:
    values: dict[str, Any] = {
        "engine_id": ENGINE,
        "caps_w": [150.0, 300.0],
        "batches": [8, 64],
        "hold_s": 6.0,
        "settle_s": 2.0,
    }
    values.update(overrides)
    return pals_pb2.StartProfileRequest(**values)


# ------------------------------------------------------------------------------------------ the sweep


def test_sweep_writes_a_profile_that_matches_the_simulated_truth(dirs: tuple[Path, Path]) -> None:
    async def body() -> None:
        async with sim_node(dirs) as node:
            started = await node.admin.StartProfile(request())
            assert started.state == RUNNING
            assert started.points_total == 4
            default_path = Path(node.config.state_dir) / "profiles" / f"{ENGINE}-a100-sxm4-80gb.json"
            assert started.output_path == str(default_path)
            # While it runs the engine's GPUs hold the point's cap (the controller does not choose them).
            running_job = node.runner.daemon.profiler.jobs[ENGINE]
            await eventually(lambda: running_job.phase.value == "holding")
            # Checked at once (no await in between: the job cannot move on meanwhile).
            cap_w, batch = running_job.point
            assert node.enforced_w() == [cap_w] * 4
            assert node.engine.limits[0] == batch
            job = await node.admin.GetProfile(pals_pb2.GetProfileRequest(engine_id=ENGINE))
            assert job.state == RUNNING and job.HasField("current") and job.phase
            for decision in node.controller_decisions[-3:]:
                assert not set(decision.gpu_limits_w) & {0, 1, 2, 3}, "the controller was asked about pinned GPUs"
                assert ENGINE not in decision.engines
            done = await node.wait_job(DONE, FAILED, CANCELLED, timeout_s=40.0)
            assert done.state == DONE, done.error
            assert done.points_done == done.points_total == 4
            assert done.output_path == str(default_path)
            # The controller has the engine back.
            n = len(node.ticks)
            await eventually(lambda: len(node.ticks) >= n + 1)
            mine, applied = node.ticks[-1]
            assert ENGINE in mine.engines and applied.engines[ENGINE] == mine.engines[ENGINE]
            assert "profiling" not in applied.reason

        profile = load_profile(default_path)
        assert profile.model == MODEL
        assert profile.num_gpus == 4 and profile.parallelism == "tp4"
        assert profile.method == "measured"
        assert "measured online" in profile.source and ENGINE in profile.source
        assert profile.caps_w == (150.0, 300.0) and profile.batches == (8, 64)
        points = {(p.cap_w, p.batch): p for p in profile.points}
        truth = load_a100_truth(MODEL)
        for batch in (8, 64):
            low, high = points[150.0, batch], points[300.0, batch]
            assert low.tokens_per_s < high.tokens_per_s, (low, high)
            assert low.gpu_power_w < high.gpu_power_w, (low, high)
        for (cap, batch), p in points.items():
            want_tps = truth.throughput_tokens_per_s(cap, batch)
            want_w = truth.power_w(cap, batch)
            assert p.tokens_per_s == pytest.approx(want_tps, rel=0.15), (cap, batch, p, want_tps)
            assert p.gpu_power_w == pytest.approx(want_w, rel=0.15), (cap, batch, p, want_w)

    drive(body())


def test_cancel_gives_the_engine_back_to_the_controller(dirs: tuple[Path, Path]) -> None:
    async def body() -> None:
        async with sim_node(dirs) as node:
            await node.admin.StartProfile(request(caps_w=[100.0, 110.0], hold_s=600.0))
            await eventually(lambda: node.enforced_w() == [100.0] * 4)
            second = node.admin.StartProfile(request())
            await expect_rpc_error(second, grpc.StatusCode.FAILED_PRECONDITION, "already running", "cancel it first")
            cancelled = await node.admin.CancelProfile(pals_pb2.CancelProfileRequest(engine_id=ENGINE))
            assert cancelled.state == CANCELLED
            assert "cancelled" in cancelled.error
            n = len(node.ticks)
            await eventually(lambda: len(node.ticks) >= n + 2)
            # What is applied is the controller's own decision again, the engine's GPUs and batch included.
            mine, applied = node.ticks[-1]
            assert set(mine.gpu_limits_w) == {0, 1, 2, 3}
            assert dict(applied.gpu_limits_w) == dict(mine.gpu_limits_w)
            assert applied.engines[ENGINE] == mine.engines[ENGINE]
            assert "profiling" not in applied.reason
            # A cancelled job stays visible, and cancelling again changes nothing.
            again = await node.admin.CancelProfile(pals_pb2.CancelProfileRequest(engine_id=ENGINE))
            assert again.state == CANCELLED and again.error == cancelled.error

    drive(body())


def test_a_gpu_capped_by_someone_else_below_a_point_fails_the_job_clearly(dirs: tuple[Path, Path]) -> None:
    """An external cap under a point's cap: the job fails naming the GPU, instead of measuring the wrong cap."""

    async def body() -> None:
        async with sim_node(dirs) as node:
            node.gpus[2].set_external_limit_w(200.0)  # another tool caps GPU 2 at 200 W
            await eventually(lambda: node.runner.daemon.gpus[2].external_cap_mw is not None)
            await node.admin.StartProfile(request(caps_w=[300.0, 350.0]))
            job = await node.wait_job(FAILED)
            assert "GPU 2 is capped at 200 W by someone else" in job.error and "300 W" in job.error
            assert job.points_done == 0

    drive(body())


def test_stop_during_a_sweep_restores_the_original_limits(dirs: tuple[Path, Path]) -> None:
    async def body() -> None:
        async with sim_node(dirs) as node:
            await node.admin.StartProfile(request(caps_w=[150.0, 200.0], hold_s=600.0))
            await eventually(lambda: node.enforced_w() == [150.0] * 4)
            job = node.runner.daemon.profiler.jobs[ENGINE]
            node.runner.daemon.request_stop()
            await eventually(lambda: not job.running)
            await eventually(lambda: node.enforced_w() == [400.0] * 4)
            assert "daemon stopped" in job.error

    drive(body())


def test_lowering_the_budget_mid_sweep_abandons_it_and_the_budget_holds(dirs: tuple[Path, Path]) -> None:
    async def body() -> None:
        async with sim_node(dirs) as node:
            await node.admin.StartProfile(request(caps_w=[250.0, 300.0], hold_s=600.0))
            await eventually(lambda: node.enforced_w() == [250.0] * 4)
            await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=800))
            # SetBudget ticks before returning: the limits already fit.
            assert sum(node.enforced_w()) <= 800
            job = await node.admin.GetProfile(pals_pb2.GetProfileRequest(engine_id=ENGINE))
            assert job.state == FAILED
            assert "budget" in job.error and "800 W" in job.error

    drive(body())


def test_points_over_the_budget_are_refused(dirs: tuple[Path, Path]) -> None:
    async def body() -> None:
        async with sim_node(dirs, budget_w=1000.0) as node:
            await expect_rpc_error(
                node.admin.StartProfile(request(caps_w=[200.0, 300.0])),
                grpc.StatusCode.FAILED_PRECONDITION,
                "caps [300.0] W x 4 GPUs",
                "exceed the budget of 1000 W",
            )
            await expect_rpc_error(
                node.admin.GetProfile(pals_pb2.GetProfileRequest(engine_id=ENGINE)), grpc.StatusCode.NOT_FOUND
            )
            # Within the budget it runs.
            job = await node.admin.StartProfile(request(caps_w=[200.0, 250.0], hold_s=600.0))
            assert job.state == RUNNING

    drive(body())


# ------------------------------------------------------------------------------------------ refusals


BAD_REQUESTS = [
    (request(engine_id="nope"), "not connected"),
    (request(engine_id="bad id!"), "engine_id"),
    (request(caps_w=[50.0, 300.0]), "outside GPU 0's power limit range [100, 400] W"),
    (request(caps_w=[150.0, 450.0]), "outside GPU 0's power limit range"),
    (request(caps_w=[math.nan, 300.0]), "caps_w[0] must be a finite number"),
    (request(caps_w=[150.0, math.inf]), "caps_w[1] must be a finite number"),
    (request(caps_w=[150.0]), "caps_w needs at least 2 values"),
    (request(caps_w=[150.0, 150.0]), "caps_w lists a value twice"),
    (request(batches=[0, 8]), "batch 0 is outside [1, 64]"),
    (request(batches=[8, 65]), "batch 65 is outside [1, 64]"),
    (request(batches=[8]), "batches needs at least 2 values"),
    (request(caps_w=[100.0 + k for k in range(15)], batches=list(range(1, 15))), "at most 200"),
    (request(hold_s=0.1), "hold_s must be within [0.5, 600]"),
    (request(hold_s=601), "hold_s must be within [0.5, 600]"),
    (request(hold_s=math.nan), "hold_s must be a finite number"),
    (request(settle_s=-1), "settle_s must be within [0, 600]"),
    (request(settle_s=math.inf), "settle_s must be a finite number"),
    (request(output_path="relative.json"), "must be an absolute path ending in .json"),
    (request(output_path="/tmp/profile.txt"), "must be an absolute path ending in .json"),
    (request(output_path="/nonexistent-dir/p.json"), "does not exist"),
]


def test_invalid_requests_are_refused_and_start_nothing(dirs: tuple[Path, Path]) -> None:
    async def body() -> None:
        async with sim_node(dirs) as node:
            for bad, fragment in BAD_REQUESTS:
                await expect_rpc_error(node.admin.StartProfile(bad), grpc.StatusCode.INVALID_ARGUMENT, fragment)
            await expect_rpc_error(
                node.admin.GetProfile(pals_pb2.GetProfileRequest(engine_id=ENGINE)), grpc.StatusCode.NOT_FOUND
            )
            await expect_rpc_error(
                node.admin.CancelProfile(pals_pb2.CancelProfileRequest(engine_id=ENGINE)), grpc.StatusCode.NOT_FOUND
            )
            assert node.runner.daemon.profiler.jobs == {}

    drive(body())


def test_advise_mode_refuses_to_profile(dirs: tuple[Path, Path]) -> None:
    async def body() -> None:
        async with sim_node(dirs, mode="advise") as node:
            await expect_rpc_error(
                node.admin.StartProfile(request()), grpc.StatusCode.FAILED_PRECONDITION, "enforce mode", "advise"
            )
            assert node.runner.daemon.profiler.jobs == {}
            assert all(not g.calls for g in node.gpus)

    drive(body())


# ------------------------------------------------------------------------------------------ palsctl


def test_palsctl_profile_wait_prints_progress_and_the_path(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "out" / "mixtral.json"
    out_path.parent.mkdir()

    async def body() -> tuple[int, int, int]:
        async with sim_node(dirs) as node:
            sock = str(node.config.admin_socket_path)
            # palsctl is a blocking client: run it off the loop the daemon runs on.
            rc = await asyncio.to_thread(
                palsctl.main,
                [
                    "--socket",
                    sock,
                    "profile",
                    ENGINE,
                    "--caps",
                    "150,300",
                    "--batches",
                    "8,64",
                    "--hold",
                    "3",
                    "--settle",
                    "1",
                    "--output",
                    str(out_path),
                    "--wait",
                    "--poll",
                    "0.05",
                ],
            )
            rc_status = await asyncio.to_thread(palsctl.main, ["--socket", sock, "profile", ENGINE, "--status"])
            rc_usage = await asyncio.to_thread(palsctl.main, ["--socket", sock, "profile", ENGINE, "--caps", "1,2"])
            return rc, rc_status, rc_usage

    rc, rc_status, rc_usage = drive(body())
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "started" in captured.out and "4 points" in captured.out
    assert "point 1/4" in captured.out
    assert f"profile written to {out_path}" in captured.out
    assert rc_status == 0 and "done 4/4" in captured.out
    assert rc_usage == palsctl.EXIT_USAGE and "--batches" in captured.err
    assert len(load_profile(out_path).points) == 4
