"""A simulated engine that talks to the daemon through the clients that ship for vLLM.

``ClientSimEngine`` drives a SimEngine on a clock and hands its telemetry to ``EngineLinkClient``
(pals_daemon/vllm/client.py: register, StepReports, directives with their TTL and fail-open) exactly as the
vLLM scheduler does: before each step it asks ``current_limits()`` (None: back to the configured limits),
after it ``record_step(...)``. MoE expert load goes as vLLM's GPU workers send it: one ``ExpertLoadReporter``
per GPU (pals_daemon/vllm/expert_reporter.py) on ``EngineLink.ReportExpertLoad``. Every simulated run
through this adapter therefore exercises the client code that ships.

On a ScaledClock the clients' report intervals are scaled with it (EngineLinkClient's ``time_scale``, the
reporters' wall interval), so the daemon gets reports at the same simulated cadence at any speed; at high
speeds the client thread's scheduling jitter is multiplied by the speed too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pals_daemon.clock import Clock
from pals_daemon.sim.engine import SimEngine, StepWindow
from pals_daemon.vllm.client import EngineLinkClient
from pals_daemon.vllm.expert_reporter import ExpertLoadReporter


def record_window(client: EngineLinkClient, window: StepWindow) -> None:
    """Queue a window's steps on the client, as the scheduler queues each step (totals exact, split evenly)."""
    n = window.num_steps
    if n <= 0:
        return

    def share(total: int, i: int) -> int:  # integer split of ``total`` over n steps; sums to total
        return total * (i + 1) // n - total * i // n

    finished = tuple((f.ttft_ms, f.tpot_ms, f.prompt_tokens, f.output_tokens) for f in window.finished)
    for i in range(n):
        client.record_step(
            busy_s=window.busy_s / n,
            num_running=window.num_running,
            num_waiting=window.num_waiting,
            prefill_tokens=share(window.prefill_tokens, i),
            decode_tokens=share(window.decode_tokens, i),
            kv_cache_usage=window.kv_cache_usage,
            arrived_requests=share(window.arrived_requests, i),
            finished=finished if i == n - 1 else (),
        )


class ClientSimEngine:
    """One SimEngine connected through EngineLinkClient (and ExpertLoadReporters for MoE load)."""

    def __init__(
        self,
        engine: SimEngine,
        model: str,
        socket_path: str,
        clock: Clock,
        *,
        gpu_uuids: Sequence[str] = (),
        gpu_indices: Sequence[int] = (),
        step_interval_s: float = 0.05,
        report_interval_s: float = 0.1,
        expert_interval_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.step_interval_s = step_interval_s
        speed = float(getattr(clock, "speed", 1.0))
        self.client = EngineLinkClient(
            socket_path,
            engine.engine_id,
            model,
            gpu_uuids,
            engine.configured_max_num_seqs,
            engine.configured_max_num_batched_tokens,
            report_interval_s,
            clock.now,
            gpu_indices=gpu_indices,
            time_scale=speed,
        )
        # Cumulative routed tokens per GPU (one layer, one expert: the simulator has no router).
        self._expert_totals = [0] * len(engine.gpus)
        self.reporters = (
            [
                ExpertLoadReporter(
                    socket_path,
                    uuid,
                    (lambda i=i: [(0, [self._expert_totals[i]])]),
                    expert_interval_s / speed,
                    clock=clock.now,  # window_s in the daemon's (simulated) seconds
                )
                for i, uuid in enumerate(gpu_uuids)
            ]
            if engine.expert_load_share is not None and gpu_uuids
            else []
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Serve the requests until ``stop`` is set or the engine is done; closes the clients."""
        self.client.start()
        for reporter in self.reporters:
            reporter.start()
        try:
            while not stop.is_set() and not self.engine.done:
                limits = self.client.current_limits()
                if limits is None:
                    self.engine.reset_limits()  # no live directive: the engine's own limits (fail-open)
                else:
                    self.engine.apply_limits(*limits)
                await self.clock.sleep(self.step_interval_s)
                self.engine.advance(self.clock.now())
                window = self.engine.take_window()
                record_window(self.client, window)
                for i, n in enumerate(window.expert_tokens_per_gpu):
                    self._expert_totals[i] += int(n)
        finally:
            await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self.client.close()
        for reporter in self.reporters:
            reporter.close()
