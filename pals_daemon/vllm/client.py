"""The EngineLink client that runs inside a vLLM EngineCore process (pure Python: no vllm import).

The scheduler thread calls only two methods, and neither ever waits on the network:

- ``record_step(...)`` appends one step's telemetry to a bounded deque (dropped and counted when full);
- ``record_scheduler_step(...)`` is the cheaper variant the vLLM scheduler uses: it queues the step's raw
  outputs object, and the client thread counts its tokens and reads the gauges (running, waiting, KV usage)
  through the callables given to ``set_step_source`` (measured: bench/vllm_overhead.py);
- ``current_limits()`` reads an immutable (limits, expiry) snapshot and returns None once it has expired
  or before any directive, so that the scheduler falls back to its configured limits (fail-open).

A daemon thread, started lazily on first use (and again in a forked child, whose threads did not survive
the fork), owns a sync gRPC channel and the bidirectional Connect stream: it registers, turns the queued
steps into a StepReport every report interval, applies directives, and reconnects with exponential backoff
when the daemon is absent, killed or hung (connected but no Registered within ``register_timeout_s``).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/pals/engine.sock"
CLIENT_VERSION = "pals-vllm/0.1"
# Steps buffered between two reports: at ~1 ms per step and a 0.1 s interval this is ~650x headroom.
MAX_QUEUED_STEPS = 65_536
# The daemon refuses a report with more than 100k finished requests; stay well under.
MAX_FINISHED_PER_REPORT = 10_000

# One step: (busy_s, num_running, num_waiting, prefill_tokens, decode_tokens, kv_cache_usage, arrived, finished)
# where finished is a tuple of (ttft_ms, tpot_ms, prompt_tokens, output_tokens).
FinishedTuple = tuple[float, float, int, int]
StepTuple = tuple[float, int, int, int, int, float, int, tuple[FinishedTuple, ...]]
# A step recorded by record_scheduler_step: (busy_s, scheduled_tokens, outputs, arrived, finished); the outputs
# object is turned into decode tokens by the step source's counter on the client thread, not in the step.
DeferredStep = tuple[float, int, object, int, tuple[FinishedTuple, ...]]

_ENGINE_ID_BAD = re.compile(r"[^A-Za-z0-9._:-]")

# The pid of this process, refreshed in a forked child without a syscall on the hot path.
_pid = [os.getpid()]


def _after_fork_in_child() -> None:
    _pid[0] = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class _Limits:
    """A directive as the hot path sees it: replaced whole, never mutated."""

    max_num_seqs: int
    max_num_batched_tokens: int
    expires_at: float


def engine_socket_from_env() -> str:
    """``PALS_ENGINE_SOCKET``, else the systemd deployment's engine socket."""
    return os.environ.get("PALS_ENGINE_SOCKET", DEFAULT_SOCKET)


def interval_from_env(name: str, default_s: float, min_s: float, max_s: float = 60.0) -> float:
    """Seconds from environment variable ``name`` (``default_s`` when unset); ValueError outside [min_s, max_s]."""
    interval = float(os.environ.get(name, str(default_s)))
    if not min_s <= interval <= max_s:
        raise ValueError(f"{name} must be within [{min_s:g}, {max_s:g}], got {interval}")
    return interval


def default_engine_id(engine_index: int | None = None) -> str:
    """``PALS_ENGINE_ID`` or hostname plus vLLM's engine index (stable across restarts) or the pid."""
    env = os.environ.get("PALS_ENGINE_ID")
    if env:
        return env
    host = _ENGINE_ID_BAD.sub("-", socket.gethostname().split(".")[0]) or "engine"
    suffix = f"dp{engine_index}" if engine_index is not None else str(os.getpid())
    # The daemon accepts at most 64 characters starting with a letter or digit.
    return f"{host[: 63 - len(suffix)]}-{suffix}".lstrip("-._:") or suffix


def _unit(value: float) -> float:
    """A fraction clamped to [0, 1]; NaN becomes 0."""
    return min(1.0, max(0.0, value)) if math.isfinite(value) else 0.0


def run_with_backoff(
    stop: threading.Event,
    attempt: Callable[[], bool],
    min_backoff_s: float,
    max_backoff_s: float,
    on_error: Callable[[Exception], None],
    after_attempt: Callable[[], None] = lambda: None,
) -> None:
    """Call ``attempt`` until ``stop`` is set, waiting min_backoff_s, doubling to max_backoff_s, between tries.

    ``attempt`` returns True when it got far enough to count as a success (the wait then starts again from
    the minimum); any exception goes to ``on_error`` and is retried: a client thread must survive anything.
    """
    backoff = min_backoff_s
    while not stop.is_set():
        succeeded = False
        try:
            succeeded = attempt()
        except Exception as exc:  # noqa: BLE001 - retried after the backoff
            on_error(exc)
        after_attempt()
        if succeeded:
            backoff = min_backoff_s
        if stop.wait(backoff):
            return
        backoff = min(max_backoff_s, backoff * 2)


class EngineLinkClient:
    """One engine's session with the daemon, kept by a background thread.

    Thread safety: ``record_step`` and ``current_limits`` may be called from one scheduler thread while the
    client thread runs; deque append/popleft and attribute rebinding are atomic under the GIL, so neither
    takes a lock.
    """

    def __init__(
        self,
        socket_path: str,
        engine_id: str,
        model: str,
        gpu_uuids: Sequence[str],
        max_num_seqs: int,
        max_num_batched_tokens: int,
        report_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        *,
        gpu_indices: Sequence[int] = (),
        register_timeout_s: float = 2.0,
        min_backoff_s: float = 0.05,
        max_backoff_s: float = 5.0,
        max_queued_steps: int = MAX_QUEUED_STEPS,
        time_scale: float = 1.0,
    ) -> None:
        self.socket_path = socket_path
        # ``clock`` seconds per wall second: > 1 only for a simulated engine on a scaled clock, whose report
        # interval (like the daemon's) is in clock seconds. vLLM leaves it at 1.
        self.time_scale = time_scale
        self.engine_id = engine_id
        self.model = model
        self.gpu_uuids = list(gpu_uuids)
        self.gpu_indices = [] if self.gpu_uuids else list(gpu_indices)
        self.max_num_seqs = int(max_num_seqs)
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.report_interval_s = report_interval_s
        self.clock = clock
        self.register_timeout_s = register_timeout_s
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_queued_steps = max_queued_steps

        self._steps: collections.deque[StepTuple | DeferredStep] = collections.deque()
        self._decode_of: Callable[[object], int] | None = None
        self._gauges: Callable[[], tuple[int, int, float]] | None = None
        self._limits: _Limits | None = None
        self._owner_pid: int | None = None  # the pid whose thread is running; None: not started
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._call: object | None = None  # the live stream, so that close() can cancel it
        self._interval = report_interval_s
        self._last_gauges: tuple[int, int, float] = (0, 0, 0.0)

        # Counters read by tests, logs and metrics (written by one thread each).
        self.dropped_steps = 0
        self.connects = 0
        self.registrations = 0
        self.reports_sent = 0
        self.directives_received = 0
        self.last_error = ""
        self._last_warned = ""
        self.connected = False

    @classmethod
    def from_env(
        cls,
        model: str,
        gpu_uuids: Sequence[str],
        max_num_seqs: int,
        max_num_batched_tokens: int,
        engine_index: int | None = None,
        gpu_indices: Sequence[int] = (),
    ) -> EngineLinkClient:
        """A client configured from PALS_ENGINE_SOCKET, PALS_ENGINE_ID and PALS_REPORT_INTERVAL_S."""
        interval = interval_from_env("PALS_REPORT_INTERVAL_S", 0.1, 0.001)
        return cls(
            socket_path=engine_socket_from_env(),
            engine_id=default_engine_id(engine_index),
            model=model,
            gpu_uuids=gpu_uuids,
            gpu_indices=gpu_indices,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            report_interval_s=interval,
        )

    # ------------------------------------------------------------------ hot path (scheduler thread)

    def record_step(
        self,
        busy_s: float,
        num_running: int,
        num_waiting: int,
        prefill_tokens: int,
        decode_tokens: int,
        kv_cache_usage: float,
        arrived_requests: int = 0,
        finished: tuple[FinishedTuple, ...] = (),
    ) -> None:
        """Queue one step's telemetry; never blocks (dropped and counted when the queue is full)."""
        if self._owner_pid != _pid[0]:
            self._ensure_started()
        steps = self._steps
        if len(steps) >= self.max_queued_steps:
            self.dropped_steps += 1
            return
        steps.append(
            (
                busy_s,
                num_running,
                num_waiting,
                prefill_tokens,
                decode_tokens,
                kv_cache_usage,
                arrived_requests,
                finished,
            )
        )

    def record_scheduler_step(
        self,
        busy_s: float,
        scheduled_tokens: int,
        outputs: object,
        arrived_requests: int = 0,
        finished: tuple[FinishedTuple, ...] = (),
    ) -> None:
        """Queue one step with its outputs uncounted (needs ``set_step_source``); never blocks.

        Only while registered: a step queued without a session belongs to no window the daemon will see (the
        queue is cleared at registration), and each holds a step's whole outputs object, which must not pile
        up for the seconds a reconnect backoff lasts.
        """
        if self._owner_pid != _pid[0]:
            self._ensure_started()
        if not self.connected:
            return
        steps = self._steps
        if len(steps) >= self.max_queued_steps:
            self.dropped_steps += 1
            return
        steps.append((busy_s, scheduled_tokens, outputs, arrived_requests, finished))

    def set_step_source(
        self, decode_of: Callable[[object], int], gauges: Callable[[], tuple[int, int, float]]
    ) -> None:
        """How the client thread counts a deferred step's decode tokens and reads the engine's gauges.

        Both run on the client thread while the scheduler runs: they may only read (lengths, counters), which
        is safe under the GIL; a failure in them drops that report's figures, never the session.
        """
        self._decode_of = decode_of
        self._gauges = gauges

    def current_limits(self) -> tuple[int, int] | None:
        """(max_num_seqs, max_num_batched_tokens) of the live directive, or None (expired or none yet)."""
        if self._owner_pid != _pid[0]:
            self._ensure_started()
        limits = self._limits
        if limits is None or self.clock() >= limits.expires_at:
            return None
        return limits.max_num_seqs, limits.max_num_batched_tokens

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the client thread now (otherwise the first record_step/current_limits does)."""
        self._ensure_started()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the client thread and end the session (for tests and orderly shutdown)."""
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()  # type: ignore[attr-defined]
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout_s)

    def _ensure_started(self) -> None:
        # A non-blocking try: if another thread is starting it, this call just goes on without it.
        if not self._start_lock.acquire(blocking=False):
            return
        try:
            pid = _pid[0]
            if self._owner_pid == pid:
                return
            if self._owner_pid is not None:
                # A forked child: the parent's thread and channel did not come along; start afresh, and do
                # not report the parent's queued steps as ours.
                self._steps = collections.deque()
                self._limits = None
                self._stop = threading.Event()
                self._call = None
            self._owner_pid = pid
            self._thread = threading.Thread(target=self._run, name=f"pals-engine-link-{self.engine_id}", daemon=True)
            self._thread.start()
        finally:
            self._start_lock.release()

    # ------------------------------------------------------------------ client thread

    def _run(self) -> None:
        """Connect, keep the session, reconnect with backoff; until close()."""
        run_with_backoff(self._stop, self._session, self.min_backoff_s, self.max_backoff_s, self._failed, self._ended)

    def _failed(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.debug("pals engine link: %s", self.last_error)

    def _ended(self) -> None:
        self.connected = False
        # Steps queued while disconnected describe no window the daemon will see: drop them.
        self._steps.clear()

    def _session(self) -> bool:
        """One connection: returns whether it got as far as Registered."""
        import grpc  # noqa: PLC0415 - keeps `import pals_daemon.vllm` cheap

        from pals_daemon.api import pals_pb2, pals_pb2_grpc  # noqa: PLC0415

        self.connects += 1
        registered = threading.Event()
        session_stop = threading.Event()
        # No proxies, and a short reconnect: the socket is local and the client does its own backoff. No
        # keepalive pings: a dead daemon closes the Unix socket, and a hung one only stops sending directives,
        # which then expire (fail-open) without any help from the transport.
        options = [
            ("grpc.enable_http_proxy", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        with grpc.insecure_channel(f"unix:{self.socket_path}", options=options) as channel:
            stub = pals_pb2_grpc.EngineLinkStub(channel)
            register = pals_pb2.EngineMessage(
                register=pals_pb2.Register(
                    engine_id=self.engine_id,
                    model=self.model,
                    gpu_uuids=self.gpu_uuids,
                    gpu_indices=self.gpu_indices,
                    max_num_seqs=self.max_num_seqs,
                    max_num_batched_tokens=self.max_num_batched_tokens,
                    client_version=CLIENT_VERSION,
                )
            )
            call = stub.Connect(self._requests(register, registered, session_stop, pals_pb2), wait_for_ready=False)
            self._call = call
            # A hung daemon accepts the connection and never answers: cancel when no Registered comes in time.
            timer = threading.Timer(self.register_timeout_s, lambda: registered.is_set() or call.cancel())
            timer.daemon = True
            timer.start()
            try:
                for msg in call:
                    kind = msg.WhichOneof("body")
                    if kind == "registered":
                        if msg.registered.report_interval_s > 0:
                            # The daemon's period decides how often a report is useful; never slower than ours.
                            self._interval = min(self.report_interval_s, msg.registered.report_interval_s)
                        registered.set()
                        self.registrations += 1
                        self.connected = True
                        log.info("pals engine link: %s registered with %s", self.engine_id, self.socket_path)
                    elif kind == "directive":
                        self._apply(msg.directive)
                    if self._stop.is_set():
                        break
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                self.last_error = f"{code}: {exc.details() if hasattr(exc, 'details') else exc}"
                if code == grpc.StatusCode.INVALID_ARGUMENT and self.last_error != self._last_warned:
                    # Refused (e.g. a GPU the daemon does not manage): say so once, not on every retry.
                    self._last_warned = self.last_error
                    log.warning("pals engine link: the daemon refused %s: %s", self.engine_id, self.last_error)
                else:
                    log.debug("pals engine link: %s", self.last_error)
            finally:
                timer.cancel()
                session_stop.set()
                call.cancel()
                self._call = None
        return registered.is_set()

    def _requests(
        self, register: object, registered: threading.Event, session_stop: threading.Event, pals_pb2: object
    ) -> Iterator[object]:
        """The request stream: Register, then a StepReport every interval (run by grpc's sender thread)."""
        yield register
        if not self._wait_registered(registered, session_stop):
            return
        self._steps.clear()  # what was queued before the session has no window
        last = self.clock()
        while not session_stop.wait(self._interval / self.time_scale):
            if self._stop.is_set():
                return
            now = self.clock()
            report = self._take_report(now - last, pals_pb2)
            last = now
            if report is not None:
                self.reports_sent += 1
                yield report

    def _wait_registered(self, registered: threading.Event, session_stop: threading.Event) -> bool:
        while not registered.wait(0.05):
            if session_stop.is_set() or self._stop.is_set():
                return False
        return True

    def _take_report(self, window_s: float, pals_pb2: object) -> object | None:
        """Drain the queued steps into one StepReport (None when no step ran and nothing changed)."""
        steps = self._steps
        n = len(steps)
        busy = 0.0
        prefill = decode = arrived = 0
        last: StepTuple | None = None
        finished: list[FinishedTuple] = []
        for _ in range(n):
            s = steps.popleft()
            if len(s) == 5:  # a deferred step: count its outputs here, off the scheduler thread
                busy_s, scheduled, outputs, arrived_n, done = s  # type: ignore[misc]
                decoded = self._count_decode(outputs)
                prefill_n = max(0, scheduled - decoded)
            else:
                busy_s, _, _, prefill_n, decoded, _, arrived_n, done = s  # type: ignore[misc]
                last = s  # type: ignore[assignment]
            busy += busy_s if math.isfinite(busy_s) and busy_s > 0 else 0.0
            prefill += prefill_n
            decode += decoded
            arrived += arrived_n
            if done and len(finished) < MAX_FINISHED_PER_REPORT:
                finished.extend(done[: MAX_FINISHED_PER_REPORT - len(finished)])
        report = pals_pb2.StepReport(  # type: ignore[attr-defined]
            window_s=max(0.0, window_s),
            num_steps=n,
            busy_s=min(busy, 3600.0),
            prefill_tokens=prefill,
            decode_tokens=decode,
            arrived_requests=arrived,
        )
        gauges = self._read_gauges() if self._gauges is not None else None
        if gauges is not None:
            running, waiting, kv = gauges
            self._last_gauges = (running, waiting, _unit(kv))
        elif last is not None:
            self._last_gauges = (last[1], last[2], _unit(last[5]))
        # An idle engine still reports (zero throughput is information), with the last gauges it saw.
        report.num_running, report.num_waiting, report.kv_cache_usage = self._last_gauges
        for ttft, tpot, prompt, output in finished:
            if not (math.isfinite(ttft) and math.isfinite(tpot)):
                continue
            report.finished.add(
                ttft_ms=min(max(ttft, 0.0), 3_600_000.0),
                tpot_ms=min(max(tpot, 0.0), 3_600_000.0),
                prompt_tokens=prompt,
                output_tokens=output,
            )
        return pals_pb2.EngineMessage(step=report)  # type: ignore[attr-defined]

    def _count_decode(self, outputs: object) -> int:
        try:
            return int(self._decode_of(outputs)) if self._decode_of is not None else 0
        except Exception as exc:  # noqa: BLE001 - a vLLM change must cost the figure, not the session
            self.last_error = f"counting a step's outputs: {type(exc).__name__}: {exc}"
            return 0

    def _read_gauges(self) -> tuple[int, int, float] | None:
        try:
            running, waiting, kv = self._gauges()  # type: ignore[misc]
            return max(0, int(running)), max(0, int(waiting)), float(kv)
        except Exception as exc:  # noqa: BLE001
            self.last_error = f"reading the engine's gauges: {type(exc).__name__}: {exc}"
            return None

    def _apply(self, directive: object) -> None:
        """Publish a directive as a new immutable snapshot, clamped to the configured limits."""
        seqs = min(self.max_num_seqs, max(1, directive.max_num_seqs))  # type: ignore[attr-defined]
        tokens = min(self.max_num_batched_tokens, max(1, directive.max_num_batched_tokens))  # type: ignore[attr-defined]
        ttl_s = directive.ttl_ms / 1000.0  # type: ignore[attr-defined]
        self._limits = _Limits(seqs, tokens, self.clock() + ttl_s)
        self.directives_received += 1
