"""The bounded /metrics endpoint (issue 10 B1, B7): connection cap, per-connection deadline, one rendering
per tick however many scrape. Real HTTP over loopback against Metrics.serve."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from pals_daemon.api import pals_pb2
from pals_daemon.metrics import Metrics
from pals_daemon.server import metrics_http
from pals_daemon.server.limits import MAX_METRICS_CONNECTIONS


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch):
    # A short deadline (chosen test value) so that the slowloris case takes a second, not five.
    monkeypatch.setattr(metrics_http, "METRICS_REQUEST_DEADLINE_S", 0.5)
    monkeypatch.setattr(metrics_http._MetricsHandler, "timeout", 0.5)
    metrics = Metrics(lambda: pals_pb2.NodeStatus(), registry=CollectorRegistry())
    port = metrics.serve("127.0.0.1", 0)
    yield metrics, port
    metrics.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def closed_within(s: socket.socket, timeout_s: float) -> bool:
    s.settimeout(timeout_s)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_connections_over_the_cap_are_closed_at_once_and_idle_ones_at_their_deadline(served) -> None:
    metrics, port = served
    server = metrics._server
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_METRICS_CONNECTIONS)]
    time.sleep(0.2)
    assert server.active == MAX_METRICS_CONNECTIONS
    extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    assert all(closed_within(s, 1.0) for s in extra)
    assert server.rejected >= 5
    # Idle (or trickling) connections lose their slot at the deadline; scrapes then get through again.
    started = time.perf_counter()
    assert all(closed_within(s, 3.0) for s in idle)
    assert time.perf_counter() - started < 2.0
    assert "pals_controller_info" in scrape(port)
    for s in idle + extra:
        s.close()


def test_a_trickling_client_cannot_hold_a_slot_past_the_deadline(served) -> None:
    metrics, port = served
    s = socket.create_connection(("127.0.0.1", port))
    started = time.perf_counter()
    closed = False
    for _ in range(40):  # one header byte every 0.1 s: each read is in time, the whole request is not
        try:
            s.sendall(b"G")
        except OSError:
            closed = True
            break
        if closed_within(s, 0.1):
            closed = True
            break
    assert closed and time.perf_counter() - started < 2.0
    assert metrics._server.reaped >= 1
    s.close()


def test_scrapes_share_one_rendering_per_tick(served) -> None:
    metrics, port = served
    exposition = metrics.exposition
    first = scrape(port)
    renders = exposition.renders
    for _ in range(20):
        assert scrape(port) == first
    assert exposition.renders == renders
    metrics.observe_tick(0.002)  # a tick: the next scrape renders afresh (the histogram moved)
    after = scrape(port)
    assert exposition.renders == renders + 1
    assert "pals_controller_tick_duration_seconds_count 1.0" in after
