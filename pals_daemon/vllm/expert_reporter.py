"""Streams one GPU's expert-routing counts to the daemon (pure Python: no torch, no vllm import).

A vLLM GPU worker is a different process from the scheduler that holds the engine's session, so its counts
go over their own client-streaming call, ``EngineLink.ReportExpertLoad``, tagged with the GPU's UUID; the
daemon adds them to whichever engine session runs on that GPU.

The worker's forward pass never waits on this: a daemon thread calls ``snapshot()`` (cumulative counts per
layer, copied off the GPU by the caller's own means) every ``interval_s``, sends the difference from the
previous snapshot, and reconnects with backoff when the daemon is absent, killed or hung.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from pals_daemon.vllm.client import engine_socket_from_env, interval_from_env, run_with_backoff

log = logging.getLogger(__name__)

# (layer id, cumulative tokens routed to each expert this GPU hosts, in a fixed order).
LayerCounts = tuple[int, Sequence[int]]
Snapshot = Callable[[], Sequence[LayerCounts]]


# An idle GPU's stream sends an empty report at least this often (below the daemon's 5 s first-message timeout).
KEEPALIVE_S = 2.0

def count_deltas(
    previous: dict[int, list[int]], current: Sequence[LayerCounts]
) -> tuple[dict[int, list[int]], list[LayerCounts]]:
    """(the new baseline, per-layer increments since ``previous``); layers with no increment are left out.

    Counters only grow; a smaller value (the counter was re-created, e.g. after a model reload) counts from
    zero rather than going negative.
    """
    baseline: dict[int, list[int]] = {}
    deltas: list[LayerCounts] = []
    for layer, counts in current:
        values = [int(c) for c in counts]
        before = previous.get(layer)
        if before is None or len(before) != len(values):
            before = [0] * len(values)
        inc = [c - b if c >= b else c for c, b in zip(values, before, strict=True)]
        baseline[layer] = values
        if any(inc):
            deltas.append((layer, inc))
    return baseline, deltas


class ExpertLoadReporter:
    """Sends a GPU's per-expert token counts every ``interval_s`` from a background thread."""

    def __init__(
        self,
        socket_path: str,
        gpu_uuid: str,
        snapshot: Snapshot,
        interval_s: float = 1.0,
        *,
        gpu_index: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_backoff_s: float = 0.05,
        max_backoff_s: float = 5.0,
    ) -> None:
        if not gpu_uuid and gpu_index is None:
            raise ValueError("an expert-load reporter needs the GPU's UUID or index")
        self.socket_path = socket_path
        self.gpu_uuid = gpu_uuid
        self.gpu_index = gpu_index
        self.snapshot = snapshot
        self.interval_s = interval_s
        self.clock = clock
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._call: object | None = None
        # Counters for tests, logs and the worker's status RPC (each written by the reporter thread only).
        self.connects = 0
        self.reports_sent = 0
        self.tokens_sent = 0
        self.accepted = 0
        self.unattributed = 0
        self.snapshot_errors = 0
        self.last_error = ""

    @classmethod
    def from_env(cls, gpu_uuid: str, snapshot: Snapshot, gpu_index: int | None = None) -> ExpertLoadReporter:
        """Configured from PALS_ENGINE_SOCKET and PALS_EXPERT_REPORT_INTERVAL_S (default 1 s)."""
        interval = interval_from_env("PALS_EXPERT_REPORT_INTERVAL_S", 1.0, 0.01)
        return cls(engine_socket_from_env(), gpu_uuid, snapshot, interval, gpu_index=gpu_index)

    def start(self) -> None:
        """Start the reporter thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"pals-expert-load-{self.gpu_uuid}", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the thread: the stream ends cleanly (and the daemon's ack is counted), or is cancelled."""
        self._stop.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout_s / 2)
        call = self._call
        if thread.is_alive() and call is not None:
            call.cancel()  # type: ignore[attr-defined]  # a hung daemon never acks
            thread.join(timeout_s / 2)

    def _run(self) -> None:
        run_with_backoff(self._stop, self._session, self.min_backoff_s, self.max_backoff_s, self._failed)

    def _failed(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.debug("pals expert-load reporter: %s", self.last_error)

    def _session(self) -> bool:
        """One stream until close() or an error; returns whether the daemon acknowledged it."""
        import grpc  # noqa: PLC0415 - keeps the import of this module cheap

        from pals_daemon.api import pals_pb2, pals_pb2_grpc  # noqa: PLC0415

        self.connects += 1
        options = [("grpc.enable_http_proxy", 0)]
        with grpc.insecure_channel(f"unix:{self.socket_path}", options=options) as channel:
            stub = pals_pb2_grpc.EngineLinkStub(channel)
            call = stub.ReportExpertLoad.future(self._reports(pals_pb2))
            self._call = call
            try:
                ack = call.result()
            finally:
                self._call = None
        self.accepted += ack.accepted
        self.unattributed += ack.unattributed
        return True

    def _reports(self, pals_pb2: object) -> Iterator[object]:
        """The request stream (run by grpc's sender thread): one report per interval with new counts."""
        baseline: dict[int, list[int]] = {}
        try:
            baseline, _ = count_deltas({}, self.snapshot())  # counts from before this stream belong to no window
        except Exception as exc:  # noqa: BLE001 - a snapshot failure must not end the worker
            self.snapshot_errors += 1
            self._failed(exc)
        last = self.clock()
        idle = 0
        while not self._stop.wait(self.interval_s):
            try:
                current = self.snapshot()
            except Exception as exc:  # noqa: BLE001
                self.snapshot_errors += 1
                self._failed(exc)
                continue
            now = self.clock()
            baseline, deltas = count_deltas(baseline, current)
            window_s, last = now - last, now
            if not deltas:
                idle += 1
                # An idle GPU has nothing to tell, but the daemon ends a stream silent for its first-message or
                # silence timeout (5 s / 10 s, server/limits.py): an empty report every few intervals keeps it.
                if idle * self.interval_s < KEEPALIVE_S:
                    continue
            idle = 0
            report = pals_pb2.ExpertLoadReport(window_s=max(0.0, window_s))  # type: ignore[attr-defined]
            if self.gpu_uuid:
                report.gpu_uuid = self.gpu_uuid
            else:
                report.gpu_index = int(self.gpu_index or 0)
            for layer, counts in deltas:
                report.layers.add(layer=layer, tokens_per_expert=counts)
                self.tokens_sent += sum(counts)
            self.reports_sent += 1
            yield report
