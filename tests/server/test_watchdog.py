"""The systemd watchdog is fed by the control tick: a stuck control loop stops the WATCHDOG=1 pings even while
the event loop (gRPC, metrics) still runs, so systemd kills the daemon and ExecStopPost restores the caps.

A datagram socket stands in for systemd's NOTIFY_SOCKET; the daemon runs in this process (simulated GPUs).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import async_helpers
import grpc
import pytest

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.clock import MonotonicClock
from pals_daemon.config import DaemonConfig
from pals_daemon.model.profile import load_profiles
from pals_daemon.server.daemon import default_profiles_dir
from pals_daemon.server.runner import Runner
from pals_daemon.sim.gpu import SimBackend, make_sim_gpus

PERIOD_S = 0.1
# WatchdogSec=1s for the test (the unit uses 10 s): systemd asks for a ping at least every 0.5 s.
WATCHDOG_USEC = 1_000_000
WATCHDOG_HALF_S = WATCHDOG_USEC / 1e6 / 2


class NotifyListener:
    """systemd's side of NOTIFY_SOCKET: a thread stamps every datagram with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.received: list[tuple[float, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                self.received.append((time.monotonic(), self.sock.recv(4096)))
            except TimeoutError:
                continue

    def pings(self, since: float = 0.0) -> list[float]:
        return [t for t, msg in list(self.received) if msg == b"WATCHDOG=1" and t >= since]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def notify(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    listener = NotifyListener(short_tmp / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_tmp / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    umask = os.umask(0o022)
    os.umask(umask)
    yield listener
    os.umask(umask)
    listener.close()


def make_runner(short_tmp: Path, tmp_path: Path) -> Runner:
    cfg = DaemonConfig(
        backend="sim",
        runtime_dir=str(short_tmp / "run"),
        state_dir=str(tmp_path / "state"),
        engine_socket_group="",
        metrics_port=0,
        period_s=PERIOD_S,
        directive_ttl_s=1.0,
    )
    clock = MonotonicClock()
    gpus = make_sim_gpus("A100-SXM4", 4, clock.now)
    return Runner(cfg, SimBackend(gpus), load_profiles(default_profiles_dir()), clock)


def test_a_stuck_tick_stops_the_pings_while_the_event_loop_still_serves(
    notify: NotifyListener, short_tmp: Path, tmp_path: Path
) -> None:
    async def body() -> None:
        runner = make_runner(short_tmp, tmp_path)
        await runner.start()
        task = asyncio.create_task(runner.run())
        release = asyncio.Event()
        try:
            started = time.monotonic()
            await asyncio.sleep(1.0)
            pings = notify.pings(started)
            assert (b"READY=1" in [m for _, m in notify.received]) and len(pings) >= 3
            # Healthy: a ping every tick, never a gap systemd would act on.
            gaps = [b - a for a, b in zip([started, *pings], pings, strict=False)]
            assert max(gaps) < WATCHDOG_HALF_S

            # The control loop hangs inside a tick (an await that never completes).
            real_read = runner.daemon._read_gpus

            async def hang(now_s: float) -> None:
                await release.wait()
                await real_read(now_s)

            runner.daemon._read_gpus = hang  # type: ignore[method-assign]
            hung_at = time.monotonic() + PERIOD_S + 0.05  # the tick in flight may still ping once
            await asyncio.sleep(3 * WATCHDOG_HALF_S * 2)
            assert notify.pings(hung_at) == [], "a stuck control loop must not feed the watchdog"
            # The event loop itself is alive (a loop-level heartbeat would have kept pinging).
            async with grpc.aio.insecure_channel(f"unix:{runner.config.admin_socket_path}") as channel:
                status = await pals_pb2_grpc.PowerAdminStub(channel).GetStatus(pals_pb2.GetStatusRequest())
            assert len(status.gpus) == 4

            # Unstuck (systemd would have restarted it by now): the pings resume with the ticks.
            resumed = time.monotonic()
            release.set()
            await async_helpers.eventually(lambda: len(notify.pings(resumed)) >= 2, 3.0)
        finally:
            release.set()
            runner.daemon.request_stop()
            await asyncio.wait_for(task, 10.0)
        await asyncio.sleep(0.2)
        assert notify.received[-1][1] == b"STOPPING=1"

    async_helpers.drive(body(), 30.0)


def test_a_tick_that_raises_ends_the_daemon_with_limits_restored(
    notify: NotifyListener, short_tmp: Path, tmp_path: Path
) -> None:
    # A crashing loop does not keep pinging either: run() returns the error after restoring the limits.
    async def body() -> None:
        runner = make_runner(short_tmp, tmp_path)
        await runner.start()
        await runner.daemon.set_budget(600.0)
        assert sum(g.requested_limit_mw for g in runner.daemon.gpus) <= 600_000

        async def broken(now_s: float) -> None:
            raise RuntimeError("controller bug")

        runner.daemon._read_gpus = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="controller bug"):
            await asyncio.wait_for(runner.run(), 10.0)
        # The sim GPUs are back at their original 400 W: the exit path restored them.
        assert [g.read().enforced_limit_mw for g in runner.daemon.backend.open()] == [400_000] * 4

    async_helpers.drive(body(), 30.0)
