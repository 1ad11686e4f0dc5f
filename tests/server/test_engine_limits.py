"""Issue 10 B2/B5: the engine socket's timeouts and stream caps, on an in-process daemon (real gRPC over real
Unix sockets) with the timeouts shortened so that each case takes well under a second of waiting.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from daemon_harness import Dirs, drain, drive, read_message, register, running, step

from pals_daemon.api import pals_pb2
from pals_daemon.clock import MonotonicClock
from pals_daemon.server.limits import (
    HEAP_COLLECT_AFTER_ABORTS,
    HEAP_TIDY_INTERVAL_S,
    CoalescedWake,
    EngineLimits,
    HeapTrimmer,
    ReportByteBudget,
)

SHORT = EngineLimits(first_message_timeout_s=0.3, silence_timeout_s=0.6)


def expert_report(gpu: int) -> pals_pb2.ExpertLoadReport:
    return pals_pb2.ExpertLoadReport(
        gpu_index=gpu, window_s=0.1, layers=[pals_pb2.LayerExpertLoad(tokens_per_expert=[1, 2, 3])]
    )


async def status_code_of(coro) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    raise AssertionError("the call ended without an error")


def test_a_connect_stream_that_never_registers_is_ended(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs, engine_limits=SHORT) as node:
            started = time.perf_counter()
            call = node.engine.Connect()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(call.read(), 5.0)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no Register within 0.3 s" in err.value.details()
            assert 0.25 < time.perf_counter() - started < 2.0
            assert node.runner.engine_link.timeouts == 1

    drive(body())


def test_a_silent_session_is_ended_and_its_engine_id_freed(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs, engine_limits=SHORT) as node:
            call = node.engine.Connect()
            await call.write(register("e1"))
            assert (await read_message(call)).WhichOneof("body") == "registered"
            assert node.runner.daemon.engines.get("e1") is not None
            # Reports keep it alive past the silence timeout...
            for _ in range(8):
                await call.write(step())
                await asyncio.sleep(0.1)
            assert node.runner.daemon.engines.get("e1") is not None
            # ...silence ends it, and the real engine can then register under its id.
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await asyncio.wait_for(call.read(), 5.0) is not grpc.aio.EOF:
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.perf_counter() - started < 2.0
            assert node.runner.daemon.engines.get("e1") is None
            again = node.engine.Connect()
            await again.write(register("e1"))
            assert (await read_message(again)).WhichOneof("body") == "registered"
            again.cancel()

    drive(body())


def test_expert_load_streams_are_capped_per_gpu_and_per_socket(dirs: Dirs) -> None:
    limits = EngineLimits(max_expert_streams_per_gpu=2, max_expert_streams=3)

    async def body() -> None:
        async with running(dirs, engine_limits=limits) as node:
            link = node.runner.engine_link
            queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(5)]

            async def feed(q: asyncio.Queue):
                while (item := await q.get()) is not None:
                    yield item

            def open_stream(i: int):
                return node.engine.ReportExpertLoad(feed(queues[i]))

            async def until(predicate) -> None:
                while not predicate():
                    await asyncio.sleep(0.01)

            # Two streams report GPU 0: both accepted.
            kept = [open_stream(0), open_stream(1)]
            for q in queues[:2]:
                await q.put(expert_report(0))
            await until(lambda: link.expert_streams_by_gpu.get(0) == 2)
            # A third on GPU 0 is refused (per GPU), when its report names it.
            over_gpu = open_stream(2)
            await queues[2].put(expert_report(0))
            assert await status_code_of(over_gpu) == grpc.StatusCode.RESOURCE_EXHAUSTED
            # With three streams open, a fourth is refused before it sends anything (per socket).
            kept.append(open_stream(3))
            await queues[3].put(expert_report(1))
            await until(lambda: link.expert_streams == 3)
            assert await status_code_of(open_stream(4)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            for i in (0, 1, 3):
                await queues[i].put(None)
            for call in kept:
                ack = await call
                assert ack.unattributed == 1  # no engine on those GPUs: counted, not refused
            assert link.expert_streams == 0 and all(v == 0 for v in link.expert_streams_by_gpu.values())

    drive(body())


def test_an_expert_stream_that_never_reports_is_ended(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs, engine_limits=SHORT) as node:
            idle = asyncio.Event()

            async def nothing():
                await idle.wait()
                yield expert_report(0)

            assert await status_code_of(node.engine.ReportExpertLoad(nothing())) == grpc.StatusCode.DEADLINE_EXCEEDED
            idle.set()
            assert node.runner.engine_link.expert_streams == 0

    drive(body())


def test_report_bytes_per_tick_hold_readers_until_the_next_tick(dirs: Dirs) -> None:
    # A budget of ~one step report per tick: a session sending ten at once gets them read over several ticks,
    # not all in one, and nothing is lost.
    async def body() -> None:
        async with running(dirs) as node:
            budget = node.runner.report_budget
            budget.bytes_per_tick = step().ByteSize()
            call = node.engine.Connect()
            await call.write(register("e1"))
            assert (await read_message(call)).WhichOneof("body") == "registered"
            reader = asyncio.create_task(drain(call))
            ticks_before = node.runner.daemon.ticks
            waits_before = budget.waits
            for _ in range(10):
                await call.write(step())
            deadline = time.perf_counter() + 20
            while node.runner.daemon.engine_stats.get("e1") is None or budget.waits - waits_before < 5:
                assert time.perf_counter() < deadline
                await asyncio.sleep(0.02)
            # One wait per tick at most (a wait is counted when it starts, so the 5th began after 4 refills).
            assert node.runner.daemon.ticks - ticks_before >= 4
            call.cancel()
            reader.cancel()

    drive(body())


def test_byte_budget_waits_only_while_spent() -> None:
    async def body() -> None:
        budget = ReportByteBudget(100)
        await asyncio.wait_for(budget.wait(), 0.1)  # fresh: no wait
        budget.charge(150)
        waiter = asyncio.create_task(budget.wait())
        await asyncio.sleep(0.05)
        assert not waiter.done() and budget.waits == 1
        budget.refill()
        await asyncio.wait_for(waiter, 1.0)

    drive(body())


def test_session_wakes_are_coalesced_after_a_burst() -> None:
    async def body() -> None:
        woken: list[float] = []
        wake = CoalescedWake(lambda: woken.append(time.perf_counter()), 0.1, MonotonicClock(), burst=3)
        started = time.perf_counter()
        for _ in range(1000):  # 1,000 session changes at once
            wake()
        assert len(woken) == 3  # the burst, at once
        await asyncio.sleep(0.35)
        # Then one wake per interval for everything that came meanwhile, however many changes that was.
        assert 4 <= len(woken) <= 5, len(woken)
        assert all(b - a >= 0.09 for a, b in zip(woken[2:], woken[3:], strict=False))
        assert wake.calls == 1000
        wake.cancel()
        assert time.perf_counter() - started < 1.0

    drive(body())


def test_heap_trimmer_collects_only_after_streams_were_ended() -> None:
    clock = [0.0]
    aborts = [0]
    trimmer = HeapTrimmer(lambda: aborts[0], now=lambda: clock[0])
    trimmer()
    assert trimmer.collections == 0  # nothing ended: no full collection
    aborts[0] = HEAP_COLLECT_AFTER_ABORTS
    clock[0] += HEAP_TIDY_INTERVAL_S / 2
    trimmer()
    assert trimmer.collections == 0  # within the interval: nothing at all
    clock[0] += HEAP_TIDY_INTERVAL_S
    trimmer()
    assert trimmer.collections == 1
    clock[0] += HEAP_TIDY_INTERVAL_S
    trimmer()
    assert trimmer.collections == 1  # no new aborts since
