"""A simulated continuous-batching engine (vLLM V1 style) driving simulated GPUs from a request trace.

Scheduling follows vLLM V1's ``Scheduler.schedule``: RUNNING requests first (a decode token costs 1 of the
step's token budget, an unfinished prompt takes a chunk of it), then WAITING requests are admitted in FIFO
order while the running count is below ``max_num_seqs`` and the KV cache has room, each taking a prompt
chunk of what is left of the budget. A request samples its first output token in the step that finishes its
prompt. Step durations and power come from a :class:`~pals_daemon.sim.model_truth.ModelTruth` at the GPUs'
acting power limit. Time is simulated seconds passed in by the caller; nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pals_daemon.sim.gpu import SimGpu
from pals_daemon.sim.model_truth import ModelTruth

# Relative slack when counting how many whole steps fit before an event (float noise, not physics).
_STEP_EPS = 1e-9


@dataclass(frozen=True)
class Request:
    """One request of a trace: arrival time (s, from the trace start) and token counts."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class FinishedRequest:
    """Latencies of one finished request (mirrors the proto's FinishedRequest, plus times for analysis)."""

    ttft_ms: float
    # 0.0 for a one-token output (TPOT is undefined there): skip those when taking percentiles.
    tpot_ms: float
    prompt_tokens: int
    output_tokens: int
    arrival_s: float = 0.0
    finish_s: float = 0.0


@dataclass(frozen=True)
class StepWindow:
    """Engine telemetry since the previous ``take_window`` (mirrors the proto's StepReport)."""

    window_s: float
    num_steps: int
    # Sum of the durations of the steps that started in the window.
    busy_s: float
    num_running: int
    num_waiting: int
    prefill_tokens: int
    # Output tokens generated in the window, the first token of each request (sampled in its last
    # prefill step) included.
    decode_tokens: int
    kv_cache_usage: float
    arrived_requests: int
    finished: list[FinishedRequest] = field(default_factory=list)
    # Routed expert-token visits per GPU of the engine in the window (what the MoE worker extension counts,
    # summed over layers and experts); empty when the engine has no expert-load share set.
    expert_tokens_per_gpu: tuple[int, ...] = ()


@dataclass
class EngineTotals:
    """Cumulative counters of one engine since its start."""

    requests_arrived: int = 0
    requests_finished: int = 0
    # Requests whose prompt + output can never fit the KV cache (vLLM rejects such prompts).
    requests_rejected: int = 0
    prefill_tokens: int = 0
    output_tokens: int = 0
    num_steps: int = 0
    busy_s: float = 0.0
    ttft_ms: list[float] = field(default_factory=list)
    # One entry per finished request with more than one output token.
    tpot_ms: list[float] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)

    def slo_attainment(self, ttft_slo_ms: float | None = None, tpot_slo_ms: float | None = None) -> float | None:
        """Fraction of finished requests meeting both SLOs (None for an SLO means no limit); None if none."""
        if not self.finished:
            return None
        ok = 0
        for f in self.finished:
            if ttft_slo_ms is not None and f.ttft_ms > ttft_slo_ms:
                continue
            if tpot_slo_ms is not None and f.output_tokens > 1 and f.tpot_ms > tpot_slo_ms:
                continue
            ok += 1
        return ok / len(self.finished)


@dataclass(frozen=True)
class StepRecord:
    """One simulated step, or ``num_steps`` identical decode steps run back to back (when recording)."""

    start_s: float
    duration_s: float
    num_steps: int
    num_running: int
    decode_seqs: int
    prefill_tokens: int
    kv_used_tokens: int
    cap_w: float
    max_num_seqs: int
    max_num_batched_tokens: int


class _Req:
    """Mutable state of one request inside the engine."""

    __slots__ = ("req", "prompt", "output", "computed", "generated", "first_token_s", "reserved")

    def __init__(self, req: Request) -> None:
        self.req = req
        # vLLM always has at least one prompt token and samples at least one output token.
        self.prompt = max(1, int(req.prompt_tokens))
        self.output = max(1, int(req.output_tokens))
        self.computed = 0  # prompt tokens prefilled so far
        self.generated = 0  # output tokens sampled so far
        self.first_token_s = math.nan
        # KV tokens reserved at admission: prompt + output (the simulator knows the output length, so it
        # reserves it up front instead of modelling vLLM's preemption; KV use can then never overflow).
        self.reserved = self.prompt + self.output


class SimEngine:
    """A continuous-batching engine replaying ``requests`` on ``gpus`` according to ``truth``."""

    def __init__(
        self,
        engine_id: str,
        truth: ModelTruth,
        gpus: Sequence[SimGpu],
        requests: Iterable[Request],
        max_num_seqs: int,
        max_num_batched_tokens: int,
        *,
        kv_capacity_tokens: int | None = None,
        start_s: float = 0.0,
        record_steps: bool = False,
        expert_load_share: Sequence[float] | None = None,
    ) -> None:
        if not gpus:
            raise ValueError(f"engine {engine_id!r}: needs at least one GPU")
        if len(gpus) != truth.num_gpus:
            raise ValueError(
                f"engine {engine_id!r}: truth for {truth.model} was measured on {truth.num_gpus} GPUs, got {len(gpus)}"
            )
        for g in gpus:
            if g.hardware.name != truth.hardware.name:
                raise ValueError(
                    f"engine {engine_id!r}: truth is for {truth.hardware.name}, GPU {g.identity.index} is "
                    f"{g.hardware.name}"
                )
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"engine {engine_id!r}: max_num_seqs and max_num_batched_tokens must be >= 1")
        self.engine_id = engine_id
        self.truth = truth
        self.expert_load_share = _normalised_share(engine_id, expert_load_share, len(gpus))
        self.gpus = list(gpus)
        for g in self.gpus:
            g.attach()
        self.configured_max_num_seqs = int(max_num_seqs)
        self.configured_max_num_batched_tokens = int(max_num_batched_tokens)
        self._max_seqs = self.configured_max_num_seqs
        self._max_tokens = self.configured_max_num_batched_tokens
        self.kv_capacity_tokens = int(truth.kv_capacity_tokens if kv_capacity_tokens is None else kv_capacity_tokens)
        if self.kv_capacity_tokens < 1:
            raise ValueError(f"engine {engine_id!r}: kv_capacity_tokens must be >= 1")
        self._pending = sorted(requests, key=lambda r: r.arrival_s)
        self._next = 0
        self._waiting: deque[_Req] = deque()
        self._running: list[_Req] = []
        self._num_prefilling = 0
        self._kv_used = 0
        self._kv_reserved = 0
        self._t = float(start_s)
        self._horizon = float(start_s)
        self._window_start = float(start_s)
        self.totals = EngineTotals()
        self._reset_window()
        self.step_log: list[StepRecord] | None = [] if record_steps else None

    # ---- control ----------------------------------------------------------------------------------------

    def apply_limits(self, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        """Set the batch limits from the next step, clamped to [1, configured]; no preemption."""
        self._max_seqs = min(max(1, int(max_num_seqs)), self.configured_max_num_seqs)
        self._max_tokens = min(max(1, int(max_num_batched_tokens)), self.configured_max_num_batched_tokens)

    def reset_limits(self) -> None:
        """Fall back to the configured limits (what vLLM does when the daemon's limits go stale)."""
        self._max_seqs = self.configured_max_num_seqs
        self._max_tokens = self.configured_max_num_batched_tokens

    @property
    def limits(self) -> tuple[int, int]:
        """The limits in force: (max_num_seqs, max_num_batched_tokens)."""
        return self._max_seqs, self._max_tokens

    # ---- state ------------------------------------------------------------------------------------------

    @property
    def time_s(self) -> float:
        """Where the simulation stands: the end of the last step (may lie past the last ``until_s``)."""
        return self._t

    @property
    def done(self) -> bool:
        """True once every request has arrived and finished (or been rejected)."""
        return self._next >= len(self._pending) and not self._waiting and not self._running

    @property
    def next_arrival_s(self) -> float | None:
        """Arrival time of the next request not yet arrived, or None."""
        return self._pending[self._next].arrival_s if self._next < len(self._pending) else None

    @property
    def num_running(self) -> int:
        """Requests in RUNNING now."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests in WAITING now."""
        return len(self._waiting)

    @property
    def kv_used_tokens(self) -> int:
        """KV-cache tokens held by running requests (prompt tokens prefilled + output tokens)."""
        return self._kv_used

    # ---- simulation -------------------------------------------------------------------------------------

    def advance(self, until_s: float) -> None:
        """Run the steps that start before ``until_s`` (the last may end after it) and idle up to it."""
        until_s = float(until_s)
        while self._t < until_s:
            self._move_arrivals(self._t)
            if not self._running and not self._waiting:
                nxt = self.next_arrival_s
                if nxt is None or nxt >= until_s:
                    self._t = until_s  # idle: the GPUs draw idle power in gaps without activity
                    break
                self._t = max(self._t, nxt)
                continue
            self._step(until_s)
        self._move_arrivals(until_s)
        if until_s > self._horizon:
            self._horizon = until_s
        for g in self.gpus:
            g.set_horizon(self._horizon)

    def take_window(self) -> StepWindow:
        """Telemetry since the previous call; the window ends at the latest ``until_s`` advanced to."""
        w = StepWindow(
            window_s=max(0.0, self._horizon - self._window_start),
            num_steps=self._w_steps,
            busy_s=self._w_busy,
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            prefill_tokens=self._w_prefill,
            decode_tokens=self._w_decode,
            kv_cache_usage=self._kv_used / self.kv_capacity_tokens,
            arrived_requests=self._w_arrived,
            finished=self._w_finished,
            expert_tokens_per_gpu=self._expert_tokens(self._w_prefill + self._w_decode),
        )
        self._window_start = self._horizon
        self._reset_window()
        return w

    # ---- internals --------------------------------------------------------------------------------------

    def _expert_tokens(self, tokens: int) -> tuple[int, ...]:
        """Routed expert visits per GPU for ``tokens`` processed tokens: tokens x top_k x each GPU's share.

        Modelled: the simulator has no router; what a worker extension would count (tokens per expert per layer
        per GPU, summed) is taken proportional to the configured share.
        """
        share = self.expert_load_share
        if share is None:
            return ()
        top_k = max(1, int(getattr(self.truth.spec, "top_k", 0) or 0))
        return tuple(int(round(tokens * top_k * s)) for s in share)

    def _decode(self, t: float, cap: float, batch: int) -> tuple[float, list[tuple[float, float, float]]]:
        """Step time of one decode step and each GPU's (power, clock, demand) for it.

        Without an expert-load share every GPU runs at ``cap`` (the lowest acting limit) via ``decode_step``.
        With one, each GPU runs at its own acting limit under routing skew (``decode_step_skewed``): the most
        loaded GPU sets the step time; the others wait at idle power. Demand is what each GPU would draw at
        the top limit under the same skew.
        """
        share = self.expert_load_share
        lock = self._locked_clock_mhz()
        if share is None:
            dec = self.truth.decode_step(cap, batch, lock)
            per = (dec.power_w_per_gpu, dec.sm_clock_mhz, dec.demand_power_w)
            return dec.step_time_s, [per] * len(self.gpus)
        caps = [g.effective_limit_w(t) for g in self.gpus]
        sk = self.truth.decode_step_skewed(caps, batch, share, lock)
        top = self.truth.decode_step_skewed([self.truth.hardware.max_limit_w] * len(self.gpus), batch, share, lock)
        per_gpu = [
            (sk.power_w_per_gpu[i], sk.sm_clock_mhz_per_gpu[i], max(sk.power_w_per_gpu[i], top.power_w_per_gpu[i]))
            for i in range(len(self.gpus))
        ]
        return sk.step_time_s, per_gpu

    def _prefill(self, t: float, cap: float, tokens: int) -> tuple[float, list[tuple[float, float, float]]]:
        """Duration of prefilling ``tokens`` and each GPU's (power, clock, demand) for it.

        Without an expert-load share: every GPU at ``cap`` (the lowest acting limit), ``prefill_step``. With one
        (modelled): GPU i does the non-expert share of the FLOPs evenly and ``N x share_i`` of the expert FLOPs
        (expert fraction of the active parameters from the model's config), at its own acting limit; the
        slowest GPU sets the duration and the others wait at idle power for the rest of it.
        """
        share = self.expert_load_share
        truth = self.truth
        lock = self._locked_clock_mhz()
        if share is None:
            pre = truth.prefill_step(cap, tokens, lock)
            return pre.time_s, [(pre.power_w_per_gpu, pre.sm_clock_mhz, pre.demand_power_w)] * len(self.gpus)
        n = len(self.gpus)
        x = _expert_flop_fraction(truth)
        steps = [
            truth.prefill_step(g.effective_limit_w(t), max(1, round(tokens * (1 - x + x * n * s))), lock)
            for g, s in zip(self.gpus, share, strict=True)
        ]
        dur = max(p.time_s for p in steps)
        idle = truth.hardware.idle_power_w
        per_gpu = [
            (idle + (p.power_w_per_gpu - idle) * p.time_s / dur, p.sm_clock_mhz, p.demand_power_w) for p in steps
        ]
        return dur, per_gpu

    def _reset_window(self) -> None:
        self._w_steps = 0
        self._w_busy = 0.0
        self._w_prefill = 0
        self._w_decode = 0
        self._w_arrived = 0
        self._w_finished: list[FinishedRequest] = []

    def _move_arrivals(self, t_s: float) -> None:
        pending = self._pending
        n = 0
        while self._next < len(pending) and pending[self._next].arrival_s <= t_s:
            self._waiting.append(_Req(pending[self._next]))
            self._next += 1
            n += 1
        self._w_arrived += n
        self.totals.requests_arrived += n

    def _locked_clock_mhz(self) -> float | None:
        """The lowest locked SM clock ceiling of the engine's GPUs (None: all unlocked).

        Tensor-parallel GPUs step together, so one locked GPU paces the engine like the lowest cap does; with
        expert-load skew every GPU is modelled at that one lock too (modelled: operators lock an engine's GPUs alike).
        """
        locks = [m for m in (g.locked_clock_max_mhz() for g in self.gpus) if m is not None]
        return float(min(locks)) if locks else None

    def _cap_w(self, t_s: float) -> float:
        # All GPUs of a tensor-parallel engine step together: the lowest acting limit sets the pace.
        return min(g.effective_limit_w(t_s) for g in self.gpus)

    def _head_admissible(self) -> bool:
        """Would the next step admit (or reject) the head of WAITING, assuming decode leaves budget?"""
        if not self._waiting or len(self._running) >= self._max_seqs:
            return False
        need = self._waiting[0].reserved
        return need > self.kv_capacity_tokens or self._kv_reserved + need <= self.kv_capacity_tokens

    def _step(self, until_s: float) -> None:
        t = self._t
        cap = self._cap_w(t)
        running = self._running
        budget = self._max_tokens
        n_run = len(running)
        if n_run and self._num_prefilling == 0 and n_run <= budget and not (n_run < budget and self._head_admissible()):
            self._decode_run(t, cap, until_s)
            return

        decode: list[_Req] = []
        prefill: list[tuple[_Req, int]] = []
        for r in running:
            if budget <= 0:
                break
            if r.computed < r.prompt:
                chunk = min(r.prompt - r.computed, budget)
                prefill.append((r, chunk))
                budget -= chunk
            else:
                decode.append(r)
                budget -= 1
        waiting = self._waiting
        while waiting and budget > 0 and len(running) < self._max_seqs:
            head = waiting[0]
            if head.reserved > self.kv_capacity_tokens:
                waiting.popleft()
                self.totals.requests_rejected += 1
                continue
            if self._kv_reserved + head.reserved > self.kv_capacity_tokens:
                break  # FIFO: the head blocks the queue until KV frees up
            waiting.popleft()
            running.append(head)
            self._kv_reserved += head.reserved
            self._num_prefilling += 1
            chunk = min(head.prompt, budget)
            prefill.append((head, chunk))
            budget -= chunk
        n_prefill = sum(c for _, c in prefill)
        if not decode and not prefill:
            return  # only rejections happened; time does not move

        # Modelled: a step costs one decode pass over its decode batch (at least batch 1: the weights are
        # streamed once per step) plus the compute time of its prompt chunks.
        dec_time, dec_gpu = self._decode(t, cap, max(1, len(decode)))
        t_pre = 0.0
        if n_prefill:
            t_pre, pre_gpu = self._prefill(t, cap, n_prefill)
            for g, (pw, clk, dem) in zip(self.gpus, pre_gpu, strict=True):
                g.record_activity(t, t + t_pre, pw, clk, dem)
        dt = t_pre + dec_time
        t_end = t + dt
        for g, (pw, clk, dem) in zip(self.gpus, dec_gpu, strict=True):
            g.record_activity(t + t_pre, t_end, pw, clk, dem)

        out_tokens = 0
        finished_any = False
        for r in decode:
            r.generated += 1
            out_tokens += 1
            if r.generated >= r.output:
                finished_any = True
        kv_add = len(decode) + n_prefill
        for r, chunk in prefill:
            r.computed += chunk
            if r.computed >= r.prompt:
                self._num_prefilling -= 1
                r.generated = 1
                r.first_token_s = t_end
                out_tokens += 1
                kv_add += 1
                if r.generated >= r.output:
                    finished_any = True
        self._kv_used += kv_add
        self._account(t, dt, 1, len(running), len(decode), n_prefill, out_tokens, cap)
        self._t = t_end
        if finished_any:
            self._finish_done(t_end)

    def _decode_run(self, t: float, cap: float, until_s: float) -> None:
        """Run k identical decode-only steps at once, stopping at the next event that could change them."""
        running = self._running
        b = len(running)
        dt, dec_gpu = self._decode(t, cap, b)
        k = min(r.output - r.generated for r in running)
        if not self._waiting and b < self._max_seqs and b < self._max_tokens:
            nxt = self.next_arrival_s
            if nxt is not None:
                k = min(k, _steps_before(nxt - t, dt))
        k = min(k, _steps_before(until_s - t, dt))
        for g in self.gpus:
            t_change = g.next_limit_change_s(t)
            if t_change is not None:
                k = min(k, _steps_before(t_change - t, dt))
        k = max(1, k)
        t_end = t + k * dt
        for g, (pw, clk, dem) in zip(self.gpus, dec_gpu, strict=True):
            g.record_activity(t, t_end, pw, clk, dem)
        finished_any = False
        for r in running:
            r.generated += k
            if r.generated >= r.output:
                finished_any = True
        self._kv_used += k * b
        self._account(t, k * dt, k, b, b, 0, k * b, cap)
        self._t = t_end
        if finished_any:
            self._finish_done(t_end)

    def _account(
        self, t: float, dt: float, steps: int, n_run: int, n_dec: int, n_prefill: int, out_tokens: int, cap: float
    ) -> None:
        self._w_steps += steps
        self._w_busy += dt
        self._w_prefill += n_prefill
        self._w_decode += out_tokens
        tot = self.totals
        tot.num_steps += steps
        tot.busy_s += dt
        tot.prefill_tokens += n_prefill
        tot.output_tokens += out_tokens
        if self.step_log is not None:
            self.step_log.append(
                StepRecord(
                    start_s=t,
                    duration_s=dt,
                    num_steps=steps,
                    num_running=n_run,
                    decode_seqs=n_dec,
                    prefill_tokens=n_prefill,
                    kv_used_tokens=self._kv_used,
                    cap_w=cap,
                    max_num_seqs=self._max_seqs,
                    max_num_batched_tokens=self._max_tokens,
                )
            )

    def _finish_done(self, t_end: float) -> None:
        keep: list[_Req] = []
        tot = self.totals
        for r in self._running:
            if r.generated < r.output:
                keep.append(r)
                continue
            self._kv_used -= r.computed + r.generated
            self._kv_reserved -= r.reserved
            ttft_ms = (r.first_token_s - r.req.arrival_s) * 1000.0
            tpot_ms = (t_end - r.first_token_s) / (r.output - 1) * 1000.0 if r.output > 1 else 0.0
            f = FinishedRequest(ttft_ms, tpot_ms, r.prompt, r.output, r.req.arrival_s, t_end)
            self._w_finished.append(f)
            tot.finished.append(f)
            tot.requests_finished += 1
            tot.ttft_ms.append(ttft_ms)
            if r.output > 1:
                tot.tpot_ms.append(tpot_ms)
        self._running = keep


def _expert_flop_fraction(truth: ModelTruth) -> float:
    """Fraction of a token's FLOPs in routed experts: top_k x expert size / active params (0 for dense)."""
    spec = getattr(truth, "spec", None)
    experts, top_k = int(getattr(spec, "num_experts", 0) or 0), int(getattr(spec, "top_k", 0) or 0)
    if spec is None or experts <= top_k or top_k < 1 or spec.active_params <= 0:
        return 0.0
    per_expert = max(0.0, (spec.total_params - spec.active_params) / (experts - top_k))
    return min(1.0, top_k * per_expert / spec.active_params)


def _normalised_share(engine_id: str, share: Sequence[float] | None, n: int) -> tuple[float, ...] | None:
    """The per-GPU expert-load share normalised to sum to 1 (None stays None: uniform routing)."""
    if share is None:
        return None
    vals = [float(x) for x in share]
    if len(vals) != n:
        raise ValueError(f"engine {engine_id!r}: expert_load_share needs one entry per GPU ({n}), got {len(vals)}")
    if not all(math.isfinite(x) and x >= 0 for x in vals) or sum(vals) <= 0:
        raise ValueError(f"engine {engine_id!r}: expert_load_share must be finite, >= 0 and not all zero")
    total = sum(vals)
    return tuple(x / total for x in vals)


def _steps_before(gap_s: float, dt: float) -> int:
    """How many steps of ``dt`` start before an event ``gap_s`` from now (at least 1)."""
    if gap_s <= 0:
        return 1
    return max(1, math.ceil(gap_s / dt - _STEP_EPS))
