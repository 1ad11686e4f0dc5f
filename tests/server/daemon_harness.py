"""A real daemon in this process for the access, session and fuzz tests: Runner on four simulated A100s,
enforce mode, real gRPC over real Unix sockets, clients on both sockets (shared by the in-process daemon,
access, session and fuzz tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import async_helpers
import grpc
import pytest

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.clock import MonotonicClock
from pals_daemon.config import DaemonConfig
from pals_daemon.model.profile import load_profiles
from pals_daemon.server.daemon import default_profiles_dir
from pals_daemon.server.limits import EngineLimits
from pals_daemon.server.runner import Runner
from pals_daemon.sim.gpu import SimBackend, SimGpu, make_sim_gpus

T = TypeVar("T")

PROFILES = load_profiles(default_profiles_dir())
# A model with a profile for 4x A100-SXM4 (profiles/mixtral-8x7b-instruct.a100-sxm4.tp4.json).
MODEL = "mixtral-8x7b-instruct"
ORIGINAL_MW = 400_000
MIN_MW = 100_000
PERIOD_S = 0.1
TEST_TIMEOUT_S = 60.0


def drive(coro: Coroutine[Any, Any, T], timeout_s: float = TEST_TIMEOUT_S) -> T:
    """Run one test coroutine with a hard timeout."""
    return async_helpers.drive(coro, timeout_s)


@dataclass(frozen=True)
class Dirs:
    runtime: Path
    state: Path


@pytest.fixture
def dirs(short_tmp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dirs]:
    """Runtime dir (short, for the sockets) and state dir; no systemd; the process umask put back afterwards."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    umask = os.umask(0o022)
    os.umask(umask)
    yield Dirs(runtime=short_tmp / "run", state=tmp_path / "state")
    os.umask(umask)  # Runner.start sets 0077 for the whole process


def make_config(dirs: Dirs, **overrides: Any) -> DaemonConfig:
    values: dict[str, Any] = {
        "backend": "sim",
        "runtime_dir": str(dirs.runtime),
        "state_dir": str(dirs.state),
        "engine_socket_group": "",
        "metrics_port": 0,
        "period_s": PERIOD_S,
        "directive_ttl_s": 1.0,
    }
    values.update(overrides)
    return DaemonConfig(**values)


def make_runner(dirs: Dirs, engine_limits: EngineLimits | None = None, **overrides: Any) -> tuple[Runner, list[SimGpu]]:
    clock = MonotonicClock()
    gpus = make_sim_gpus("A100-SXM4", 4, clock.now)
    runner = Runner(make_config(dirs, **overrides), SimBackend(gpus), PROFILES, clock)
    if engine_limits is not None:
        runner.engine_limits = engine_limits  # read when the servers start
    return runner, gpus


@dataclass
class Node:
    """A started Runner whose run() is a task, with clients on both sockets."""

    runner: Runner
    gpus: list[SimGpu]
    admin: pals_pb2_grpc.PowerAdminStub
    engine: pals_pb2_grpc.EngineLinkStub
    admin_channel: grpc.aio.Channel
    engine_channel: grpc.aio.Channel
    run_task: asyncio.Task[None]

    @property
    def config(self) -> DaemonConfig:
        return self.runner.config

    def enforced_mw(self) -> list[int]:
        """What the simulated drivers enforce now (ground truth, not the daemon's view)."""
        return [g.read().enforced_limit_mw for g in self.gpus]

    def calls(self) -> list[list[tuple[str, int]]]:
        return [list(g.calls) for g in self.gpus]

    @property
    def state_path(self) -> Path:
        return Path(self.config.state_dir) / "state.json"

    def state_bytes(self) -> bytes:
        return self.state_path.read_bytes()

    def state_file(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text())

    async def stop(self) -> None:
        """What SIGTERM does: request_stop(), then run() shuts everything down."""
        self.runner.daemon.request_stop()
        await asyncio.wait_for(self.run_task, 10.0)


@contextlib.asynccontextmanager
async def running(dirs: Dirs, engine_limits: EngineLimits | None = None, **overrides: Any) -> AsyncIterator[Node]:
    runner, gpus = make_runner(dirs, engine_limits, **overrides)
    await runner.start()
    task = asyncio.create_task(runner.run())
    cfg = runner.config
    try:
        async with (
            grpc.aio.insecure_channel(f"unix:{cfg.admin_socket_path}") as admin_channel,
            grpc.aio.insecure_channel(f"unix:{cfg.engine_socket_path}") as engine_channel,
        ):
            yield Node(
                runner,
                gpus,
                pals_pb2_grpc.PowerAdminStub(admin_channel),
                pals_pb2_grpc.EngineLinkStub(engine_channel),
                admin_channel,
                engine_channel,
                task,
            )
    finally:
        runner.daemon.request_stop()
        await asyncio.wait_for(task, 10.0)


def register(
    engine_id: str = "e1", *, indices: list[int] | None = None, max_num_seqs: int = 256, model: str = MODEL
) -> pals_pb2.EngineMessage:
    return pals_pb2.EngineMessage(
        register=pals_pb2.Register(
            engine_id=engine_id,
            model=model,
            gpu_indices=[0, 1, 2, 3] if indices is None else indices,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=8192,
            client_version="test",
        )
    )


def step(**fields: Any) -> pals_pb2.EngineMessage:
    values: dict[str, Any] = {
        "window_s": PERIOD_S / 2,
        "num_steps": 5,
        "busy_s": PERIOD_S / 2,
        "num_running": 64,
        "num_waiting": 8,
        "prefill_tokens": 200,
        "decode_tokens": 400,
        "kv_cache_usage": 0.4,
        "arrived_requests": 2,
    }
    values.update(fields)
    return pals_pb2.EngineMessage(step=pals_pb2.StepReport(**values))


async def read_message(call: Any, timeout_s: float = 3.0) -> pals_pb2.DaemonMessage:
    msg = await asyncio.wait_for(call.read(), timeout_s)
    assert msg is not grpc.aio.EOF, "stream ended"
    return msg


async def drain(call: Any) -> None:
    """Read (and drop) directives until the stream ends; errors end it too."""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        while await call.read() is not grpc.aio.EOF:
            pass
