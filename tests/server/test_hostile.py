"""Issue 10 B: each hostile-client attack against a live daemon process, which must hold up through it.

The daemon is the real ``pals-daemon`` process on two fake A100s (tests/fake_nvml), enforce mode, a budget
that caps both GPUs, metrics on a loopback port, and systemd's default descriptor limit (1024) so that
descriptor exhaustion is what it would be under the unit without LimitNOFILE. Each attack runs in its own
process (bench/hostile_clients.py), the measurements are taken from this one. Through every attack:
the admin path answers within 1 s, the tick keeps its period (p99 gap < 2 periods), RSS grows < 100 MB;
and after it, SIGTERM ends the daemon cleanly with every GPU at its original limit.

The default stage runs each attack at a size that reproduced (or came close to) the failure within its
2.5 s; the sizes of the issue's reproductions (and 6 s each) are in the slow stage.
"""

from __future__ import annotations

import importlib.util
import resource
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from fake_nvml import FakeNvmlEnv
from test_daemon_subprocess import (  # the subprocess fixtures: one way to start the daemon for every test
    A100_ORIGINAL_MW,
    DaemonProcess,
    empty_config,  # noqa: F401  (fixture)
    fake_limits,
    free_port,
    start_daemon,  # noqa: F401  (fixture)
    two_a100,  # noqa: F401  (fixture)
)

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.server import limits

ROOT = Path(__file__).resolve().parents[2]
PERIOD_S = 0.5
# Two A100s (400 W maximum each) under 600 W: both capped for the whole attack.
BUDGET_W = 600
# The acceptance bounds of issue 10.
ADMIN_ANSWER_S = 1.0
TICK_GAP_PERIODS = 2.0
RSS_GROWTH_MB = 100.0
# systemd's default soft RLIMIT_NOFILE: what the daemon had before the unit set LimitNOFILE.
SYSTEMD_DEFAULT_NOFILE = 1024
# Descriptors the daemon may open beyond its own during an attack: the capped connections, and a few
# in flight (accepted, then closed at once for being over a cap).
FD_SLACK = 32

DEFAULT_SIZES = {
    "metrics-idle": 1000,
    "engine-idle": 1000,
    "expert-flood": 64,
    "unregistered": 400,
    "continuation": 16,
    "scrapers": 100,
    "churn": 400,
}
DEFAULT_DURATION_S = 2.5
SLOW_DURATION_S = 6.0


def bench() -> ModuleType:
    name = "hostile_clients"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "hostile_clients.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def capped_daemon(start_daemon: Any, fake: FakeNvmlEnv, port: int) -> DaemonProcess:  # noqa: F811
    daemon = start_daemon(
        "--backend", "nvml", "--period-s", str(PERIOD_S), "--metrics-port", str(port), "--budget-w", str(BUDGET_W),
        env=fake.env,
    )  # fmt: skip
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE, (SYSTEMD_DEFAULT_NOFILE, SYSTEMD_DEFAULT_NOFILE))
    deadline = time.monotonic() + 10
    while not sum(fake_limits(fake)) <= BUDGET_W * 1000:
        assert time.monotonic() < deadline, fake_limits(fake)
        time.sleep(0.05)
    return daemon


def attack(start_daemon: Any, fake: FakeNvmlEnv, name: str, size: int, duration_s: float) -> tuple[Any, list]:  # noqa: F811
    """Run one attack against a fresh capped daemon, check the acceptance bounds, stop it; (figures, set calls
    made during the attack)."""
    port = free_port()
    daemon = capped_daemon(start_daemon, fake, port)
    h = bench()
    target = h.Target(daemon.proc.pid, str(daemon.admin_socket), str(daemon.engine_socket), port, PERIOD_S, (0, 1))
    calls_before = len(fake.set_limit_calls())
    figures = h.measure(target, name, size, duration_s, baseline_s=0.5)
    calls = fake.set_limit_calls()[calls_before:]
    summary = f"{name}: {figures}\n{daemon.log()[-3000:]}"
    assert "error" not in figures.attacker, summary
    assert daemon.proc.poll() is None, summary
    assert figures.admin_failures == [], summary
    assert figures.admin_calls >= duration_s / 0.5, summary
    assert figures.admin_latency_max_s < ADMIN_ANSWER_S, summary
    assert figures.ticks >= duration_s / PERIOD_S / 2, summary
    assert figures.tick_gap_p99_s < TICK_GAP_PERIODS * PERIOD_S, summary
    assert figures.rss_growth_mb < RSS_GROWTH_MB, summary
    # Still capped through the attack, and every GPU back at its original limit after a plain SIGTERM.
    assert sum(fake_limits(fake)) <= BUDGET_W * 1000, summary
    assert daemon.terminate() == 0, daemon.log()
    assert fake_limits(fake) == [A100_ORIGINAL_MW] * 2, daemon.log()
    return figures, calls


def check_specific(name: str, figures: Any, calls: list, size: int) -> None:
    """What each attack must show besides the common bounds: that the bound in question was met."""
    seen = figures.attacker
    if name == "metrics-idle":
        # The daemon closed the connections over its cap instead of holding a descriptor (and thread) each.
        assert figures.fds_max <= figures.fds_before + limits.MAX_METRICS_CONNECTIONS + FD_SLACK, figures
        assert seen["closed_by_daemon"] >= seen["opened"] - limits.MAX_METRICS_CONNECTIONS, seen
    elif name == "engine-idle":
        assert figures.fds_max <= figures.fds_before + limits.MAX_ENGINE_CONNECTIONS + FD_SLACK, figures
        assert seen["closed_by_daemon"] >= seen["opened"] - limits.MAX_ENGINE_CONNECTIONS, seen
    elif name == "expert-flood":
        # Streams over the per-socket and per-GPU caps are refused (the rest are held by the report budget).
        assert seen["ended"].get("RESOURCE_EXHAUSTED", 0) > 0, seen
    elif name == "unregistered":
        assert seen["ended"].get("RESOURCE_EXHAUSTED", 0) > 0, seen
    elif name == "continuation":
        assert seen["bytes_sent"] > 0, seen
    elif name == "scrapers":
        assert seen["scrapes_ok"] > 0, seen
    elif name == "churn":
        # Session changes wake the loop at most wake_burst times, then every wake_min_interval_periods: so
        # at most 1 + 1/0.25 ticks per period (each writing a GPU's limit at most once), not one per change.
        lim = limits.EngineLimits()
        window_s = figures.duration_s + 3 * PERIOD_S
        max_ticks = window_s / PERIOD_S * (1 + 1 / lim.wake_min_interval_periods) + lim.wake_burst + 2
        assert seen["cycles"] >= min(size, 100), seen
        assert len(calls) <= 2 * max_ticks, (len(calls), max_ticks)
        assert len(calls) < seen["cycles"], (len(calls), seen)


@pytest.mark.parametrize("name", sorted(DEFAULT_SIZES))
def test_attack_is_held(name: str, start_daemon, two_a100: FakeNvmlEnv) -> None:  # noqa: F811
    figures, calls = attack(start_daemon, two_a100, name, DEFAULT_SIZES[name], DEFAULT_DURATION_S)
    check_specific(name, figures, calls, DEFAULT_SIZES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DEFAULT_SIZES))
def test_attack_at_the_issues_size_is_held(name: str, start_daemon, two_a100: FakeNvmlEnv) -> None:  # noqa: F811
    size = bench().ATTACKS[name]
    figures, calls = attack(start_daemon, two_a100, name, size, SLOW_DURATION_S)
    check_specific(name, figures, calls, size)


def test_admin_socket_answers_while_the_engine_socket_is_at_its_connection_cap(
    start_daemon,  # noqa: F811
    two_a100: FakeNvmlEnv,  # noqa: F811
) -> None:
    # The caps are per socket: filling the engine socket's leaves the admin socket's untouched.
    import socket

    daemon = capped_daemon(start_daemon, two_a100, free_port())
    conns = []
    try:
        for _ in range(limits.MAX_ENGINE_CONNECTIONS + 50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(daemon.engine_socket))
            conns.append(s)
        with grpc.insecure_channel(f"unix:{daemon.admin_socket}") as channel:
            started = time.perf_counter()
            status = pals_pb2_grpc.PowerAdminStub(channel).SetBudget(
                pals_pb2.SetBudgetRequest(budget_w=BUDGET_W - 100), timeout=ADMIN_ANSWER_S
            )
            assert time.perf_counter() - started < ADMIN_ANSWER_S
            assert status.budget_w == BUDGET_W - 100
        assert sum(fake_limits(two_a100)) <= (BUDGET_W - 100) * 1000
    finally:
        for s in conns:
            s.close()
    assert daemon.terminate() == 0
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2
