"""EngineLink servicer: a thin adapter from the bidirectional stream to the engine registry.

One stream is one engine session. The first message must be a Register; the session ends when the
stream ends or is cancelled (docs/ARCHITECTURE.md section 5; a SIGKILLed client is noticed in
3-6 ms, tests/server/test_sessions.py), the daemon is woken to run a tick at once so the engine's GPUs get their idle
allocation, and the engine falls back to its own limits when its last directive expires.

Bad input ends the session with INVALID_ARGUMENT naming the field; a flood of reports (see
engines.ReportRateLimit) ends it with RESOURCE_EXHAUSTED. Ending rather than dropping the excess: a client
that floods is broken, the error tells its operator so, and the client library reconnects with backoff.
A stream that does not register (or report) in time, or goes silent, ends with DEADLINE_EXCEEDED; expert-load
streams are capped per socket and per GPU; every message waits for the socket's report budget of the tick
before it is read (server/limits.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import NoReturn, TypeVar

import grpc

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.errors import InvalidRequestError
from pals_daemon.server import validate
from pals_daemon.server.engines import (
    EngineRegistration,
    EngineRegistry,
    EngineSession,
    ReportRateLimit,
    expert_load_tokens,
)
from pals_daemon.server.limits import EngineLimits, ReportByteBudget

log = logging.getLogger(__name__)

T = TypeVar("T", pals_pb2.EngineMessage, pals_pb2.ExpertLoadReport)

# Resolves (uuids, indices) from a Register into GPU indices, raising InvalidRequestError.
GpuResolver = Callable[[Sequence[str], Sequence[int]], tuple[int, ...]]


def parse_registration(msg: pals_pb2.Register, resolve_gpus: GpuResolver) -> EngineRegistration:
    """Validate a Register message."""
    if len(msg.model) > validate.MAX_MODEL_NAME_CHARS or not msg.model.isprintable():
        raise InvalidRequestError(f"model must be at most {validate.MAX_MODEL_NAME_CHARS} printable characters")
    if len(msg.client_version) > validate.MAX_CLIENT_VERSION_CHARS:
        raise InvalidRequestError(f"client_version must be at most {validate.MAX_CLIENT_VERSION_CHARS} characters")
    if len(msg.gpu_indices) > validate.MAX_GPUS_PER_ENGINE:
        raise InvalidRequestError(f"gpu_indices: at most {validate.MAX_GPUS_PER_ENGINE}, got {len(msg.gpu_indices)}")
    if not 1 <= msg.max_num_seqs <= validate.MAX_NUM_SEQS:
        raise InvalidRequestError(f"max_num_seqs must be within [1, {validate.MAX_NUM_SEQS}], got {msg.max_num_seqs}")
    if not 1 <= msg.max_num_batched_tokens <= validate.MAX_NUM_BATCHED_TOKENS:
        raise InvalidRequestError(
            f"max_num_batched_tokens must be within [1, {validate.MAX_NUM_BATCHED_TOKENS}], "
            f"got {msg.max_num_batched_tokens}"
        )
    return EngineRegistration(
        engine_id=validate.engine_id(msg.engine_id),
        model=msg.model,
        gpu_indices=resolve_gpus(validate.gpu_uuids(list(msg.gpu_uuids)), list(msg.gpu_indices)),
        max_num_seqs=msg.max_num_seqs,
        max_num_batched_tokens=msg.max_num_batched_tokens,
    )


class EngineLinkServicer(pals_pb2_grpc.EngineLinkServicer):
    """Accepts engine sessions, folds their telemetry into the registry, streams their directives."""

    def __init__(
        self,
        registry: EngineRegistry,
        resolve_gpus: GpuResolver,
        report_interval_s: float,
        on_change: Callable[[], None] = lambda: None,
        now: Callable[[], float] = time.monotonic,
        limits: EngineLimits | None = None,
        budget: ReportByteBudget | None = None,
    ) -> None:
        self.limits = limits or EngineLimits()
        # Unbounded when none is given (unit tests of the servicer alone); the Runner always gives one.
        self.budget = budget or ReportByteBudget(float("inf"))
        self.registry = registry
        self.resolve_gpus = resolve_gpus
        self.report_interval_s = report_interval_s
        self.on_change = on_change
        self.now = now
        # Sessions ended for flooding, since start (for tests and logs).
        self.floods = 0
        # Streams ended for not registering / staying silent, and ended with any error, since start.
        self.timeouts = 0
        self.aborts = 0
        # Open ReportExpertLoad streams: all, and per GPU they named.
        self.expert_streams = 0
        self.expert_streams_by_gpu: dict[int, int] = {}

    async def Connect(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pals_pb2.EngineMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pals_pb2.DaemonMessage]:
        """Run one engine session."""
        try:
            first = await self._next(request_iterator, self.limits.first_message_timeout_s)
        except asyncio.TimeoutError:
            self.timeouts += 1
            await self._abort(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no Register within {self.limits.first_message_timeout_s:g} s of opening the stream",
            )
        if first is None or first.WhichOneof("body") != "register":
            await self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, "the first message must be a Register")
        try:
            registration = parse_registration(first.register, self.resolve_gpus)
            session = self.registry.register(registration)
        except InvalidRequestError as exc:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info(
            "engine %s connected (%s on GPUs %s)",
            registration.engine_id,
            registration.model,
            list(registration.gpu_indices),
        )
        self.on_change()
        reader = asyncio.create_task(self._read(request_iterator, session))
        getter: asyncio.Future[pals_pb2.DaemonMessage] | None = None
        try:
            yield pals_pb2.DaemonMessage(
                registered=pals_pb2.Registered(session_id=session.session_id, report_interval_s=self.report_interval_s)
            )
            while True:
                getter = asyncio.ensure_future(session.outbox.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                yield getter.result()
            error = reader.result()
            if error is not None:
                await self._abort(context, *error)
        finally:
            # Both, also when the handler itself is cancelled (client gone, server stopping) mid-wait.
            reader.cancel()
            if getter is not None:
                getter.cancel()
            self.registry.unregister(session)
            log.info("engine %s disconnected", registration.engine_id)
            self.on_change()

    async def _read(
        self, request_iterator: AsyncIterator[pals_pb2.EngineMessage], session: EngineSession
    ) -> tuple[grpc.StatusCode, str] | None:
        """Fold incoming reports into the session; returns (code, text) for a bad message or a flood, None at end."""
        reg = session.registration
        limit = ReportRateLimit.for_engine(len(reg.gpu_indices), self.report_interval_s, self.now())
        while True:
            try:
                msg = await self._next(request_iterator, self.limits.silence_timeout_s)
            except asyncio.TimeoutError:
                self.timeouts += 1
                silence_s = self.limits.silence_timeout_s
                log.warning("engine %s sent nothing for %g s; ending its session", reg.engine_id, silence_s)
                return grpc.StatusCode.DEADLINE_EXCEEDED, f"no report for {silence_s:g} s; session ended"
            if msg is None:
                return None
            if not limit.allow(self.now()):
                self.floods += 1
                log.warning(
                    "engine %s flooded its session (over %.0f messages/s); ending it", reg.engine_id, limit.rate_hz
                )
                return (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"more than {limit.rate_hz:.0f} messages/s (report interval {self.report_interval_s:g} s); "
                    "session ended",
                )
            kind = msg.WhichOneof("body")
            try:
                if kind == "step":
                    session.add_step_report(msg.step)
                elif kind == "expert_load":
                    gpu = self._expert_gpu(msg.expert_load, session)
                    session.add_expert_load(msg.expert_load, gpu)
                else:
                    return grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind or 'empty'} message after registration"
            except InvalidRequestError as exc:
                return grpc.StatusCode.INVALID_ARGUMENT, str(exc)

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
        """End the stream with ``code`` (counted: each leaves garbage cycles for the heap trimmer to collect)."""
        self.aborts += 1
        await context.abort(code, details)
        raise AssertionError("unreachable: context.abort raises")

    async def _next(self, iterator: AsyncIterator[T], timeout_s: float) -> T | None:
        """The next message (None at the end of the stream), read once the socket's report budget for this
        tick is not spent; asyncio.TimeoutError when none comes within ``timeout_s`` of asking for it."""
        await self.budget.wait()
        msg = await asyncio.wait_for(anext_or_none(iterator), timeout_s)
        if msg is not None:
            self.budget.charge(msg.ByteSize())
        return msg

    async def ReportExpertLoad(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pals_pb2.ExpertLoadReport], context: grpc.aio.ServicerContext
    ) -> pals_pb2.ExpertLoadAck:
        """Fold a GPU worker's expert-load reports into the session of the engine running on that GPU.

        Bounded: open streams per socket and per GPU named (RESOURCE_EXHAUSTED over either), the first report
        within the first-message timeout and each next within the silence timeout (DEADLINE_EXCEEDED).

        The worker starts before its engine's scheduler registers (and outlives a reconnect), so a report
        for a GPU no connected engine runs on is counted and dropped, not refused. A report naming a GPU
        this daemon does not manage, or carrying bad numbers, ends the stream with INVALID_ARGUMENT.
        """
        ack = pals_pb2.ExpertLoadAck()
        if self.expert_streams >= self.limits.max_expert_streams:
            await self._abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {self.limits.max_expert_streams} expert-load streams may be open on this socket",
            )
        self.expert_streams += 1
        named: set[int] = set()
        try:
            await self._fold_expert_loads(request_iterator, context, ack, named)
        finally:
            self.expert_streams -= 1
            for gpu in named:
                self.expert_streams_by_gpu[gpu] -= 1
        return ack

    async def _fold_expert_loads(
        self,
        request_iterator: AsyncIterator[pals_pb2.ExpertLoadReport],
        context: grpc.aio.ServicerContext,
        ack: pals_pb2.ExpertLoadAck,
        named: set[int],
    ) -> None:
        # One GPU's worker: the same flood bound as a one-GPU engine's session.
        limit = ReportRateLimit.for_engine(1, self.report_interval_s, self.now())
        timeout_s = self.limits.first_message_timeout_s
        while True:
            try:
                report = await self._next(request_iterator, timeout_s)
            except asyncio.TimeoutError:
                self.timeouts += 1
                await self._abort(
                    context, grpc.StatusCode.DEADLINE_EXCEEDED, f"no report for {timeout_s:g} s; stream ended"
                )
            if report is None:
                return
            timeout_s = self.limits.silence_timeout_s
            if not limit.allow(self.now()):
                self.floods += 1
                log.warning("an expert-load stream flooded (over %.0f messages/s); ending it", limit.rate_hz)
                await self._abort(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"more than {limit.rate_hz:.0f} messages/s; stream ended",
                )
            try:
                tokens = expert_load_tokens(report)  # a bad report is refused even when no engine would take it
                gpu = self._report_gpu(report)
            except InvalidRequestError as exc:
                await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if gpu not in named:
                if self.expert_streams_by_gpu.get(gpu, 0) >= self.limits.max_expert_streams_per_gpu:
                    del report  # not kept alive by the abort's traceback (a decoded report is ~0.5 MB)
                    await self._abort(
                        context,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"at most {self.limits.max_expert_streams_per_gpu} expert-load streams may report GPU {gpu}",
                    )
                named.add(gpu)
                self.expert_streams_by_gpu[gpu] = self.expert_streams_by_gpu.get(gpu, 0) + 1
            session = self.registry.engine_of_gpu(gpu)
            if session is None:
                ack.unattributed += 1
                continue
            session.add_expert_tokens(gpu, tokens)
            ack.accepted += 1

    def _report_gpu(self, report: pals_pb2.ExpertLoadReport) -> int:
        """The managed GPU an expert-load report names (by UUID, else index); InvalidRequestError if none."""
        uuids = validate.gpu_uuids([report.gpu_uuid], "gpu_uuid") if report.gpu_uuid else []
        (gpu,) = self.resolve_gpus(uuids, [] if uuids else [report.gpu_index])
        return gpu

    def _expert_gpu(self, report: pals_pb2.ExpertLoadReport, session: EngineSession) -> int:
        gpu = self._report_gpu(report)
        if gpu not in session.registration.gpu_indices:
            raise InvalidRequestError(f"GPU {gpu} does not belong to engine {session.registration.engine_id}")
        return gpu


async def anext_or_none(iterator: AsyncIterator[T]) -> T | None:
    """The next message, or None when the stream ended."""
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None
