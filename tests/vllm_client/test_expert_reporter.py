"""ExpertLoadReporter (a GPU worker's expert-routing counts) against a real daemon over the real engine socket.

No torch or vllm: the counts come from a plain callable here; tests/vllm/test_routing_extension.py feeds
the same reporter from real vLLM routers. The daemon attributes each report to the engine session that
runs on the report's GPU, and the controller sees the per-GPU shares in that engine's observation.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from vllm_client.test_engine_client import DaemonThread, client, daemon, eventually

from pals_daemon.control.types import ControllerInput
from pals_daemon.vllm.expert_reporter import ExpertLoadReporter, count_deltas

SHARES = (0.4, 0.2, 0.2, 0.2)  # of routed tokens, per GPU: GPU 0 hosts the hot experts


class GrowingCounts:
    """Cumulative per-expert counts of one GPU (2 layers x 2 local experts), advanced by the test."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.layers: list[list[int]] = [[0, 0], [0, 0]]
        self.calls = 0

    def add(self, tokens: int) -> None:
        with self.lock:
            for layer in self.layers:
                layer[0] += tokens // 2
                layer[1] += tokens - tokens // 2

    def snapshot(self) -> list[tuple[int, list[int]]]:
        with self.lock:
            self.calls += 1
            return [(3, list(self.layers[0])), (7, list(self.layers[1]))]


def record_shares(d: DaemonThread) -> list[dict[int, float]]:
    """Wrap the daemon's controller so that every tick's expert-load shares (of engine 0) are kept."""
    seen: list[dict[int, float]] = []
    controller = d.runner.daemon.controller
    step = controller.step

    def recording_step(inp: ControllerInput) -> Any:
        for e in inp.engines:
            if e.expert_load_share:
                seen.append(dict(e.expert_load_share))
        return step(inp)

    d.call(lambda: setattr(controller, "step", recording_step))
    return seen


def reporter(d: DaemonThread, uuid: str, counts: GrowingCounts, **kwargs: Any) -> ExpertLoadReporter:
    r = ExpertLoadReporter(d.socket_path, uuid, counts.snapshot, interval_s=0.05, max_backoff_s=0.2, **kwargs)
    r.start()
    return r


def test_count_deltas_sends_increments_and_survives_a_reset() -> None:
    base, deltas = count_deltas({}, [(0, [5, 0]), (1, [0, 0])])
    assert deltas == [(0, [5, 0])]  # an all-zero layer is left out
    base, deltas = count_deltas(base, [(0, [7, 3]), (1, [0, 4])])
    assert deltas == [(0, [2, 3]), (1, [0, 4])]
    # A counter that went down was re-created: count it from zero, never negative.
    _, deltas = count_deltas(base, [(0, [1, 3]), (1, [0, 4])])
    assert deltas == [(0, [1, 0])]


def test_reports_are_attributed_to_the_engine_on_that_gpu(dirs: tuple[Path, Path]) -> None:
    with daemon(dirs) as d:
        seen = record_shares(d)
        counts = [GrowingCounts() for _ in d.uuids]
        reporters = [reporter(d, uuid, c) for uuid, c in zip(d.uuids, counts, strict=True)]
        try:
            # Before any engine registered: the worker's reports are dropped as unattributed, not refused.
            def reported_unregistered() -> bool:
                for c in counts:
                    c.add(100)  # counted from each stream's start: keep adding until every stream sent some
                return all(r.reports_sent >= 1 for r in reporters)

            eventually(reported_unregistered, what="reports before registration")
            with client(d.socket_path, d.uuids) as c_engine:
                c_engine.start()
                eventually(lambda: c_engine.registrations == 1, what="engine registration")

                def skewed_ticks() -> int:
                    for c, share in zip(counts, SHARES, strict=True):
                        c.add(int(1000 * share))
                    return sum(1 for s in seen if len(s) == 4)

                eventually(lambda: skewed_ticks() >= 5, what="ticks with all four GPUs' expert load")
        finally:
            for r in reporters:
                r.close()
        # The ack comes at the end of each stream: every reporter's first report had no engine to go to.
        assert all(r.unattributed >= 1 for r in reporters)
        assert sum(r.accepted for r in reporters) >= 4
        assert all(r.last_error == "" or "Cancelled" in r.last_error for r in reporters), [
            r.last_error for r in reporters
        ]
        full = [s for s in seen if len(s) == 4]
        mean = {g: sum(s[g] for s in full) / len(full) for g in range(4)}
        for g, share in enumerate(SHARES):
            assert mean[g] == pytest.approx(share, abs=0.05), mean


def test_unmanaged_gpu_is_refused_and_retried_without_crashing(dirs: tuple[Path, Path]) -> None:
    with daemon(dirs) as d:
        counts = GrowingCounts()
        r = reporter(d, "GPU-not-on-this-node", counts)
        try:

            def refused() -> bool:
                counts.add(10)  # new counts every poll: each stream reports only what came after its start
                return "not managed" in r.last_error

            eventually(refused, what="refusal")
            assert "INVALID_ARGUMENT" in r.last_error and "GPU-not-on-this-node" in r.last_error
            connects = r.connects
            eventually(lambda: refused() and r.connects > connects, what="a retry after the refusal")
        finally:
            r.close()


def test_absent_daemon_only_costs_retries(short_tmp: Path) -> None:
    counts = GrowingCounts()
    r = ExpertLoadReporter(str(short_tmp / "nobody.sock"), "GPU-x", counts.snapshot, 0.05, max_backoff_s=0.1)
    r.start()
    try:
        eventually(lambda: r.connects >= 3, what="reconnect attempts")
        assert r.reports_sent == 0 and r.accepted == 0
    finally:
        r.close()
    assert r._thread is not None and not r._thread.is_alive()


def test_needs_a_gpu_identity() -> None:
    with pytest.raises(ValueError, match="UUID or index"):
        ExpertLoadReporter("/nonexistent", "", lambda: [])


def raw_expert_stream(d: DaemonThread, reports: list[Any]) -> Any:
    import grpc

    from pals_daemon.api import pals_pb2_grpc

    with grpc.insecure_channel(f"unix:{d.socket_path}") as channel:
        try:
            return pals_pb2_grpc.EngineLinkStub(channel).ReportExpertLoad(iter(reports), timeout=10)
        except grpc.RpcError as exc:
            return exc


def test_bad_or_flooding_expert_streams_are_refused(dirs: tuple[Path, Path]) -> None:
    import grpc

    from pals_daemon.api import pals_pb2

    def report(**kw: Any) -> Any:
        values: dict[str, Any] = {"gpu_uuid": d.uuids[1], "window_s": 1.0}
        values.update(kw)
        rep = pals_pb2.ExpertLoadReport(**values)
        rep.layers.add(layer=0, tokens_per_expert=[5, 7])
        return rep

    with daemon(dirs) as d:
        # Refused even with no engine to attribute it to, naming the field; nothing is counted.
        err = raw_expert_stream(d, [report(), report(window_s=float("nan"))])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "window_s" in err.details()
        too_many = report()
        too_many.layers.add(layer=1, tokens_per_expert=[2**40])
        err = raw_expert_stream(d, [too_many])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens_per_expert" in err.details()
        # A flood far beyond any report interval ends the stream.
        err = raw_expert_stream(d, [report() for _ in range(5000)])
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert d.call(lambda: d.runner.engine_link.floods) >= 1
        # An honest stream still works afterwards.
        ack = raw_expert_stream(d, [report(), report()])
        assert (ack.accepted, ack.unattributed) == (0, 2)
