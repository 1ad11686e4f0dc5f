"""A simulated engine's EngineLink client: the same protocol, over the same socket, as the vLLM client.

Each report interval it advances the engine to the clock, sends the window as a StepReport, and applies
the directives it receives; a directive older than its ttl falls back to the engine's configured limits,
exactly the fail-open rule the vLLM scheduler follows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.clock import Clock
from pals_daemon.sim.engine import SimEngine, StepWindow

log = logging.getLogger(__name__)


def step_report(window: StepWindow) -> pals_pb2.StepReport:
    """A StepWindow as the proto StepReport."""
    report = pals_pb2.StepReport(
        window_s=window.window_s,
        num_steps=window.num_steps,
        busy_s=window.busy_s,
        num_running=window.num_running,
        num_waiting=window.num_waiting,
        prefill_tokens=window.prefill_tokens,
        decode_tokens=window.decode_tokens,
        kv_cache_usage=window.kv_cache_usage,
        arrived_requests=window.arrived_requests,
    )
    for f in window.finished:
        report.finished.add(
            ttft_ms=f.ttft_ms, tpot_ms=f.tpot_ms, prompt_tokens=f.prompt_tokens, output_tokens=f.output_tokens
        )
    return report


def expert_load_reports(
    window: StepWindow, gpu_uuids: Sequence[str], gpu_indices: Sequence[int] | None = None
) -> list[pals_pb2.ExpertLoadReport]:
    """One ExpertLoadReport per GPU for the window (none when the engine reports no expert load).

    The simulator has no router: each GPU's routed-token count (proportional to its configured share) is sent
    as a single layer with a single expert, which sums the same as the per-expert per-layer counts would.
    """
    counts = window.expert_tokens_per_gpu
    if not counts:
        return []
    out = []
    for i, (uuid, n) in enumerate(zip(gpu_uuids, counts, strict=False)):
        rep = pals_pb2.ExpertLoadReport(gpu_uuid=uuid, window_s=window.window_s)
        if gpu_indices is not None:
            rep.gpu_index = gpu_indices[i]
        rep.layers.add(layer=0, tokens_per_expert=[int(n)])
        out.append(rep)
    return out


def register_message(engine: SimEngine, model: str, gpu_uuids: Sequence[str]) -> pals_pb2.EngineMessage:
    """The Register a simulated engine opens its session with (its configured limits, its GPUs by UUID)."""
    return pals_pb2.EngineMessage(
        register=pals_pb2.Register(
            engine_id=engine.engine_id,
            model=model,
            gpu_uuids=list(gpu_uuids),
            max_num_seqs=engine.configured_max_num_seqs,
            max_num_batched_tokens=engine.configured_max_num_batched_tokens,
            client_version="pals-sim",
        )
    )


class SimEngineLink:
    """Drives one SimEngine on the clock and keeps its session with the daemon."""

    def __init__(
        self,
        engine: SimEngine,
        model: str,
        gpu_uuids: Sequence[str],
        socket_path: str,
        clock: Clock,
        report_interval_s: float = 0.25,
    ) -> None:
        self.engine = engine
        self.model = model
        self.gpu_uuids = list(gpu_uuids)
        self.socket_path = socket_path
        self.clock = clock
        self.report_interval_s = report_interval_s
        self.directive_expiry_s: float | None = None
        self.directives_received = 0

    async def _messages(self, stop: asyncio.Event) -> AsyncIterator[pals_pb2.EngineMessage]:
        yield register_message(self.engine, self.model, self.gpu_uuids)
        while not stop.is_set():
            await self.clock.sleep(self.report_interval_s)
            now = self.clock.now()
            if self.directive_expiry_s is not None and now >= self.directive_expiry_s:
                self.engine.reset_limits()
                self.directive_expiry_s = None
            self.engine.advance(now)
            window = self.engine.take_window()
            yield pals_pb2.EngineMessage(step=step_report(window))
            for rep in expert_load_reports(window, self.gpu_uuids):
                yield pals_pb2.EngineMessage(expert_load=rep)
            if self.engine.done:
                stop.set()

    def _apply(self, directive: pals_pb2.Directive) -> None:
        self.engine.apply_limits(directive.max_num_seqs, directive.max_num_batched_tokens)
        self.directive_expiry_s = self.clock.now() + directive.ttl_ms / 1000.0
        self.directives_received += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set or the engine served every request."""
        async with grpc.aio.insecure_channel(f"unix:{self.socket_path}") as channel:
            stub = pals_pb2_grpc.EngineLinkStub(channel)
            call = stub.Connect(self._messages(stop))
            try:
                async for msg in call:
                    if msg.WhichOneof("body") == "directive":
                        self._apply(msg.directive)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    raise
