"""Bad input over both services: explicit cases (fields, oversized messages, floods), then property-based fuzz.

The fuzz runs hypothesis-generated messages (NaN, Inf, huge, negative, garbage strings) against one real
daemon (simulated A100s, enforce mode, real gRPC on real sockets) that runs on its own thread and event loop,
with a well-behaved engine ("bg", GPUs 0 and 1) connected throughout so that decisions, directives and
profile jobs are live while the garbage arrives. Checked after every tick (a hook on the daemon's loop) and
after every example: every limit ever written is within the GPU's constraints, the sum of the enforced
limits never exceeds the budget that tick decided under, the daemon answers on both sockets, no handler
raised (gRPC's UNKNOWN), and a refused request changed nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from daemon_harness import (
    MIN_MW,
    MODEL,
    ORIGINAL_MW,
    PERIOD_S,
    Dirs,
    drain,
    drive,
    make_runner,
    read_message,
    register,
    running,
    step,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.server.engines import ReportRateLimit
from pals_daemon.server.limits import MAX_RECEIVE_MESSAGE_BYTES
from pals_daemon.sim.gpu import SET_POWER_LIMIT

# ------------------------------------------------------------------------------------------ explicit cases


async def stream_error(call: Any) -> grpc.aio.AioRpcError:
    """Read until the stream fails; the error (a clean end is a test failure)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while True:
            await read_message(call)
    return info.value


async def gone(node: Any, engine_id: str) -> None:
    """The session is unregistered (the client may see the status a moment before the handler's cleanup)."""
    for _ in range(100):
        if node.runner.daemon.engines.get(engine_id) is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine {engine_id} still registered")


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"decode_tokens": 1 << 40}, "decode_tokens must be within"),
        ({"prefill_tokens": (1 << 64) - 1}, "prefill_tokens must be within"),
        ({"num_running": 1 << 30}, "num_running must be within"),
        ({"num_waiting": (1 << 32) - 1}, "num_waiting must be within"),
        ({"num_steps": 1 << 25}, "num_steps must be within"),
        ({"arrived_requests": 1 << 25}, "arrived_requests must be within"),
        ({"window_s": math.inf}, "window_s must be a finite number"),
        ({"window_s": 5e-324}, "window_s must be 0 or at least"),
        ({"busy_s": math.nan}, "busy_s must be a finite number"),
        ({"kv_cache_usage": -0.1}, "kv_cache_usage must be within"),
        ({"finished": [pals_pb2.FinishedRequest(ttft_ms=math.nan)]}, "finished.ttft_ms must be a finite"),
        ({"finished": [pals_pb2.FinishedRequest(tpot_ms=-1)]}, "finished.tpot_ms must be within"),
    ],
)
def test_a_bad_report_field_ends_the_session_naming_the_field_and_adds_nothing(
    dirs: Dirs, fields: dict[str, Any], fragment: str
) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            call = node.engine.Connect()
            await call.write(register(indices=[0, 1]))
            assert (await read_message(call)).WhichOneof("body") == "registered"
            session = node.runner.daemon.engines.get("e1")
            assert session is not None
            await call.write(step(**fields))
            error = await stream_error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fragment in (error.details() or ""), error.details()
            # Nothing from the refused report reached the window the next tick would have read.
            assert (session.window.decode_tokens, session.window.num_steps, session.window.ttft_ms) == (0, 0, [])
            await gone(node, "e1")

    drive(body())


def test_bad_registrations_and_expert_reports_name_the_field(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            invalid = grpc.StatusCode.INVALID_ARGUMENT
            bad_registers = [
                (register(model="x" * 300), "model must be at most 256 printable"),
                (register(model="bad\nmodel"), "model must be at most 256 printable"),
                (register(indices=[0, 0]), "same GPU twice"),
                (register(indices=[9]), "GPU index 9 is not managed"),
                (register(max_num_seqs=(1 << 32) - 1), "max_num_seqs must be within"),
            ]
            long_version = register()
            long_version.register.client_version = "v" * 200
            bad_registers.append((long_version, "client_version must be at most"))
            for first, fragment in bad_registers:
                call = node.engine.Connect()
                await call.write(first)
                error = await stream_error(call)
                assert (error.code(), fragment in (error.details() or "")) == (invalid, True), error.details()
            bad_expert = [
                (pals_pb2.ExpertLoadReport(gpu_index=2, window_s=0.05), "does not belong to engine"),
                (pals_pb2.ExpertLoadReport(gpu_index=7, window_s=0.05), "GPU index 7 is not managed"),
                (pals_pb2.ExpertLoadReport(gpu_uuid="GPU-x", window_s=0.05), "'GPU-x' is not managed"),
                (pals_pb2.ExpertLoadReport(gpu_index=0, window_s=math.nan), "window_s must be a finite"),
                (
                    pals_pb2.ExpertLoadReport(
                        gpu_index=0, window_s=0.05, layers=[pals_pb2.LayerExpertLoad(tokens_per_expert=[1 << 63])]
                    ),
                    "tokens_per_expert (sum) must be within",
                ),
            ]
            for report, fragment in bad_expert:
                call = node.engine.Connect()
                await call.write(register(indices=[0, 1]))
                await read_message(call)
                await call.write(pals_pb2.EngineMessage(expert_load=report))
                error = await stream_error(call)
                assert (error.code(), fragment in (error.details() or "")) == (invalid, True), error.details()
                await asyncio.sleep(0.01)
            assert node.runner.daemon.engines.sessions() == []

    drive(body())


def test_oversized_messages_are_refused_by_grpc_on_both_sockets(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            before = node.state_bytes()
            # Larger than our 1 MiB limit but well under gRPC's 4 MiB default: refused only because we set it.
            huge = "e" * (2 * MAX_RECEIVE_MESSAGE_BYTES)
            request = pals_pb2.SetEngineTargetsRequest(engine_id=huge, targets=pals_pb2.EngineTargets(tokens_per_s=1))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await node.admin.SetEngineTargets(request)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Just under the limit the request reaches validation (and is refused there for its id).
            near = "e" * (MAX_RECEIVE_MESSAGE_BYTES - 1024)
            request = pals_pb2.SetEngineTargetsRequest(engine_id=near, targets=pals_pb2.EngineTargets(tokens_per_s=1))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await node.admin.SetEngineTargets(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # The message names the field and quotes only the start of the value.
            details = info.value.details() or ""
            assert "engine_id 'eeee" in details and f"({len(near)} characters)" in details
            assert len(details) < 300
            # On the engine socket: an oversized report ends that session.
            call = node.engine.Connect()
            await call.write(register(indices=[0]))
            await read_message(call)
            finished = [pals_pb2.FinishedRequest(ttft_ms=1.0, tpot_ms=1.0)] * (MAX_RECEIVE_MESSAGE_BYTES // 16)
            await call.write(step(finished=finished))
            error = await stream_error(call)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.05)
            assert node.runner.daemon.engines.sessions() == []
            assert node.state_bytes() == before
            assert len((await node.admin.GetStatus(pals_pb2.GetStatusRequest())).gpus) == 4

    drive(body())


def test_a_flooding_engine_is_cut_off_and_an_honest_one_is_not(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            honest = node.engine.Connect()
            await honest.write(register("honest", indices=[1]))
            await read_message(honest)
            honest_reader = asyncio.create_task(drain(honest))

            async def report_honestly() -> None:
                while True:
                    await honest.write(step())
                    await asyncio.sleep(PERIOD_S / 2)

            honest_writer = asyncio.create_task(report_honestly())
            sent = 0

            def flood_messages() -> Iterator[pals_pb2.EngineMessage]:
                nonlocal sent
                yield register("flood", indices=[0])
                while sent < 50_000:
                    sent += 1
                    yield step()

            def flood_as_a_client() -> grpc.RpcError:
                # The blocking client (as the vLLM plugin uses) sends from its own thread as fast as the
                # transport allows and reports the server's status. (grpc.aio reports a local INTERNAL instead
                # when one of its own writes races the server's abort.)
                with grpc.insecure_channel(f"unix:{node.config.engine_socket_path}") as channel:
                    stub = pals_pb2_grpc.EngineLinkStub(channel)
                    with pytest.raises(grpc.RpcError) as info:
                        for _ in stub.Connect(flood_messages(), timeout=10.0):
                            pass
                    return info.value

            link = node.runner.engine_link
            error = await asyncio.to_thread(flood_as_a_client)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error  # type: ignore[attr-defined]
            assert "messages/s" in (error.details() or "")  # type: ignore[attr-defined]
            assert link.floods == 1
            daemon = node.runner.daemon
            await gone(node, "flood")
            # The honest engine, reporting at its interval all along, is still connected and still steered.
            await asyncio.sleep(3 * PERIOD_S)
            assert daemon.engines.get("honest") is not None
            assert daemon.engine_status("honest").connected
            print(f"\nflood cut off after {sent} messages written")
            honest_writer.cancel()
            honest_reader.cancel()
            honest.cancel()

    drive(body())


def test_report_rate_limit_admits_its_rate_and_cuts_a_faster_one() -> None:
    limit = ReportRateLimit.for_engine(num_gpus=1, report_interval_s=0.25, now_s=0.0)
    assert limit.rate_hz == 200.0  # 10 x (1 + 1) / 0.25 s = 80/s, raised to the 200/s floor
    fast = ReportRateLimit.for_engine(num_gpus=3, report_interval_s=0.05, now_s=0.0)
    assert fast.rate_hz == pytest.approx(800.0)  # 10 x (1 + 3) / 0.05 s
    # Exactly at the rate for a minute (simulated): never refused.
    t = 0.0
    for _ in range(int(60 * limit.rate_hz)):
        t += 1.0 / limit.rate_hz
        assert limit.allow(t)
    # Twice the rate: refused once the one-second burst is spent (about a second later), not before.
    over = ReportRateLimit(rate_hz=100.0, now_s=0.0)
    t = 0.0
    for _ in range(10_000):
        t += 1.0 / 200.0
        if not over.allow(t):
            break
    assert 0.9 <= t <= 1.1, t


# ------------------------------------------------------------------------------------------ the fuzz


class ThreadedDaemon:
    """A Runner on its own thread and event loop, so hypothesis (synchronous) can drive it with blocking stubs.

    Runner.run() installs signal handlers (main thread only), so this runs start(), daemon.run(), stop().
    """

    def __init__(self, dirs: Dirs, **overrides: Any) -> None:
        self.runner, self.gpus = make_runner(dirs, **overrides)
        self.daemon = self.runner.daemon
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-daemon", daemon=True)
        self.violations: list[str] = []
        self.ticks_checked = 0
        self._tasks: list[asyncio.Task[Any]] = []

    def call(self, coro: Any, timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def start(self) -> None:
        self.thread.start()
        self.call(self._start())

    async def _start(self) -> None:
        await self.runner.start()
        self.daemon.on_tick.append(self._check_tick)
        self._tasks.append(asyncio.ensure_future(self.daemon.run()))
        self._tasks.append(asyncio.ensure_future(self._background_engine()))

    async def _background_engine(self) -> None:
        """A well-behaved engine on GPUs 0 and 1, reconnecting if its session is ever ended."""
        path = self.runner.config.engine_socket_path
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            stub = pals_pb2_grpc.EngineLinkStub(channel)
            while True:
                call = stub.Connect()
                reader = asyncio.ensure_future(drain(call))
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await call.write(register("bg", indices=[0, 1]))
                    while not reader.done():
                        await call.write(step(decode_tokens=600))
                        await asyncio.sleep(PERIOD_S / 2)
                reader.cancel()
                await asyncio.sleep(PERIOD_S)

    def _check_tick(self, d: Any) -> None:
        """After every tick, on the daemon's loop: constraints and budget against the drivers' ground truth."""
        self.ticks_checked += 1
        enforced = []
        for g, sim in zip(d.gpus, self.gpus, strict=True):
            c = g.constraints
            truth = sim.read().enforced_limit_mw
            enforced.append(truth)
            if not c.min_limit_mw <= g.requested_limit_mw <= c.max_limit_mw:
                self.violations.append(f"tick {d.ticks}: GPU {g.identity.index} requested {g.requested_limit_mw}")
            if not c.min_limit_mw <= truth <= c.max_limit_mw:
                self.violations.append(f"tick {d.ticks}: GPU {g.identity.index} enforces {truth}")
        budget_w = d.budget.effective_w(d.last_tick_s)
        if budget_w is not None and sum(enforced) > budget_w * 1000 + 1e-6:
            self.violations.append(f"tick {d.ticks}: enforced {sum(enforced)} mW over the budget {budget_w} W")

    def run_task_done(self) -> bool:
        return self._tasks[0].done()

    def written_outside_constraints(self) -> list[tuple[int, int]]:
        out = []
        for sim, g in zip(self.gpus, self.daemon.gpus, strict=True):
            c = g.constraints
            out += [(g.identity.index, mw) for name, mw in list(sim.calls) if name == SET_POWER_LIMIT]
            out = [(i, mw) for i, mw in out if not c.min_limit_mw <= mw <= c.max_limit_mw]
        return out

    def stop(self) -> None:
        async def _stop() -> None:
            self.daemon.request_stop()
            for task in self._tasks[1:]:
                task.cancel()
            await asyncio.wait_for(self._tasks[0], 10.0)
            await self.runner.stop()

        self.call(_stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        self.loop.close()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadedDaemon, Any, Any]]:
    short = Path(tempfile.mkdtemp(prefix="pals-fz-", dir="/tmp"))
    umask = os.umask(0o022)
    node = ThreadedDaemon(Dirs(short / "run", tmp_path_factory.mktemp("fuzz-state")), budget_w=1200.0)
    node.start()
    admin_channel = grpc.insecure_channel(f"unix:{node.runner.config.admin_socket_path}")
    engine_channel = grpc.insecure_channel(f"unix:{node.runner.config.engine_socket_path}")
    # The background engine is registered before the fuzz starts.
    deadline = time.monotonic() + 10.0
    while node.daemon.engines.get("bg") is None:
        assert time.monotonic() < deadline, "background engine did not connect"
        time.sleep(0.01)
    try:
        yield node, admin_channel, engine_channel
    finally:
        admin_channel.close()
        engine_channel.close()
        node.stop()
        os.umask(umask)  # Runner.start sets 0077 for the whole process
        shutil.rmtree(short, ignore_errors=True)
    # After everything: every limit ever written was within the constraints, and the originals are back.
    writes = [mw for g in node.gpus for name, mw in g.calls if name == SET_POWER_LIMIT]
    print(f"\nfuzz: {COUNTS}, ticks checked {node.ticks_checked}, limit writes {len(writes)}")
    assert node.written_outside_constraints() == []
    assert [g.read().enforced_limit_mw for g in node.gpus] == [ORIGINAL_MW] * 4
    # The fuzz really reached the daemon's logic: requests were accepted too, limits moved, ticks were checked.
    assert COUNTS["admin_ok"] > 0 and COUNTS["budgets_set"] > 0 and COUNTS["sessions_ok"] > 0
    assert COUNTS["profiles_started"] > 0
    assert node.ticks_checked > 10
    assert any(mw < ORIGINAL_MW for mw in writes) and min(writes) >= MIN_MW


# Numbers a careless or hostile client sends: NaN, infinities, huge, negative, zero, and plausible ones.
garbage_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e308, -1e308, 5e-324, 1.0]),
    st.floats(min_value=-10.0, max_value=3000.0),
    st.floats(min_value=0.0, max_value=1.0),
)
budget_floats = st.one_of(garbage_floats, st.floats(min_value=300.0, max_value=2000.0))
uint32 = st.one_of(st.integers(0, (1 << 32) - 1), st.integers(0, 300))
uint64 = st.one_of(st.integers(0, (1 << 64) - 1), st.integers(0, 10_000))
# Valid UTF-8 only (protobuf refuses lone surrogates on the client side, before anything is sent).
texts = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=80),
    st.sampled_from(["bg", "e1", "fz", "", "bad id!", "e" * 65, MODEL]),
)
optional_floats = st.one_of(st.none(), garbage_floats)

ADMIN_OK_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
}


@st.composite
def admin_requests(draw: Any) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["SetBudget", "SetEngineTargets", "StartProfile", "WatchStatus"]))
    if kind == "SetBudget" and draw(st.booleans()):
        # Well formed: the budget moves (ramps included) while the garbage keeps coming. From 700 W, not the
        # 400 W node minimum: hypothesis favours a range's bounds, and a node held at its minimum refuses every
        # profile job (so some runs exercised none); budgets near the minimum still come from budget_floats.
        return kind, pals_pb2.SetBudgetRequest(
            budget_w=draw(st.floats(700.0, 2000.0)), ramp_s=draw(st.floats(0.0, 0.5))
        )
    if kind == "SetBudget":
        return kind, pals_pb2.SetBudgetRequest(
            budget_w=draw(budget_floats),
            clear=draw(st.booleans()),
            ramp_s=draw(st.one_of(garbage_floats, st.floats(0.0, 0.5))),
        )
    if kind == "SetEngineTargets":
        targets = pals_pb2.EngineTargets()
        for name in ("tokens_per_s", "ttft_ms", "tpot_ms"):
            value = draw(optional_floats)
            if value is not None:
                setattr(targets, name, value)
        return kind, pals_pb2.SetEngineTargetsRequest(engine_id=draw(texts), targets=targets)
    if kind == "StartProfile" and draw(st.booleans()):
        # Well formed for the background engine: a job starts and pins its caps, under the budget.
        request = pals_pb2.StartProfileRequest(
            engine_id="bg",
            # A profile is a grid of at least 2 caps x 2 batches; low caps, so that most budgets can hold them.
            caps_w=draw(st.lists(st.integers(100, 150).map(float), min_size=2, max_size=3, unique=True)),
            batches=draw(st.lists(st.integers(1, 256), min_size=2, max_size=3, unique=True)),
            hold_s=draw(st.floats(0.5, 2.0)),
        )
        request.settle_s = draw(st.floats(0.0, 0.2))
        return kind, request
    if kind == "StartProfile":
        request = pals_pb2.StartProfileRequest(
            engine_id=draw(st.one_of(st.just("bg"), texts)),
            caps_w=draw(st.lists(st.one_of(garbage_floats, st.sampled_from([150.0, 250.0, 400.0])), max_size=4)),
            batches=draw(st.lists(st.one_of(uint32, st.sampled_from([8, 64])), max_size=4)),
            hold_s=draw(st.one_of(garbage_floats, st.just(0.5))),
            parallelism=draw(st.one_of(st.just(""), texts)),
        )
        settle = draw(optional_floats)
        if settle is not None:
            request.settle_s = settle
        return kind, request
    return kind, pals_pb2.WatchStatusRequest(interval_s=draw(garbage_floats))


@st.composite
def engine_sessions(draw: Any) -> list[pals_pb2.EngineMessage]:
    if draw(st.booleans()):
        # A valid registration on the GPUs the background engine leaves free: the reports that follow reach
        # the daemon's telemetry and its decisions.
        reg = pals_pb2.Register(
            engine_id="fz",
            model=MODEL,
            gpu_indices=draw(st.sampled_from([[2], [3], [2, 3]])),
            max_num_seqs=draw(st.integers(1, 1024)),
            max_num_batched_tokens=draw(st.integers(1, 1 << 16)),
            client_version=draw(texts),
        )
    else:
        reg = pals_pb2.Register(
            engine_id=draw(st.one_of(st.sampled_from(["fz", "bg"]), texts)),
            model=draw(st.one_of(st.just(MODEL), texts)),
            max_num_seqs=draw(uint32),
            max_num_batched_tokens=draw(uint32),
            client_version=draw(texts),
        )
        if draw(st.booleans()):
            reg.gpu_indices.extend(draw(st.lists(st.one_of(st.integers(0, 5), uint32), max_size=4)))
        else:
            reg.gpu_uuids.extend(draw(st.lists(texts, max_size=2)))
    messages = [pals_pb2.EngineMessage(register=reg)] if draw(st.integers(0, 9)) else []
    if reg.engine_id == "fz" and draw(st.booleans()):
        # Honest reports after the valid registration: the session runs and ends cleanly.
        plausible = st.builds(
            step, decode_tokens=st.integers(0, 5000), num_running=st.integers(0, 256), kv_cache_usage=st.floats(0, 1)
        )
        return messages + draw(st.lists(plausible, max_size=6))
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            report = pals_pb2.StepReport(
                window_s=draw(garbage_floats),
                num_steps=draw(uint32),
                busy_s=draw(garbage_floats),
                num_running=draw(uint32),
                num_waiting=draw(uint32),
                prefill_tokens=draw(uint64),
                decode_tokens=draw(uint64),
                kv_cache_usage=draw(st.one_of(garbage_floats, st.floats(0.0, 1.0))),
                arrived_requests=draw(uint32),
            )
            for _ in range(draw(st.integers(0, 3))):
                report.finished.add(ttft_ms=draw(garbage_floats), tpot_ms=draw(garbage_floats))
            messages.append(pals_pb2.EngineMessage(step=report))
        else:
            load = pals_pb2.ExpertLoadReport(
                gpu_uuid=draw(st.one_of(st.just(""), texts)),
                gpu_index=draw(st.one_of(st.integers(0, 5), uint32)),
                window_s=draw(garbage_floats),
            )
            for _ in range(draw(st.integers(0, 2))):
                load.layers.add(layer=draw(uint32), tokens_per_expert=draw(st.lists(uint64, max_size=8)))
            messages.append(pals_pb2.EngineMessage(expert_load=load))
    return messages


def _code(call: Any) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return, attr-defined]
    return grpc.StatusCode.OK


def _admin_step(node: ThreadedDaemon, admin: Any, kind: str, request: Any) -> None:
    daemon = node.daemon
    before = (daemon.budget.target_w, dict(daemon.state.targets))
    if kind == "WatchStatus":
        code = _code(lambda: next(iter(admin.WatchStatus(request, timeout=5.0))))
    else:
        code = _code(lambda: getattr(admin, kind)(request, timeout=10.0))
    assert code in ADMIN_OK_CODES, (kind, request, code)
    COUNTS["admin"] += 1
    COUNTS["admin_ok"] += code == grpc.StatusCode.OK
    COUNTS["budgets_set"] += code == grpc.StatusCode.OK and kind == "SetBudget"
    COUNTS["profiles_started"] += code == grpc.StatusCode.OK and kind == "StartProfile"
    if code != grpc.StatusCode.OK:
        # Nothing is applied from a refused request.
        assert (daemon.budget.target_w, dict(daemon.state.targets)) == before, (kind, request)
    elif kind == "SetBudget":
        assert daemon.budget.target_w == (None if request.clear else request.budget_w)
    if kind == "StartProfile" and code == grpc.StatusCode.OK:
        # Let the job set its first point's caps under the budget, then hand back to the controller.
        time.sleep(1.5 * PERIOD_S)
        assert _code(lambda: admin.CancelProfile(pals_pb2.CancelProfileRequest(engine_id="bg"))) == grpc.StatusCode.OK


def _engine_step(node: ThreadedDaemon, link: Any, messages: list[pals_pb2.EngineMessage]) -> None:
    def run() -> None:
        for _ in link.Connect(iter(messages), timeout=10.0):
            pass

    code = _code(run)
    # OK: a clean end after valid messages. Never UNKNOWN (a handler that raised) or a timeout (a hang).
    assert code in {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    }, (code, messages)
    COUNTS["engine_sessions"] += 1
    COUNTS["sessions_ok"] += code == grpc.StatusCode.OK
    COUNTS["engine_messages"] += len(messages)


def _daemon_answers(node: ThreadedDaemon, admin: Any, engine: Any) -> None:
    status = pals_pb2_grpc.PowerAdminStub(admin).GetStatus(pals_pb2.GetStatusRequest(), timeout=10.0)
    assert len(status.gpus) == 4
    assert not node.run_task_done(), "the control loop stopped"
    # No garbage number leaks into what operators and the metrics see.
    for e in status.engines:
        figures = (e.throughput_tokens_per_s, e.tokens_per_joule, e.predicted_tokens_per_s, e.predicted_power_w)
        assert all(math.isfinite(x) for x in figures), e
    assert all(math.isfinite(g.decided_limit_w) for g in status.gpus)
    health = health_pb2_grpc.HealthStub(engine).Check(health_pb2.HealthCheckRequest(), timeout=10.0)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert node.violations == [], node.violations[:5]
    assert node.written_outside_constraints() == []
    budget_w = node.daemon.budget.target_w
    if budget_w is not None:
        assert budget_w >= sum(g.constraints.min_limit_mw for g in node.daemon.gpus) / 1000


COUNTS: dict[str, int] = {
    "admin": 0,
    "admin_ok": 0,
    "budgets_set": 0,
    "profiles_started": 0,
    "engine_sessions": 0,
    "sessions_ok": 0,
    "engine_messages": 0,
}


def _fuzz_body(fuzzed: Any, admin_batch: list[tuple[str, Any]], sessions: list[list[Any]]) -> None:
    node, admin_channel, engine_channel = fuzzed
    admin = pals_pb2_grpc.PowerAdminStub(admin_channel)
    link = pals_pb2_grpc.EngineLinkStub(engine_channel)
    for kind, request in admin_batch:
        _admin_step(node, admin, kind, request)
    for messages in sessions:
        _engine_step(node, link, messages)
    _daemon_answers(node, admin_channel, engine_channel)


FUZZ_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "derandomize": False,
}


@settings(max_examples=120, **FUZZ_SETTINGS)
@given(
    admin_batch=st.lists(admin_requests(), min_size=1, max_size=4),
    sessions=st.lists(engine_sessions(), min_size=1, max_size=3),
)
def test_fuzz_both_services(fuzzed: Any, admin_batch: Any, sessions: Any) -> None:
    _fuzz_body(fuzzed, admin_batch, sessions)


@pytest.mark.slow
@settings(max_examples=3000, **FUZZ_SETTINGS)
@given(
    admin_batch=st.lists(admin_requests(), min_size=1, max_size=4),
    sessions=st.lists(engine_sessions(), min_size=1, max_size=3),
)
def test_fuzz_both_services_long(fuzzed: Any, admin_batch: Any, sessions: Any) -> None:
    _fuzz_body(fuzzed, admin_batch, sessions)
