"""The daemon in this process: a Runner on the simulated backend, driven by grpc.aio clients on the same loop.

No pytest-asyncio: every test is a sync function running one coroutine with ``drive()``.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import async_helpers
import grpc
import pytest
from async_helpers import expect_rpc_error
from daemon_harness import (
    MODEL,
    ORIGINAL_MW,
    PERIOD_S,
    Dirs,
    Node,
    make_config,
    make_runner,
    running,
)
from daemon_harness import drive as harness_drive
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pals_daemon.api import pals_pb2
from pals_daemon.errors import SocketInUseError
from pals_daemon.server import validate
from pals_daemon.sim.gpu import SET_POWER_LIMIT

T = TypeVar("T")

# Shared build of the daemon under test (tests/server/daemon_harness.py); this file's own timeouts below.
TEST_TIMEOUT_S = 30.0


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test coroutine with this file's hard timeout."""
    return harness_drive(coro, TEST_TIMEOUT_S)


async def eventually(predicate: Callable[[], Awaitable[bool] | bool], timeout_s: float = 3.0) -> None:
    """Poll ``predicate`` until it holds (this file's default patience)."""
    await async_helpers.eventually(predicate, timeout_s)


# ------------------------------------------------------------------------------------------ PowerAdmin


def test_get_status_lists_the_four_gpus(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            status = await node.admin.GetStatus(pals_pb2.GetStatusRequest())
            assert [g.index for g in status.gpus] == [0, 1, 2, 3]
            assert len({g.uuid for g in status.gpus}) == 4
            for g in status.gpus:
                assert (g.min_limit_w, g.max_limit_w) == (100.0, 400.0)
                assert g.enforced_limit_w == 400.0
                assert g.controlled
            assert status.controller.mode == "enforce"
            assert status.controller.backend == "sim"
            assert status.controller.ticks >= 1
            assert not status.budget.HasField("budget_w")
            assert (status.budget.min_budget_w, status.budget.max_budget_w) == (400.0, 1600.0)
            # No budget, no engines: every GPU stays at its default limit, so nothing was written.
            assert node.calls() == [[], [], [], []]

    drive(body())


def test_set_budget_is_enforced_before_the_call_returns(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            reply = await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=1000))
            # Checked at once: SetBudget runs a tick before replying, not at the next period.
            enforced = node.enforced_mw()
            calls = node.calls()
            assert reply.budget_w == 1000.0
            assert reply.effective_budget_w == 1000.0
            assert reply.sum_enforced_limits_w <= 1000.0
            assert sum(enforced) <= 1_000_000
            for gpu_calls in calls:
                assert gpu_calls, "every GPU had to be lowered from 400 W"
                assert all(name == SET_POWER_LIMIT and mw < ORIGINAL_MW for name, mw in gpu_calls)
            state = node.state_file()
            assert state["budget_w"] == 1000.0
            # The originals are on disk before the first write.
            assert {o["limit_mw"] for o in state["original_limits"].values()} == {ORIGINAL_MW}
            assert len(state["original_limits"]) == 4
            budget = await node.admin.GetBudget(pals_pb2.GetBudgetRequest())
            assert budget.budget_w == 1000.0

    drive(body())


BAD_BUDGETS = [
    (pals_pb2.SetBudgetRequest(budget_w=math.nan), "budget_w must be a finite number"),
    (pals_pb2.SetBudgetRequest(budget_w=math.inf), "budget_w must be a finite number"),
    (pals_pb2.SetBudgetRequest(budget_w=-5), "budget_w must be within"),
    (pals_pb2.SetBudgetRequest(budget_w=0), "below the sum of the GPUs' minimum limits (400 W)"),
    (pals_pb2.SetBudgetRequest(budget_w=399), "below the sum of the GPUs' minimum limits (400 W)"),
    (pals_pb2.SetBudgetRequest(budget_w=500, clear=True), "either a budget or clear"),
    (pals_pb2.SetBudgetRequest(budget_w=800, ramp_s=math.nan), "ramp_s must be a finite number"),
    (pals_pb2.SetBudgetRequest(budget_w=800, ramp_s=-1), "ramp_s must be within"),
    (pals_pb2.SetBudgetRequest(clear=True, ramp_s=math.inf), "ramp_s must be a finite number"),
]


def test_invalid_budgets_are_refused_and_change_nothing(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=1000))
            before_budget = await node.admin.GetBudget(pals_pb2.GetBudgetRequest())
            before_state = node.state_path.read_bytes()
            before_calls = node.calls()
            before_enforced = node.enforced_mw()
            for request, message in BAD_BUDGETS:
                await expect_rpc_error(node.admin.SetBudget(request), grpc.StatusCode.INVALID_ARGUMENT, message)
            await asyncio.sleep(3 * PERIOD_S)  # let the loop tick: a refused budget must not leak in later
            after_budget = await node.admin.GetBudget(pals_pb2.GetBudgetRequest())
            assert after_budget.budget_w == before_budget.budget_w == 1000.0
            assert after_budget.effective_budget_w == 1000.0
            assert after_budget.ramp_remaining_s == 0.0
            assert node.state_path.read_bytes() == before_state
            assert node.calls() == before_calls
            assert node.enforced_mw() == before_enforced
            # The smallest valid budget is exactly the sum of the minimums.
            reply = await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=400))
            assert reply.budget_w == 400.0
            assert node.enforced_mw() == [100_000] * 4

    drive(body())


def test_clear_removes_the_budget_and_raises_the_limits_again(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=600))
            assert sum(node.enforced_mw()) <= 600_000
            reply = await node.admin.SetBudget(pals_pb2.SetBudgetRequest(clear=True))
            assert not reply.HasField("budget_w")
            assert not reply.HasField("effective_budget_w")
            assert node.enforced_mw() == [ORIGINAL_MW] * 4
            assert node.state_file()["budget_w"] is None
            status = await node.admin.GetStatus(pals_pb2.GetStatusRequest())
            assert not status.budget.HasField("budget_w")

    drive(body())


def test_ramp_moves_the_budget_gradually_and_every_tick_stays_within_it(dirs: Dirs) -> None:
    ramp_s = 1.0

    async def body() -> None:
        async with running(dirs) as node:
            await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=1000))
            daemon = node.runner.daemon
            budgets: list[float | None] = []
            samples: list[tuple[float | None, int]] = []
            step = daemon.controller.step

            def recording_step(inp: Any) -> Any:
                budgets.append(inp.budget_w)
                return step(inp)

            daemon.controller.step = recording_step  # type: ignore[method-assign]
            # After each tick applied its limits: (budget that tick decided under, what the drivers enforce).
            daemon.on_tick.append(lambda d: samples.append((budgets[-1], sum(node.enforced_mw()))))

            reply = await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=600, ramp_s=ramp_s))
            assert reply.budget_w == 600.0
            assert 0.0 < reply.ramp_remaining_s <= ramp_s
            await asyncio.sleep(ramp_s / 2)
            mid = await node.admin.GetBudget(pals_pb2.GetBudgetRequest())
            assert mid.budget_w == 600.0
            assert 600.0 < mid.effective_budget_w < 1000.0
            assert 0.0 < mid.ramp_remaining_s < ramp_s
            assert 600_000 < sum(node.enforced_mw()) < 1_000_000
            await asyncio.sleep(ramp_s / 2 + 3 * PERIOD_S)
            done = await node.admin.GetBudget(pals_pb2.GetBudgetRequest())
            assert done.effective_budget_w == 600.0
            assert done.ramp_remaining_s == 0.0
            assert sum(node.enforced_mw()) <= 600_000

            assert len(samples) >= 5
            intermediate = [b for b, _ in samples if b is not None and 600.0 < b < 1000.0]
            assert len(intermediate) >= 3, samples
            assert [b for b, _ in samples] == sorted((b for b, _ in samples), reverse=True)  # type: ignore[type-var]
            for budget_w, enforced_mw in samples:
                assert budget_w is not None
                assert enforced_mw <= budget_w * 1000 + 1e-6, (budget_w, enforced_mw)

    drive(body())


def test_set_engine_targets_validates_and_persists(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            t = pals_pb2.EngineTargets
            bad = [
                ("bad id!", t(tokens_per_s=100), "engine_id"),
                ("", t(tokens_per_s=100), "engine_id"),
                ("e" * 65, t(tokens_per_s=100), "engine_id"),
                ("e1", t(tokens_per_s=math.nan), "tokens_per_s must be a finite number"),
                ("e1", t(ttft_ms=math.inf), "ttft_ms must be a finite number"),
                ("e1", t(tpot_ms=-3), "tpot_ms must be within"),
                ("e1", t(tokens_per_s=0), "tokens_per_s must be > 0"),
            ]
            for engine_id, targets, message in bad:
                request = pals_pb2.SetEngineTargetsRequest(engine_id=engine_id, targets=targets)
                await expect_rpc_error(node.admin.SetEngineTargets(request), grpc.StatusCode.INVALID_ARGUMENT, message)
            assert node.state_file()["targets"] == {}

            reply = await node.admin.SetEngineTargets(
                pals_pb2.SetEngineTargetsRequest(engine_id="e1", targets=t(tokens_per_s=500, ttft_ms=2000))
            )
            assert reply.engine_id == "e1"
            assert not reply.connected
            assert reply.targets.tokens_per_s == 500.0
            assert reply.targets.ttft_ms == 2000.0
            assert not reply.targets.HasField("tpot_ms")
            assert node.state_file()["targets"] == {"e1": {"tokens_per_s": 500.0, "ttft_ms": 2000.0, "tpot_ms": None}}
            # Replacing: unset fields are cleared.
            await node.admin.SetEngineTargets(pals_pb2.SetEngineTargetsRequest(engine_id="e1", targets=t(tpot_ms=50)))
            assert node.state_file()["targets"]["e1"] == {"tokens_per_s": None, "ttft_ms": None, "tpot_ms": 50.0}

            # A configured (not yet connected) engine shows in the status from the next tick.
            def shown() -> list[tuple[str, bool, float]]:
                return [(e.engine_id, e.connected, e.targets.tpot_ms) for e in node.runner.daemon.status.engines]

            await eventually(lambda: shown() == [("e1", False, 50.0)])
            status = await node.admin.GetStatus(pals_pb2.GetStatusRequest())
            (engine,) = status.engines
            assert not engine.targets.HasField("tokens_per_s")

    drive(body())


def test_targets_are_bounded_in_number_and_cleared_by_empty_targets(
    dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validate, "MAX_TARGET_ENGINES", 3)  # the real bound (1024) works the same, slower

    async def body() -> None:
        async with running(dirs) as node:
            t = pals_pb2.EngineTargets

            async def set_targets(engine_id: str, targets: Any) -> Any:
                request = pals_pb2.SetEngineTargetsRequest(engine_id=engine_id, targets=targets)
                return await node.admin.SetEngineTargets(request)

            for i in range(3):
                await set_targets(f"e{i}", t(tokens_per_s=100 + i))
            await expect_rpc_error(
                set_targets("e3", t(tokens_per_s=100)), grpc.StatusCode.INVALID_ARGUMENT, "at most 3 engines"
            )
            assert sorted(node.state_file()["targets"]) == ["e0", "e1", "e2"]  # nothing changed
            await set_targets("e1", t(tpot_ms=80))  # replacing a known engine's targets is always allowed
            await set_targets("e0", t())  # empty: the entry goes, and its place with it
            assert sorted(node.state_file()["targets"]) == ["e1", "e2"]
            await set_targets("e3", t(tokens_per_s=100))
            assert sorted(node.state_file()["targets"]) == ["e1", "e2", "e3"]

    drive(body())


def test_targets_and_budget_survive_a_restart(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=900))
            await node.admin.SetEngineTargets(
                pals_pb2.SetEngineTargetsRequest(engine_id="e1", targets=pals_pb2.EngineTargets(tokens_per_s=42))
            )
        async with running(dirs) as node:
            status = await node.admin.GetStatus(pals_pb2.GetStatusRequest())
            assert status.budget.budget_w == 900.0
            assert sum(node.enforced_mw()) <= 900_000
            (engine,) = status.engines
            assert engine.engine_id == "e1"
            assert engine.targets.tokens_per_s == 42.0

    drive(body())


def test_watch_status_streams_snapshots_with_increasing_ticks(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            call = node.admin.WatchStatus(pals_pb2.WatchStatusRequest())
            ticks = []
            async for status in call:
                ticks.append(status.controller.ticks)
                assert len(status.gpus) == 4
                if len(ticks) == 4:
                    break
            call.cancel()
            assert ticks == sorted(ticks)
            assert ticks[-1] > ticks[1] > ticks[0], ticks  # after the first (current) snapshot, one per tick
            await expect_rpc_error(
                _first(node.admin.WatchStatus(pals_pb2.WatchStatusRequest(interval_s=math.nan))),
                grpc.StatusCode.INVALID_ARGUMENT,
                "interval_s",
            )

    drive(body())


async def _first(call: Any) -> Any:
    async for item in call:
        return item
    return None


# ------------------------------------------------------------------------------------------ EngineLink


def register(
    engine_id: str = "e1",
    *,
    uuids: list[str] | None = None,
    indices: list[int] | None = None,
    max_num_seqs: int = 256,
    model: str = MODEL,
) -> pals_pb2.EngineMessage:
    return pals_pb2.EngineMessage(
        register=pals_pb2.Register(
            engine_id=engine_id,
            model=model,
            gpu_uuids=uuids or [],
            gpu_indices=indices or [],
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=8192,
            client_version="test",
        )
    )


def step(**fields: Any) -> pals_pb2.EngineMessage:
    values: dict[str, Any] = {
        "window_s": 0.05,
        "num_steps": 5,
        "busy_s": 0.05,
        "num_running": 32,
        "num_waiting": 4,
        "prefill_tokens": 200,
        "decode_tokens": 100,
        "kv_cache_usage": 0.4,
        "arrived_requests": 2,
    }
    values.update(fields)
    return pals_pb2.EngineMessage(step=pals_pb2.StepReport(**values))


def uuids_of(node: Node, *indices: int) -> list[str]:
    return [node.gpus[i].identity.uuid for i in indices]


async def read_message(call: Any, timeout_s: float = 3.0) -> pals_pb2.DaemonMessage:
    msg = await asyncio.wait_for(call.read(), timeout_s)
    assert msg is not grpc.aio.EOF, "stream ended"
    return msg


async def refused(node: Node, first: pals_pb2.EngineMessage, code: grpc.StatusCode, fragment: str) -> None:
    """A session whose first message is ``first`` ends with ``code`` before any Registered."""
    call = node.engine.Connect()
    await call.write(first)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await read_message(call)
    assert info.value.code() == code, info.value.details()
    assert fragment in (info.value.details() or "")


def test_engine_registers_and_receives_directives(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            call = node.engine.Connect()
            await call.write(register(uuids=uuids_of(node, 0, 1, 2, 3), max_num_seqs=128))
            first = await read_message(call)
            assert first.WhichOneof("body") == "registered"
            assert first.registered.session_id
            assert first.registered.report_interval_s == pytest.approx(PERIOD_S / 2)
            directives = []
            while len(directives) < 3:
                msg = await read_message(call)
                assert msg.WhichOneof("body") == "directive"
                directives.append(msg.directive)
            for d in directives:
                assert 1 <= d.max_num_seqs <= 128
                assert 1 <= d.max_num_batched_tokens <= 8192
                assert d.ttl_ms == 1000
            assert [d.sequence for d in directives] == sorted({d.sequence for d in directives})
            status = await node.admin.GetStatus(pals_pb2.GetStatusRequest())
            (engine,) = status.engines
            assert engine.connected and engine.model == MODEL
            assert list(engine.gpu_indices) == [0, 1, 2, 3]
            assert engine.configured_max_num_seqs == 128
            assert engine.has_profile
            assert {g.engine_id for g in status.gpus} == {"e1"}
            call.cancel()

    drive(body())


def test_step_reports_are_folded_into_the_engine_status(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            call = node.engine.Connect()
            await call.write(register(indices=[0, 1, 2, 3]))
            assert (await read_message(call)).WhichOneof("body") == "registered"

            async def report_forever() -> None:
                while True:
                    await call.write(step(decode_tokens=500, num_running=17, num_waiting=3))
                    await asyncio.sleep(PERIOD_S / 4)

            async def drain() -> None:
                while await call.read() is not grpc.aio.EOF:
                    pass

            tasks = [asyncio.create_task(report_forever()), asyncio.create_task(drain())]

            def engine_status() -> pals_pb2.EngineStatus:
                engines = node.runner.daemon.status.engines
                return engines[0] if engines else pals_pb2.EngineStatus()

            await eventually(lambda: engine_status().throughput_tokens_per_s > 0)
            e = engine_status()
            assert e.num_running == 17 and e.num_waiting == 3
            assert e.tokens_per_joule > 0  # tokens over the sim GPUs' energy
            for task in tasks:
                task.cancel()
            call.cancel()

    drive(body())


def test_first_message_must_be_register(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            await refused(node, step(), grpc.StatusCode.FAILED_PRECONDITION, "first message must be a Register")
            # An empty stream is not a registration either.
            call = node.engine.Connect()
            await call.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read_message(call)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert node.runner.daemon.engines.sessions() == []

    drive(body())


def test_bad_registrations_are_invalid_argument(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            invalid = grpc.StatusCode.INVALID_ARGUMENT
            await refused(node, register(uuids=["GPU-nope"]), invalid, "'GPU-nope' is not managed")
            await refused(node, register(indices=[7]), invalid, "GPU index 7 is not managed")
            await refused(node, register(uuids=uuids_of(node, 0), indices=[1]), invalid, "not both")
            await refused(node, register(), invalid, "at least one GPU")
            await refused(node, register(indices=[0], max_num_seqs=0), invalid, "max_num_seqs")
            await refused(node, register("bad id!", indices=[0]), invalid, "engine_id")
            assert node.runner.daemon.engines.sessions() == []
            status = await node.admin.GetStatus(pals_pb2.GetStatusRequest())
            assert list(status.engines) == []

    drive(body())


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"window_s": math.nan}, "window_s must be a finite number"),
        ({"kv_cache_usage": 1.5}, "kv_cache_usage must be within"),
        ({"busy_s": -1.0}, "busy_s must be within"),
    ],
)
def test_bad_step_report_ends_the_session(dirs: Dirs, fields: dict[str, float], fragment: str) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            call = node.engine.Connect()
            await call.write(register(indices=[0, 1]))
            assert (await read_message(call)).WhichOneof("body") == "registered"
            await call.write(step(**fields))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while True:
                    await read_message(call)  # directives may come first
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fragment in (info.value.details() or "")
            await eventually(lambda: node.runner.daemon.engines.get("e1") is None)
            assert node.runner.daemon.engine_stats.get("e1") is None or (
                node.runner.daemon.engine_stats["e1"].throughput_tokens_per_s == 0
            )

    drive(body())


def test_second_session_with_same_id_or_gpu_is_refused(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            call = node.engine.Connect()
            await call.write(register("e1", indices=[0, 1]))
            registered = await read_message(call)
            invalid = grpc.StatusCode.INVALID_ARGUMENT
            await refused(node, register("e1", indices=[2, 3]), invalid, "'e1' is already connected")
            await refused(node, register("e2", indices=[1, 2]), invalid, "already belong to engine 'e1'")
            await refused(node, register("e2", uuids=uuids_of(node, 0)), invalid, "already belong to engine 'e1'")
            # The first session is untouched and still live; a disjoint engine is welcome.
            session = node.runner.daemon.engines.get("e1")
            assert session is not None and session.session_id == registered.registered.session_id
            other = node.engine.Connect()
            await other.write(register("e2", indices=[2, 3]))
            assert (await read_message(other)).WhichOneof("body") == "registered"
            assert {s.registration.engine_id for s in node.runner.daemon.engines.sessions()} == {"e1", "e2"}
            other.cancel()
            call.cancel()

    drive(body())


def test_cancelled_session_is_unregistered_promptly(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            call = node.engine.Connect()
            await call.write(register(indices=[0, 1, 2, 3]))
            assert (await read_message(call)).WhichOneof("body") == "registered"
            assert node.runner.daemon.engines.get("e1") is not None
            call.cancel()
            loop = asyncio.get_running_loop()
            started = loop.time()
            await eventually(lambda: node.runner.daemon.engines.get("e1") is None, timeout_s=1.0)
            assert loop.time() - started < 1.0
            # The id is free again.
            again = node.engine.Connect()
            await again.write(register(indices=[0, 1, 2, 3]))
            assert (await read_message(again)).WhichOneof("body") == "registered"
            again.cancel()

    drive(body())


# ------------------------------------------------------------------------------------------ advise mode


def test_advise_mode_decides_but_never_applies(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs, mode="advise") as node:
            call = node.engine.Connect()
            await call.write(register(uuids=uuids_of(node, 0, 1, 2, 3), max_num_seqs=256))
            received: list[pals_pb2.DaemonMessage] = []

            async def collect() -> None:
                while (msg := await call.read()) is not grpc.aio.EOF:
                    received.append(msg)

            collector = asyncio.create_task(collect())
            for _ in range(6):
                await call.write(step(decode_tokens=800))
                await asyncio.sleep(PERIOD_S / 2)
            reply = await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=600))
            assert reply.budget_w == 600.0
            await asyncio.sleep(4 * PERIOD_S)

            assert [m.WhichOneof("body") for m in received] == ["registered"]
            assert node.calls() == [[], [], [], []]
            assert node.enforced_mw() == [ORIGINAL_MW] * 4
            status = await node.admin.GetStatus(pals_pb2.GetStatusRequest())
            assert status.controller.mode == "advise"
            decided = [g.decided_limit_w for g in status.gpus]
            assert all(100.0 <= d <= 400.0 for d in decided)
            assert sum(decided) <= 600.0
            assert [g.enforced_limit_w for g in status.gpus] == [400.0] * 4
            (engine,) = status.engines
            decision = node.runner.daemon.last_decision
            assert decision is not None
            assert engine.max_num_seqs_limit == decision.engines["e1"].max_num_seqs
            assert 1 <= engine.max_num_seqs_limit <= 256
            # Advise mode never records originals: it never writes.
            assert node.state_file()["original_limits"] == {}
            collector.cancel()
            call.cancel()

    drive(body())


# ------------------------------------------------------------------------------------------ shutdown


def test_stop_restores_every_gpu_and_removes_the_sockets(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=500))
            assert sum(node.enforced_mw()) <= 500_000
            assert len(node.state_file()["original_limits"]) == 4
            cfg = node.config
            assert cfg.admin_socket_path.exists() and cfg.engine_socket_path.exists()
            await node.stop()

            assert node.enforced_mw() == [ORIGINAL_MW] * 4
            for gpu_calls in node.calls():
                assert gpu_calls[-1] == (SET_POWER_LIMIT, ORIGINAL_MW)
                assert any(mw < ORIGINAL_MW for _, mw in gpu_calls)
            state = node.state_file()
            assert state["original_limits"] == {}
            assert state["budget_w"] == 500.0  # the budget is kept for the next start
            assert not cfg.admin_socket_path.exists()
            assert not cfg.engine_socket_path.exists()

    drive(body())


def test_stop_while_an_engine_is_connected_ends_its_session(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            call = node.engine.Connect()
            await call.write(register(indices=[0, 1, 2, 3]))
            assert (await read_message(call)).WhichOneof("body") == "registered"
            await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=500))
            await node.stop()
            with pytest.raises(grpc.aio.AioRpcError):
                while True:
                    await read_message(call)
            assert node.enforced_mw() == [ORIGINAL_MW] * 4

    drive(body())


# ------------------------------------------------------------------------------------------ health


def test_health_serving_on_both_sockets(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            for channel, service in (
                (node.admin_channel, "pals.v1.PowerAdmin"),
                (node.engine_channel, "pals.v1.EngineLink"),
            ):
                stub = health_pb2_grpc.HealthStub(channel)
                for name in ("", service):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Check(health_pb2.HealthCheckRequest(service="pals.v1.Nope"))
                assert info.value.code() == grpc.StatusCode.NOT_FOUND

    drive(body())


# ------------------------------------------------------------------------------------------ sockets


def test_socket_modes(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            admin = os.lstat(node.config.admin_socket_path)
            engine = os.lstat(node.config.engine_socket_path)
            assert stat.S_ISSOCK(admin.st_mode) and stat.S_ISSOCK(engine.st_mode)
            assert stat.S_IMODE(admin.st_mode) == 0o600
            assert stat.S_IMODE(engine.st_mode) == 0o660

    drive(body())


def test_second_runner_on_the_same_sockets_is_refused(dirs: Dirs, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            other_dirs = Dirs(runtime=dirs.runtime, state=tmp_path / "other-state")
            second, second_gpus = make_runner(other_dirs)
            with pytest.raises(SocketInUseError):
                await second.start()
            # The first daemon keeps its sockets and keeps answering.
            assert node.config.admin_socket_path.exists() and node.config.engine_socket_path.exists()
            status = await node.admin.GetStatus(pals_pb2.GetStatusRequest())
            assert len(status.gpus) == 4
            assert all(not g.calls for g in second_gpus)

    drive(body())


def test_regular_file_at_the_socket_path_is_refused_and_kept(dirs: Dirs) -> None:
    async def body() -> None:
        runner, gpus = make_runner(dirs)
        planted = runner.config.admin_socket_path
        planted.parent.mkdir(parents=True)
        planted.write_text("not a socket\n")
        with pytest.raises(SocketInUseError, match="not a socket"):
            await runner.start()
        assert planted.read_text() == "not a socket\n"
        assert not runner.config.engine_socket_path.exists()
        assert all(not g.calls for g in gpus)

    drive(body())


def test_stale_socket_is_replaced(dirs: Dirs) -> None:
    async def body() -> None:
        cfg = make_config(dirs)
        for path in (cfg.admin_socket_path, cfg.engine_socket_path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.bind(str(path))  # closed without unlinking: a daemon that died
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
        async with running(dirs) as node:
            status = await node.admin.GetStatus(pals_pb2.GetStatusRequest())
            assert len(status.gpus) == 4
            reply = await health_pb2_grpc.HealthStub(node.engine_channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    drive(body())
