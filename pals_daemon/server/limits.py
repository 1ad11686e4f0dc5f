"""Every bound the daemon puts on what local clients can make it hold or do (README "Limits and hardening").

A member of the engine group, any local user reaching the metrics port, or a buggy client must not be able
to exhaust the daemon's file descriptors, memory or event loop: the admin path must keep answering and the
control tick must keep its period whatever the engine socket and the metrics port are put through. Each
bound is a named constant here (chosen engineering values, sized from the legitimate load they leave room
for, as said beside each); the tests in tests/server/test_hardening.py try each attack against a live daemon.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

from pals_daemon.clock import Clock

# ------------------------------------------------------------------ gRPC servers (both sockets)

# Largest message either server accepts. The largest legitimate one is an ExpertLoadReport of a big MoE:
# 61 layers x 256 experts of uint64 varints is at most ~160 KB; a StepReport with the client's 10,000
# finished requests ~200 KB. gRPC refuses more with RESOURCE_EXHAUSTED before a handler sees it; parsing one
# costs the event loop ~12 ms at this size (it was 1 MiB: ~50 ms, and up to ~300 ms to validate).
MAX_RECEIVE_MESSAGE_BYTES = 256 << 10
# Request metadata (headers): our clients send ~200 bytes. gRPC rejects a header block over the soft limit
# with RESOURCE_EXHAUSTED and closes the stream over the hard one, before buffering more (this is what stops
# HEADERS followed by megabytes of CONTINUATION frames).
MAX_METADATA_BYTES = 8 << 10
ABSOLUTE_MAX_METADATA_BYTES = 16 << 10
# Streams one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS). An engine uses one
# Connect stream; a GPU worker one ReportExpertLoad stream; palsctl one call or watch.
MAX_STREAMS_PER_CONNECTION = 16
# Connections each socket accepts at once (gRPC closes any over the cap at accept), and RPCs in progress per
# server (over it: RESOURCE_EXHAUSTED at once, no handler runs). The engine socket: a GPU belongs to at most
# one engine and has one expert-load worker, so an 8-GPU node has at most 8 Connect + 8 ReportExpertLoad
# streams; 64 is 4x that (reconnect overlap), and each stream in flight lets a client park buffers in the
# transport. The admin socket: operators, exporters and watchers.
MAX_ENGINE_CONNECTIONS = 64
MAX_ADMIN_CONNECTIONS = 64
MAX_ENGINE_RPCS = 64
MAX_ADMIN_RPCS = 128
# A connection with no RPC for this long is closed (GOAWAY); clients reconnect transparently.
MAX_CONNECTION_IDLE_MS = 60_000
# Keepalive: the server pings a quiet connection to find dead peers; a client pinging more often than the
# minimum interval is cut off after a few strikes (ping floods cost the event loop nothing then).
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_CLIENT_PING_INTERVAL_MS = 10_000
MAX_PING_STRIKES = 2


def grpc_server_options(max_connections: int) -> tuple[tuple[str, int], ...]:
    """Channel arguments for one of the daemon's gRPC servers."""
    return (
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", ABSOLUTE_MAX_METADATA_BYTES),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        # No BDP probing: each stream's receive window stays at HTTP/2's 64 KiB, so what a client can make
        # the daemon buffer is bounded by streams x 64 KiB, not grown to megabytes per stream.
        ("grpc.http2.bdp_probe", 0),
    )


# ------------------------------------------------------------------ engine socket: sessions and reports


@dataclass(frozen=True)
class EngineLimits:
    """Per-session and per-socket bounds of the EngineLink servicer (tests shorten the timeouts)."""

    # A Connect stream (or expert-load stream) whose first message has not come after this long is ended
    # (DEADLINE_EXCEEDED): an unregistered stream holds an RPC slot and buffers, so it may not live forever.
    # Our client sends Register at once; 5 s covers a loaded host.
    first_message_timeout_s: float = 5.0
    # A registered session (or an expert-load stream) that sends nothing for this long is ended: it would
    # keep its engine id and GPUs (and so steer them) while telling nothing. Honest clients report every
    # report interval (period/2 = 0.25 s by default), also when idle: 10 s is 40 missed reports.
    silence_timeout_s: float = 10.0
    # Open ReportExpertLoad streams naming one GPU (one worker per GPU; 4 leaves room for restarts), and per
    # socket (streams that have not named a GPU yet count here too; one over the cap is refused before any
    # message is read). Each open stream lets its client park a flow-control window of data in the
    # transport while the report budget holds the readers: 64 streams grew the daemon by 340 MB in 6 s;
    # 16 (8 GPUs x 2) hold it to +54 MB under 256 flooding streams (bench/hostile_clients.py).
    max_expert_streams_per_gpu: int = 4
    max_expert_streams: int = 16
    # Report bytes the engine socket folds in per second of daemon time, shared by every stream. Legitimate
    # peak: 64 engines x 100 Hz x ~60 B StepReports (0.4 MB/s) plus 8 GPUs x 1 Hz x ~40 KB expert reports
    # (0.3 MB/s). Over it, streams wait for the next tick before their next message is read (HTTP/2 flow
    # control then holds the senders), so the worst reports (~0.3 us of validation per byte) take at most
    # ~0.6 s of CPU per second whatever the load, and the tick and the admin socket keep their share.
    report_bytes_per_s: float = 2e6
    # Session changes (register, end) wake the control loop at once for a burst of wake_burst (engines
    # restarting), then at most once per this many periods: 1,000 register/cancel cycles used to drive ~360
    # ticks/s, each one rewriting limits; now at most 4 extra ticks per period (so <= 5 limit writes per GPU).
    wake_min_interval_periods: float = 0.25
    wake_burst: int = 8


class ReportByteBudget:
    """Report bytes the engine socket may fold in per tick, shared by all streams; refilled each tick.

    A reader waits for budget before it asks gRPC for its next message and charges the message once read:
    while the budget is spent nothing is read, so senders are held by HTTP/2 flow control (a window per
    stream in the transport), never by decoded messages piling up in the daemon.
    """

    def __init__(self, bytes_per_tick: float) -> None:
        self.bytes_per_tick = bytes_per_tick
        self.used = 0.0
        self.waits = 0  # times a reader had to wait for a refill (for tests and metrics)
        self._refilled = asyncio.Event()

    def refill(self) -> None:
        """A new tick: the budget is available again and waiting readers resume."""
        self.used = 0.0
        self._refilled.set()
        self._refilled = asyncio.Event()

    async def wait(self) -> None:
        """Returns once this tick's budget is not spent."""
        while self.used >= self.bytes_per_tick:
            self.waits += 1
            await self._refilled.wait()

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` read."""
        self.used += nbytes


class CoalescedWake:
    """Calls ``wake`` at once for the first ``burst`` calls, then at most once per ``min_interval_s`` (a token
    bucket); calls while the bucket is empty end in one wake when the next token comes.

    Session changes wake the control loop so a departed engine's GPUs get their idle allocation at once; a
    client cycling register/cancel must not turn that into hundreds of ticks (and limit writes) per second.
    """

    def __init__(self, wake: Callable[[], None], min_interval_s: float, clock: Clock, burst: int = 4) -> None:
        self.wake = wake
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.burst = burst
        self.calls = 0
        self.wakes = 0
        self._tokens = float(burst)
        self._last_s = clock.now()
        self._pending: asyncio.Task[None] | None = None

    def __call__(self) -> None:
        self.calls += 1
        if self._pending is not None:
            return  # a wake is already scheduled: the tick it starts sees this change too
        self._refill()
        if self._tokens >= 1.0:
            self._fire()
        else:
            wait_s = (1.0 - self._tokens) * self.min_interval_s
            self._pending = asyncio.ensure_future(self._later(wait_s))

    def _refill(self) -> None:
        now = self.clock.now()
        if self.min_interval_s > 0:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last_s) / self.min_interval_s)
        else:
            self._tokens = float(self.burst)
        self._last_s = now

    async def _later(self, wait_s: float) -> None:
        await self.clock.sleep(wait_s)
        self._pending = None
        self._refill()
        self._fire()

    def _fire(self) -> None:
        self._tokens = max(0.0, self._tokens - 1.0)
        self.wakes += 1
        self.wake()

    def cancel(self) -> None:
        """Drop a scheduled wake (at shutdown)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


# ------------------------------------------------------------------ memory

# How often the heap is tidied (from the tick). A flood of streams that the daemon ends (over a cap, bad
# input, timeouts) leaves garbage cycles behind (each aborted handler's exception holds its frames, and with
# them a decoded report of up to ~0.5 MB): Python's collector reaches them only at its next full
# collection, which an idle daemon may not run for minutes. While streams are being ended, the trimmer runs
# a full collection (cost: a few ms; only then), and in any case hands freed heap back to the kernel
# (glibc's malloc_trim; ~0.05 ms). Measured on 256 expert-load streams flooding two GPUs for 6 s: peak RSS
# growth +133 MB without, +45 MB with; back at the baseline afterwards.
HEAP_TIDY_INTERVAL_S = 0.5
# Streams ended since the last tidy that make it worth a full collection.
HEAP_COLLECT_AFTER_ABORTS = 8


class HeapTrimmer:
    """Tidies the heap at most every HEAP_TIDY_INTERVAL_S: a full gc when ``aborts()`` grew, then malloc_trim."""

    def __init__(self, aborts: Callable[[], int], now: Callable[[], float] = time.monotonic) -> None:
        self.aborts = aborts
        self.now = now
        self.collections = 0
        self.trims = 0
        self._last_s = float("-inf")
        self._last_aborts = 0
        try:
            self._trim: Callable[[int], int] | None = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
            self._trim = None

    def __call__(self, *_: object) -> None:
        if self.now() - self._last_s < HEAP_TIDY_INTERVAL_S:
            return
        self._last_s = self.now()
        aborts = self.aborts()
        if aborts - self._last_aborts >= HEAP_COLLECT_AFTER_ABORTS:
            gc.collect()
            self.collections += 1
        self._last_aborts = aborts
        if self._trim is not None:
            self._trim(0)
            self.trims += 1


# ------------------------------------------------------------------ metrics HTTP endpoint

# Scrapes served at once (each by its own thread); a connection over the cap is closed at once. Prometheus
# scrapes one at a time; 8 leaves room for a few dashboards and curl.
MAX_METRICS_CONNECTIONS = 8
# A connection must deliver its request, and take the response, within this time (slowloris: a client
# trickling bytes cannot hold a slot longer), and each socket read/write times out after the same.
METRICS_REQUEST_DEADLINE_S = 5.0
# Pending connections the kernel queues before refusing (beyond the cap they cost the daemon no descriptor).
METRICS_LISTEN_BACKLOG = 64
# Largest request line + headers accepted (a scrape sends ~300 bytes).
METRICS_MAX_REQUEST_BYTES = 8 << 10
