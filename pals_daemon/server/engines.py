"""Engine sessions and their telemetry: what the EngineLink servicer hands over, what each tick reads.

Reports accumulate into the current window; each control tick takes the window (and starts a new one).
All methods run on the event loop thread.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pals_daemon.api import pals_pb2
from pals_daemon.control.types import EngineObservation
from pals_daemon.errors import InvalidRequestError
from pals_daemon.server import validate

# Reports are small; a slow daemon tick must not let a fast engine grow memory without bound.
OUTBOX_SIZE = 16
# A per-GPU expert-load share is held for this many windows without a full new one (4 x 0.5 s ticks cover vLLM's
# 1 s expert report interval twice over).
SHARE_HOLD_WINDOWS = 4
# Flood guard (chosen engineering values): an engine sends one StepReport per report interval plus at most one
# ExpertLoadReport per GPU; a session may send FLOOD_FACTOR times that, but never less than MIN_REPORT_RATE_HZ
# (twice the 100 Hz of the load acceptance test, so a fast but honest reporter is never cut off), with a
# burst of one second's worth (a client catching up after a stall).
FLOOD_FACTOR = 10.0
MIN_REPORT_RATE_HZ = 200.0
FLOOD_BURST_S = 1.0


class ReportRateLimit:
    """A token bucket over one session's messages, in the daemon's clock (simulated engines share it)."""

    def __init__(self, rate_hz: float, now_s: float) -> None:
        self.rate_hz = rate_hz
        self.capacity = rate_hz * FLOOD_BURST_S
        self.tokens = self.capacity
        self.last_s = now_s
        self.accepted = 0

    @classmethod
    def for_engine(cls, num_gpus: int, report_interval_s: float, now_s: float) -> ReportRateLimit:
        """The limit for an engine with ``num_gpus`` GPUs told to report every ``report_interval_s``."""
        expected_hz = (1 + num_gpus) / max(report_interval_s, 1e-3)
        return cls(max(MIN_REPORT_RATE_HZ, FLOOD_FACTOR * expected_hz), now_s)

    def allow(self, now_s: float) -> bool:
        """Take one token; False when the session is over its rate."""
        self.tokens = min(self.capacity, self.tokens + max(0.0, now_s - self.last_s) * self.rate_hz)
        self.last_s = now_s
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        self.accepted += 1
        return True


def expert_load_tokens(report: pals_pb2.ExpertLoadReport) -> int:
    """The tokens an expert-load report counts, validated (InvalidRequestError naming the field)."""
    validate.finite(report.window_s, "window_s", 0.0, 3600.0)
    if len(report.layers) > validate.MAX_EXPERT_LAYERS:
        raise InvalidRequestError(f"layers: at most {validate.MAX_EXPERT_LAYERS}, got {len(report.layers)}")
    entries = sum(len(layer.tokens_per_expert) for layer in report.layers)
    if entries > validate.MAX_EXPERT_ENTRIES:
        raise InvalidRequestError(f"tokens_per_expert: at most {validate.MAX_EXPERT_ENTRIES} counters, got {entries}")
    tokens = sum(sum(layer.tokens_per_expert) for layer in report.layers)
    return validate.count(tokens, "tokens_per_expert (sum)", validate.MAX_TOKENS_PER_REPORT)


@dataclass(frozen=True)
class EngineRegistration:
    """Who the engine is and what it runs on (validated)."""

    engine_id: str
    model: str
    gpu_indices: tuple[int, ...]
    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass
class TelemetryWindow:
    """Sums of the reports received since the last tick."""

    window_s: float = 0.0
    num_steps: int = 0
    busy_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    arrived_requests: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    # Per finished request: TPOT is judged only with more than one output token.
    multi_token: list[bool] = field(default_factory=list)


@dataclass
class ExpertLoad:
    """Tokens routed to experts hosted on each GPU since the last tick."""

    tokens_by_gpu: dict[int, int] = field(default_factory=dict)


class EngineSession:
    """One connected engine: registration, latest gauges, the open telemetry window, its outbox."""

    def __init__(self, registration: EngineRegistration, session_id: str) -> None:
        self.registration = registration
        self.session_id = session_id
        self.window = TelemetryWindow()
        self.expert_load = ExpertLoad()
        # The last per-GPU expert-load share and how many windows since it was measured (see take_observation).
        self._last_share: dict[int, float] = {}
        self._share_age = 0
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_usage = 0.0
        self.outbox: asyncio.Queue[pals_pb2.DaemonMessage] = asyncio.Queue(maxsize=OUTBOX_SIZE)
        self.current_max_num_seqs = registration.max_num_seqs
        self.current_max_num_batched_tokens = registration.max_num_batched_tokens

    def add_step_report(self, report: pals_pb2.StepReport) -> None:
        """Validate a report and fold it into the window; InvalidRequestError leaves the window unchanged."""
        window_s = validate.finite(report.window_s, "window_s", 0.0, 3600.0)
        if 0.0 < window_s < validate.MIN_WINDOW_S:
            # A denormal window would turn the tick's tokens/s into inf.
            raise InvalidRequestError(f"window_s must be 0 or at least {validate.MIN_WINDOW_S:g}, got {window_s:g}")
        busy_s = validate.finite(report.busy_s, "busy_s", 0.0, 3600.0)
        kv = validate.finite(report.kv_cache_usage, "kv_cache_usage", 0.0, 1.0)
        if len(report.finished) > validate.MAX_FINISHED_PER_REPORT:
            raise InvalidRequestError(f"too many finished requests in one report ({len(report.finished)})")
        ttft = [validate.finite(f.ttft_ms, "finished.ttft_ms", 0.0, validate.MAX_SLO_MS) for f in report.finished]
        tpot = [validate.finite(f.tpot_ms, "finished.tpot_ms", 0.0, validate.MAX_SLO_MS) for f in report.finished]
        top_count = validate.MAX_COUNT_PER_REPORT
        num_steps = validate.count(report.num_steps, "num_steps", top_count)
        prefill = validate.count(report.prefill_tokens, "prefill_tokens", validate.MAX_TOKENS_PER_REPORT)
        decode = validate.count(report.decode_tokens, "decode_tokens", validate.MAX_TOKENS_PER_REPORT)
        arrived = validate.count(report.arrived_requests, "arrived_requests", top_count)
        running = validate.count(report.num_running, "num_running", top_count)
        waiting = validate.count(report.num_waiting, "num_waiting", top_count)
        w = self.window
        w.window_s += window_s
        w.num_steps += num_steps
        w.busy_s += busy_s
        w.prefill_tokens += prefill
        w.decode_tokens += decode
        w.arrived_requests += arrived
        w.ttft_ms.extend(ttft)
        w.tpot_ms.extend(tpot)
        w.multi_token.extend(f.output_tokens > 1 for f in report.finished)
        self.num_running = running
        self.num_waiting = waiting
        self.kv_cache_usage = kv

    def add_expert_load(self, report: pals_pb2.ExpertLoadReport, gpu_index: int) -> None:
        """Fold an expert-load report of one of this engine's GPUs into the window."""
        self.add_expert_tokens(gpu_index, expert_load_tokens(report))

    def add_expert_tokens(self, gpu_index: int, tokens: int) -> None:
        """Add already validated routed tokens of one of this engine's GPUs to the window."""
        self.expert_load.tokens_by_gpu[gpu_index] = self.expert_load.tokens_by_gpu.get(gpu_index, 0) + tokens

    def take_observation(self, elapsed_s: float) -> EngineObservation:
        """The window as a controller observation; starts a new window."""
        w, self.window = self.window, TelemetryWindow()
        load, self.expert_load = self.expert_load, ExpertLoad()
        # Rates over the time the reports cover, not the tick interval: a tick that caught one report more or
        # less than the last (report and tick clocks drift) would otherwise see half or double the rate.
        span_s = w.window_s if w.window_s > 0 else max(elapsed_s, 1e-9)
        total_load = sum(load.tokens_by_gpu.values())
        reg = self.registration
        return EngineObservation(
            engine_id=reg.engine_id,
            model=reg.model,
            gpu_indices=reg.gpu_indices,
            configured_max_num_seqs=reg.max_num_seqs,
            configured_max_num_batched_tokens=reg.max_num_batched_tokens,
            window_s=w.window_s,
            throughput_tokens_per_s=w.decode_tokens / span_s,
            prefill_tokens=w.prefill_tokens,
            decode_tokens=w.decode_tokens,
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_cache_usage=self.kv_cache_usage,
            busy_fraction=min(1.0, w.busy_s / span_s),
            ttft_p90_ms=float(np.percentile(w.ttft_ms, 90)) if w.ttft_ms else None,
            tpot_p90_ms=float(np.percentile(w.tpot_ms, 90)) if w.tpot_ms else None,
            current_max_num_seqs=self.current_max_num_seqs,
            expert_load_share=self._expert_share(load, total_load),
            num_steps=w.num_steps,
            arrived_requests=w.arrived_requests,
            ttft_p99_ms=float(np.percentile(w.ttft_ms, 99)) if w.ttft_ms else None,
            tpot_p99_ms=float(np.percentile(w.tpot_ms, 99)) if w.tpot_ms else None,
            finished_ms=tuple(
                (a, b if multi else math.nan) for a, b, multi in zip(w.ttft_ms, w.tpot_ms, w.multi_token, strict=True)
            ),
        )


    def _expert_share(self, load: ExpertLoad, total: int) -> dict[int, float]:
        """This window's per-GPU share of the expert load, or the last one measured within SHARE_HOLD_WINDOWS.

        Workers report expert load on their own interval (vLLM's default 1 s) and unsynchronised per GPU, while
        the tick is 0.5 s: a window that caught no report (or not every GPU's) is not a uniform load, and taking
        it as one made routing-aware caps flap between skewed and uniform every other tick.
        """
        if total and len(load.tokens_by_gpu) >= len(self._last_share):
            self._last_share = {g: t / total for g, t in load.tokens_by_gpu.items()}
            self._share_age = 0
            return dict(self._last_share)
        self._share_age += 1
        if self._last_share and self._share_age <= SHARE_HOLD_WINDOWS:
            return dict(self._last_share)
        if total:
            self._last_share = {g: t / total for g, t in load.tokens_by_gpu.items()}
            self._share_age = 0
            return dict(self._last_share)
        self._last_share = {}
        return {}


class EngineRegistry:
    """Connected engines by id; refuses a second live session under the same id."""

    def __init__(self) -> None:
        self._sessions: dict[str, EngineSession] = {}
        self._ids = itertools.count(1)

    def register(self, registration: EngineRegistration) -> EngineSession:
        """Open a session; InvalidRequestError when the id is taken or a GPU belongs to another engine."""
        if registration.engine_id in self._sessions:
            raise InvalidRequestError(f"engine {registration.engine_id!r} is already connected")
        for other in self._sessions.values():
            shared = set(other.registration.gpu_indices) & set(registration.gpu_indices)
            if shared:
                raise InvalidRequestError(
                    f"GPU(s) {sorted(shared)} already belong to engine {other.registration.engine_id!r}"
                )
        session = EngineSession(registration, f"s{next(self._ids)}")
        self._sessions[registration.engine_id] = session
        return session

    def unregister(self, session: EngineSession) -> None:
        """Close a session (only if it is still the live one under its id)."""
        if self._sessions.get(session.registration.engine_id) is session:
            del self._sessions[session.registration.engine_id]

    def sessions(self) -> Iterable[EngineSession]:
        """Live sessions, in registration order."""
        return list(self._sessions.values())

    def get(self, engine_id: str) -> EngineSession | None:
        """The live session of an engine, if connected."""
        return self._sessions.get(engine_id)

    def engine_of_gpu(self, gpu_index: int) -> EngineSession | None:
        """The engine running on a GPU, if any."""
        for s in self._sessions.values():
            if gpu_index in s.registration.gpu_indices:
                return s
        return None
