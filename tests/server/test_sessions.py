"""Engine sessions end cleanly: a disconnect or a crash is noticed at once, the engine's GPUs get their idle
allocation in a tick that runs right away (not at the end of the period), and the engine can come back.

The period here is long (PERIOD_LONG_S) so that a prompt tick can only come from the wake-up on disconnect.
Figures: run with ``-s`` to see the measured detection and follow-up-tick latencies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import grpc
from daemon_harness import (
    ORIGINAL_MW,
    Dirs,
    Node,
    drain,
    drive,
    read_message,
    register,
    running,
    step,
)

from pals_daemon.api import pals_pb2

# Long enough that "a tick within one period" cannot happen by the timer during the test's bound below.
PERIOD_LONG_S = 5.0
# Generous bound (the figures are milliseconds): only a missing wake-up or a missed disconnect exceeds it.
PROMPT_S = 1.0
# tokens/s: met by the engine's reports (step() below) at the lowest profiled cap.
LOW_TARGET = 100.0


class Timeline:
    """perf_counter times of unregistrations and ticks, recorded by the daemon's own code paths."""

    def __init__(self, node: Node) -> None:
        daemon = node.runner.daemon
        self.unregistered: list[tuple[str, float]] = []
        self.ticks: list[tuple[float, list[int]]] = []
        registry = daemon.engines
        original = registry.unregister

        def unregister(session: Any) -> None:
            original(session)
            self.unregistered.append((session.registration.engine_id, time.perf_counter()))

        registry.unregister = unregister  # type: ignore[method-assign]
        daemon.on_tick.append(lambda d: self.ticks.append((time.perf_counter(), node.enforced_mw())))

    def first_tick_after(self, t: float) -> tuple[float, list[int]] | None:
        return next(((ts, mw) for ts, mw in self.ticks if ts > t), None)

    async def wait_tick_after(self, t: float) -> tuple[float, list[int]]:
        await wait_for(lambda: self.first_tick_after(t), PROMPT_S)
        tick = self.first_tick_after(t)
        assert tick is not None
        return tick


async def set_low_target(node: Node, engine_id: str = "e1") -> None:
    """A throughput target the engine meets at a low cap: the controller then caps its GPUs (200 W here)."""
    await node.admin.SetEngineTargets(
        pals_pb2.SetEngineTargetsRequest(engine_id=engine_id, targets=pals_pb2.EngineTargets(tokens_per_s=LOW_TARGET))
    )


async def capped_session(node: Node, engine_id: str = "e1") -> Any:
    """A connected engine, reporting until the controller has capped its GPUs below their default limit."""
    await set_low_target(node, engine_id)
    call = node.engine.Connect()
    await call.write(register(engine_id))
    assert (await read_message(call)).WhichOneof("body") == "registered"
    reader = asyncio.create_task(drain(call))
    for _ in range(200):
        await call.write(step())
        node.runner.daemon.wake()
        await asyncio.sleep(0.02)
        if all(mw < ORIGINAL_MW for mw in node.enforced_mw()):
            break
    assert all(mw < ORIGINAL_MW for mw in node.enforced_mw()), node.enforced_mw()
    return call, reader


async def wait_for(predicate: Any, timeout_s: float) -> None:
    deadline = time.perf_counter() + timeout_s
    while not predicate():
        assert time.perf_counter() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


def test_disconnect_lapses_the_session_and_a_tick_restores_the_gpus_at_once(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs, period_s=PERIOD_LONG_S, directive_ttl_s=2 * PERIOD_LONG_S) as node:
            timeline = Timeline(node)
            call, reader = await capped_session(node)
            cancelled_at = time.perf_counter()
            call.cancel()
            await wait_for(lambda: timeline.unregistered, PROMPT_S)
            (engine_id, gone_at) = timeline.unregistered[0]
            assert engine_id == "e1"
            await wait_for(lambda: timeline.first_tick_after(gone_at), PROMPT_S)
            tick_at, mw = timeline.first_tick_after(gone_at)  # type: ignore[misc]
            # No engine, no budget: every GPU is back at its default limit in that one tick.
            assert mw == [ORIGINAL_MW] * 4
            assert node.runner.daemon.engines.sessions() == []
            assert tick_at - cancelled_at < PERIOD_LONG_S / 2
            print(
                f"\ncancel: unregistered after {(gone_at - cancelled_at) * 1e3:.1f} ms, "
                f"idle-allocation tick {(tick_at - gone_at) * 1e3:.1f} ms later"
            )
            reader.cancel()

    drive(body())


def test_disconnect_under_a_budget_gives_the_gpus_their_idle_share_within_budget(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs, period_s=PERIOD_LONG_S, directive_ttl_s=2 * PERIOD_LONG_S, budget_w=1200.0) as node:
            timeline = Timeline(node)
            call, reader = await capped_session(node)
            capped = node.enforced_mw()
            call.cancel()
            await wait_for(lambda: timeline.unregistered, PROMPT_S)
            gone_at = timeline.unregistered[0][1]
            await wait_for(lambda: timeline.first_tick_after(gone_at), PROMPT_S)
            _, mw = timeline.first_tick_after(gone_at)  # type: ignore[misc]
            # Idle GPUs under a 1200 W budget: the idle allocation (not the engine's caps), within budget
            # and each within its constraints.
            assert mw != capped
            assert sum(mw) <= 1_200_000
            assert all(100_000 <= m <= ORIGINAL_MW for m in mw)
            assert node.runner.daemon.last_decision is not None
            assert node.runner.daemon.last_decision.engines == {}
            reader.cancel()

    drive(body())


CLIENT = textwrap.dedent(
    """
    import sys, time
    import grpc
    from pals_daemon.api import pals_pb2, pals_pb2_grpc

    channel = grpc.insecure_channel("unix:" + sys.argv[1])
    stub = pals_pb2_grpc.EngineLinkStub(channel)
    reg = pals_pb2.Register(engine_id="e1", model=sys.argv[2], gpu_indices=[0, 1, 2, 3],
                            max_num_seqs=256, max_num_batched_tokens=8192, client_version="crash-test")
    step = pals_pb2.StepReport(window_s=0.05, num_steps=5, busy_s=0.05, num_running=64, num_waiting=8,
                               prefill_tokens=200, decode_tokens=400, kv_cache_usage=0.4, arrived_requests=2)

    def messages():
        yield pals_pb2.EngineMessage(register=reg)
        while True:
            time.sleep(0.02)
            yield pals_pb2.EngineMessage(step=step)

    for msg in stub.Connect(messages()):
        if msg.WhichOneof("body") == "registered":
            print("registered", flush=True)
    """
)


def test_a_killed_engine_is_noticed_within_milliseconds_and_can_come_back(dirs: Dirs, tmp_path: Path) -> None:
    async def body() -> None:
        script = tmp_path / "client.py"
        script.write_text(CLIENT)
        async with running(dirs, period_s=PERIOD_LONG_S, directive_ttl_s=2 * PERIOD_LONG_S) as node:
            timeline = Timeline(node)
            daemon = node.runner.daemon
            detections_ms = []
            session_ids = []
            for _ in range(3):
                proc = subprocess.Popen(
                    [sys.executable, str(script), str(node.config.engine_socket_path), "mixtral-8x7b-instruct"],
                    stdout=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                )
                try:
                    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20.0)  # type: ignore[union-attr]
                    assert line.strip() == "registered"
                    session = daemon.engines.get("e1")
                    assert session is not None
                    if not session_ids:
                        await set_low_target(node)
                    for _ in range(200):  # reports flow and the controller caps the GPUs
                        daemon.wake()
                        await asyncio.sleep(0.02)
                        if all(mw < ORIGINAL_MW for mw in node.enforced_mw()):
                            break
                    assert all(mw < ORIGINAL_MW for mw in node.enforced_mw())
                    timeline.unregistered.clear()
                    killed_at = time.perf_counter()
                    proc.send_signal(signal.SIGKILL)
                    await wait_for(lambda: timeline.unregistered, PROMPT_S)
                    gone_at = timeline.unregistered[-1][1]
                    tick = await timeline.wait_tick_after(gone_at)
                    tick_at, mw = tick
                    assert mw == [ORIGINAL_MW] * 4
                    assert tick_at - killed_at < PERIOD_LONG_S / 2
                    detections_ms.append(((gone_at - killed_at) * 1e3, (tick_at - killed_at) * 1e3))
                    # The next attempt is the same engine id coming back: a new session, not refused.
                    assert daemon.engines.get("e1") is None
                    session_ids.append(session.session_id)
                finally:
                    proc.kill()
                    proc.wait()
            assert len(set(session_ids)) == 3
            print("\nSIGKILL -> unregistered, -> GPUs at default (ms):", [f"{a:.1f}/{b:.1f}" for a, b in detections_ms])

    drive(body())


def test_a_returning_engine_resumes_with_its_targets_and_history(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            daemon = node.runner.daemon
            call, reader = await capped_session(node)
            first_id = daemon.engines.get("e1").session_id  # type: ignore[union-attr]
            await wait_for(lambda: "e1" in daemon.engine_stats, 3.0)
            stats_before = daemon.engine_stats["e1"]
            call.cancel()
            await wait_for(lambda: daemon.engines.get("e1") is None, PROMPT_S)
            await wait_for(lambda: node.enforced_mw() == [ORIGINAL_MW] * 4, PROMPT_S)
            # Back under the same id, at once: accepted as a new session; stats and targets carried over.
            again = node.engine.Connect()
            await again.write(register("e1"))
            registered = await read_message(again)
            assert registered.registered.session_id not in ("", first_id)
            directive = None
            for _ in range(100):
                await again.write(step())
                msg = await read_message(again)
                if msg.WhichOneof("body") == "directive":
                    directive = msg.directive
                    break
            assert directive is not None and 1 <= directive.max_num_seqs <= 256
            assert daemon.engine_stats["e1"] is stats_before
            status = daemon.engine_status("e1")
            assert status.connected and status.targets.tokens_per_s == LOW_TARGET
            # And it is controlled again: its GPUs go back down to the cap that meets its target.
            reader2 = asyncio.create_task(drain(again))
            for _ in range(200):
                await again.write(step())
                await asyncio.sleep(0.02)
                if all(mw < ORIGINAL_MW for mw in node.enforced_mw()):
                    break
            assert all(mw < ORIGINAL_MW for mw in node.enforced_mw())
            reader2.cancel()
            again.cancel()
            reader.cancel()

    drive(body())


def test_a_second_live_session_under_the_same_id_is_refused_and_the_first_keeps_running(dirs: Dirs) -> None:
    """Decided: a live session is not replaced by a newcomer (two processes would fight over the GPUs);
    the newcomer is refused until the first one's stream ends, which the daemon notices in milliseconds."""

    async def body() -> None:
        async with running(dirs) as node:
            first = node.engine.Connect()
            await first.write(register("e1"))
            await read_message(first)
            second = node.engine.Connect()
            await second.write(register("e1"))
            try:
                await read_message(second)
                raise AssertionError("a second live session under the same id was accepted")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "already connected" in (exc.details() or "")
            await first.write(step())
            assert (await read_message(first)).WhichOneof("body") == "directive"
            first.cancel()

    drive(body())
