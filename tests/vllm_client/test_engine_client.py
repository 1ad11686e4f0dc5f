"""EngineLinkClient (pals_daemon.vllm.client) against a real daemon in this process, over a real socket.

No vllm needed: this is the part of the vLLM integration that runs in the default stage. The daemon runs
on the simulated backend in a background thread with its own event loop; the client is driven from the test
thread exactly as vLLM's scheduler thread drives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pals_daemon.clock import MonotonicClock
from pals_daemon.config import DaemonConfig
from pals_daemon.model.profile import load_profiles
from pals_daemon.server.daemon import default_profiles_dir
from pals_daemon.server.runner import Runner
from pals_daemon.sim.gpu import SimBackend, make_sim_gpus
from pals_daemon.vllm.client import EngineLinkClient, default_engine_id

MODEL = "mixtral-8x7b-instruct"  # has a profile for 4x A100-SXM4
PERIOD_S = 0.1
TTL_S = 0.5
# A hot-path call must never wait on the network: a wait would last an RPC timeout or a backoff (>= 50 ms here,
# seconds in production). 1 ms failed at 1.06 ms on a loaded 2-core machine (a GC pause, not a wait).
HOT_PATH_LIMIT_S = 0.02


class DaemonThread:
    """A real daemon (sim backend, 4 A100) on its own event loop in a background thread."""

    def __init__(self, runtime_dir: Path, state_dir: Path, **overrides: Any) -> None:
        values: dict[str, Any] = {
            "backend": "sim",
            "runtime_dir": str(runtime_dir),
            "state_dir": str(state_dir),
            "engine_socket_group": "",
            "metrics_port": 0,
            "period_s": PERIOD_S,
            "directive_ttl_s": TTL_S,
        }
        values.update(overrides)
        clock = MonotonicClock()
        self.gpus = make_sim_gpus("A100-SXM4", 4, clock.now)
        self.runner = Runner(
            DaemonConfig(**values), SimBackend(self.gpus), load_profiles(default_profiles_dir()), clock
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    @property
    def socket_path(self) -> str:
        return self.runner.config.engine_socket_path

    @property
    def uuids(self) -> list[str]:
        return [g.identity.uuid for g in self.gpus]

    def _main(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            try:
                await self.runner.start()
            finally:
                self._ready.set()
            try:
                # Not runner.run(): it installs signal handlers, which only the main thread may.
                await self.runner.daemon.run(watchdog=None)
            finally:
                await self.runner.stop()

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()/stop()
            self._error = exc
            self._ready.set()

    def start(self) -> DaemonThread:
        self._thread.start()
        assert self._ready.wait(10.0), "daemon did not start"
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.runner.daemon.request_stop)
        self._thread.join(10.0)
        assert not self._thread.is_alive(), "daemon did not stop"

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the daemon's loop (its state is loop-owned) and return the result."""
        assert self.loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5.0)

    def engine_status(self, engine_id: str) -> Any:
        for e in self.call(lambda: list(self.runner.daemon.status.engines)):
            if e.engine_id == engine_id:
                return e
        return None


def eventually(
    predicate: Callable[[], Any], timeout_s: float = 5.0, what: str = "condition", interval_s: float = 0.01
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        time.sleep(interval_s)


@contextlib.contextmanager
def daemon(dirs: tuple[Path, Path], **overrides: Any) -> Iterator[DaemonThread]:
    d = DaemonThread(*dirs, **overrides).start()
    try:
        yield d
    finally:
        d.stop()


@contextlib.contextmanager
def client(socket_path: str, uuids: list[str], **kwargs: Any) -> Iterator[EngineLinkClient]:
    values: dict[str, Any] = {
        "engine_id": "vllm-test",
        "model": MODEL,
        "gpu_uuids": uuids,
        "max_num_seqs": 128,
        "max_num_batched_tokens": 8192,
        "report_interval_s": 0.05,
        "register_timeout_s": 0.5,
        "max_backoff_s": 0.2,
    }
    values.update(kwargs)
    c = EngineLinkClient(socket_path, **values)
    try:
        yield c
    finally:
        c.close()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def drive_steps(c: EngineLinkClient, seconds: float, decode_per_step: int = 64) -> float:
    """Record steps as a busy engine would for ``seconds``; returns the slowest hot-path call.

    The thread is started first (the scheduler does so in its constructor): starting a thread is the one
    thing the lazy first call does that is not constant-time.
    """
    c.start()
    worst = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _, t1 = timed(lambda: c.record_step(0.004, 32, 5, 16, decode_per_step, 0.3, 1, ((120.0, 12.0, 100, 50),)))
        _, t2 = timed(c.current_limits)
        worst = max(worst, t1, t2)
        time.sleep(0.005)
    return worst


# ------------------------------------------------------------------------------------------------ tests


def test_registers_reports_and_receives_directives(dirs: tuple[Path, Path]) -> None:
    with daemon(dirs) as d, client(d.socket_path, d.uuids) as c:
        assert c.current_limits() is None  # starts the thread; nothing received yet
        eventually(lambda: c.registrations == 1, what="registration")
        worst = drive_steps(c, 1.0)
        status = eventually(
            lambda: (e := d.engine_status("vllm-test")) is not None and e.throughput_tokens_per_s > 0 and e,
            what="throughput in the engine status",
        )
        assert status.connected and status.model == MODEL
        assert list(status.gpu_indices) == [0, 1, 2, 3]
        assert status.configured_max_num_seqs == 128
        assert status.num_running == 32 and status.num_waiting == 5
        # ~64 tokens per ~5 ms step: a few thousand tokens/s (loose: sleep granularity varies).
        assert 1_000 < status.throughput_tokens_per_s < 20_000
        limits = eventually(c.current_limits, what="a directive")
        assert 1 <= limits[0] <= 128 and 1 <= limits[1] <= 8192
        assert c.directives_received >= 1 and c.reports_sent >= 1 and c.dropped_steps == 0
        assert worst < HOT_PATH_LIMIT_S, worst


def test_directive_limits_are_what_the_daemon_decided(dirs: tuple[Path, Path]) -> None:
    with daemon(dirs) as d, client(d.socket_path, d.uuids) as c:
        c.start()
        eventually(lambda: c.registrations == 1, what="registration")
        # What the controller decided for this engine is what current_limits returns.
        eventually(lambda: c.current_limits() is not None, what="a directive")
        session = eventually(lambda: d.call(lambda: d.runner.daemon.engines.get("vllm-test")), what="session")
        decided = (session.current_max_num_seqs, session.current_max_num_batched_tokens)
        eventually(lambda: c.current_limits() == decided, what=f"limits {decided}")


def test_directive_expires_to_none() -> None:
    """A directive is live for ttl_ms after it arrived (on the client's clock), then None."""
    from pals_daemon.api import pals_pb2

    now = [100.0]
    c = EngineLinkClient("/nonexistent/engine.sock", "e1", MODEL, ["GPU-x"], 64, 4096, clock=lambda: now[0])
    try:
        c._apply(pals_pb2.Directive(sequence=1, max_num_seqs=16, max_num_batched_tokens=99_999, ttl_ms=500))
        # Never above the configured values.
        assert c.current_limits() == (16, 4096)
        now[0] += 0.499
        assert c.current_limits() == (16, 4096)
        now[0] += 0.002
        assert c.current_limits() is None
        c._apply(pals_pb2.Directive(sequence=2, max_num_seqs=0, max_num_batched_tokens=1, ttl_ms=500))
        assert c.current_limits() == (1, 1)  # a zero limit would stall the engine: at least 1
    finally:
        c.close()


def test_limits_expire_when_the_daemon_goes_away(dirs: tuple[Path, Path]) -> None:
    with daemon(dirs) as d, client(d.socket_path, d.uuids) as c:
        c.start()
        eventually(c.current_limits, what="a directive")
    # The daemon stopped (its session ended): the last directive lives at most TTL_S more.
    started = time.monotonic()
    eventually(lambda: c.current_limits() is None, timeout_s=TTL_S + 1.0, what="expiry")
    assert time.monotonic() - started <= TTL_S + 0.5


def test_absent_daemon_never_blocks_and_client_connects_when_it_appears(dirs: tuple[Path, Path]) -> None:
    runtime, _ = dirs
    socket_path = str(runtime / "engine.sock")
    with client(socket_path, ["GPU-placeholder"]) as c:
        worst = drive_steps(c, 0.5)
        assert worst < HOT_PATH_LIMIT_S, worst
        assert c.current_limits() is None
        assert c.registrations == 0 and c.connects >= 2  # it keeps retrying
        with daemon(dirs) as d:
            assert str(d.socket_path) == socket_path
            c.gpu_uuids = d.uuids  # the sim GPUs' UUIDs are only known now (read by the next connect)
            worst = max(worst, drive_steps(c, 0.3))
            eventually(lambda: c.registrations >= 1, what="registration after the daemon appeared")
            eventually(c.current_limits, what="a directive")
            assert worst < HOT_PATH_LIMIT_S, worst


def test_killed_daemon_is_reconnected_to_after_restart(dirs: tuple[Path, Path]) -> None:
    first = DaemonThread(*dirs).start()
    with client(first.socket_path, first.uuids) as c:
        try:
            c.start()
            eventually(lambda: c.registrations == 1, what="first registration")
        finally:
            first.stop()
        worst = drive_steps(c, 0.3)  # the daemon is gone
        with daemon(dirs) as second:
            c.gpu_uuids = second.uuids
            worst = max(worst, drive_steps(c, 0.2))
            eventually(lambda: c.registrations == 2, what="second registration")
            eventually(
                lambda: (e := second.engine_status("vllm-test")) is not None and e.connected, what="engine status"
            )
        assert worst < HOT_PATH_LIMIT_S, worst


def test_hung_daemon_never_blocks_and_is_retried(short_tmp: Path) -> None:
    """A "daemon" that accepts connections and never answers: no Registered, so the client reconnects."""
    path = str(short_tmp / "hung.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn)  # held open, never read or written
            except OSError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        with client(path, ["GPU-x"], register_timeout_s=0.3) as c:
            worst = drive_steps(c, 1.5)
            assert worst < HOT_PATH_LIMIT_S, worst
            assert c.current_limits() is None and c.registrations == 0
            assert len(accepted) >= 2, "the client should give up on the hung peer and connect again"
            assert c.connects >= 2
            closed_started = time.monotonic()
        assert time.monotonic() - closed_started < 3.0  # close() does not hang on the silent peer either
    finally:
        stop.set()
        acceptor.join(2.0)
        for conn in accepted:
            conn.close()
        server.close()


def test_full_queue_drops_and_counts() -> None:
    c = EngineLinkClient("/nonexistent/engine.sock", "e1", MODEL, ["GPU-x"], 64, 4096, max_queued_steps=10)
    try:
        c._owner_pid = os.getpid()  # no thread: nothing drains the queue
        for _ in range(15):
            c.record_step(0.001, 1, 0, 0, 1, 0.0)
        assert len(c._steps) == 10 and c.dropped_steps == 5
    finally:
        c.close()


def test_report_aggregates_steps() -> None:
    from pals_daemon.api import pals_pb2

    c = EngineLinkClient("/nonexistent/engine.sock", "e1", MODEL, ["GPU-x"], 64, 4096)
    c._owner_pid = os.getpid()
    c.record_step(0.01, 3, 2, 100, 3, 0.25, arrived_requests=2)
    c.record_step(0.02, 4, 1, 0, 4, 0.5, finished=((50.0, 10.0, 100, 8), (float("nan"), 1.0, 1, 1)))
    msg = c._take_report(0.5, pals_pb2)
    r = msg.step
    assert (r.num_steps, r.prefill_tokens, r.decode_tokens, r.arrived_requests) == (2, 100, 7, 2)
    assert r.busy_s == pytest.approx(0.03) and r.window_s == 0.5
    assert (r.num_running, r.num_waiting, r.kv_cache_usage) == (4, 1, 0.5)
    assert [(f.ttft_ms, f.tpot_ms, f.prompt_tokens, f.output_tokens) for f in r.finished] == [(50.0, 10.0, 100, 8)]
    idle = c._take_report(0.1, pals_pb2).step
    assert (idle.num_steps, idle.decode_tokens, idle.num_running, idle.kv_cache_usage) == (0, 0, 4, 0.5)


def test_deferred_steps_are_counted_on_the_client_thread() -> None:
    """record_scheduler_step queues the outputs uncounted; the report counts them and reads the gauges then."""
    from pals_daemon.api import pals_pb2

    c = EngineLinkClient("/nonexistent/engine.sock", "e1", MODEL, ["GPU-x"], 64, 4096)
    c._owner_pid = os.getpid()
    counted: list[object] = []
    gauges = [(7, 2, 0.4)]

    def decode_of(outputs: object) -> int:
        counted.append(outputs)
        return len(outputs)  # type: ignore[arg-type]

    c.set_step_source(decode_of, lambda: gauges[0])
    c.record_scheduler_step(0.01, 100, ["dropped"], 1)  # no session: nothing is queued (nor held)
    assert len(c._steps) == 0
    c.connected = True  # as if registered
    c.record_scheduler_step(0.01, 100, ["a", "b", "c"], 2)
    c.record_scheduler_step(0.02, 5, ["d"] * 5, 0, ((40.0, 8.0, 90, 6),))
    assert counted == []  # nothing counted in the step
    r = c._take_report(0.5, pals_pb2).step
    assert len(counted) == 2
    assert (r.num_steps, r.prefill_tokens, r.decode_tokens, r.arrived_requests) == (2, 97, 8, 2)
    assert (r.num_running, r.num_waiting, r.kv_cache_usage) == (7, 2, pytest.approx(0.4))
    assert [(f.ttft_ms, f.prompt_tokens) for f in r.finished] == [(40.0, 90)]

    # A counting or gauge failure (say, a vLLM change) costs that figure, never the report or the session.
    c.set_step_source(lambda o: 1 // 0, lambda: (_ for _ in ()).throw(AttributeError("usage")))
    c.record_scheduler_step(0.01, 10, [], 0)
    r = c._take_report(0.5, pals_pb2).step
    assert (r.num_steps, r.decode_tokens, r.prefill_tokens) == (1, 0, 10)
    assert (r.num_running, r.num_waiting) == (7, 2)  # the last gauges seen
    assert "gauges" in c.last_error


def test_fork_child_starts_its_own_thread(dirs: tuple[Path, Path]) -> None:
    if sys.platform != "linux":
        pytest.skip("fork semantics checked on Linux only")
    with daemon(dirs) as d, client(d.socket_path, d.uuids) as c:
        c.start()
        eventually(lambda: c.registrations == 1, what="registration")
        c.close()  # the parent's session ends, as in vLLM, where the EngineCore forks before any use
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: a fresh thread, a fresh session
            code = 1
            try:
                c._stop.clear()
                c.current_limits()
                deadline = time.monotonic() + 5.0
                while c.registrations < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                code = 0 if c.registrations >= 2 and c._owner_pid == os.getpid() else 2
            finally:
                os.write(write_fd, bytes([code]))
                os._exit(0)
        os.close(write_fd)
        import select
        import signal

        ready, _, _ = select.select([read_fd], [], [], 15.0)
        if not ready:  # a hung child must fail the test, not hang it
            os.kill(pid, signal.SIGKILL)
        with os.fdopen(read_fd, "rb") as f:
            result = f.read(1) if ready else b"timeout"
        os.waitpid(pid, 0)
        assert result == b"\x00", result


def test_default_engine_id(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    monkeypatch.delenv("PALS_ENGINE_ID", raising=False)
    pattern = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
    assert pattern.fullmatch(default_engine_id(0)) and default_engine_id(0).endswith("-dp0")
    assert default_engine_id().endswith(f"-{os.getpid()}")
    monkeypatch.setenv("PALS_ENGINE_ID", "my-engine")
    assert default_engine_id(3) == "my-engine"
    monkeypatch.setenv("PALS_ENGINE_SOCKET", "/tmp/x.sock")
    monkeypatch.setenv("PALS_REPORT_INTERVAL_S", "0.25")
    c = EngineLinkClient.from_env(MODEL, ["GPU-x"], 8, 512)
    assert (c.socket_path, c.engine_id, c.report_interval_s) == ("/tmp/x.sock", "my-engine", 0.25)


def test_importing_the_package_does_not_import_vllm_or_grpc() -> None:
    """The daemon and vLLM's plugin loader import these modules: neither may pull in vllm at import."""
    import subprocess

    code = (
        "import sys; import pals_daemon.vllm, pals_daemon.vllm.client, pals_daemon.vllm.plugin; "
        "bad = [m for m in ('vllm', 'torch', 'grpc') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PALS_VLLM_ENABLE": "1"})
