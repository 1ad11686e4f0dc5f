"""Per-engine latency model: step time vs cap and workload mix, learned online on top of the profile.

Physics as the prior (nothing here reads a simulator's truth; only the engine's profile and its telemetry):
- decode is memory-bound: a decode step over ``b`` sequences takes ``b / tokens_per_s(cap, b)``, the profile's
  own throughput at that cap and batch (it already holds how weakly a cap slows decode);
- prefill is compute-bound and slows with the SM clock a binding cap leaves. The prior for its cap dependence is
  the profile's throughput at its largest measured batch (the most compute-bound point it has):
  ``g(cap) = tokens_per_s(cap_max, b_max) / tokens_per_s(cap, b_max)``, 1 at the top cap, rising below;
- a window's busy time is then ``theta_d x sum over steps of t_dec(cap, b) + theta_p x prefill tokens x
  tpp0 x g(cap)``. ``theta_d`` and ``theta_p`` are learned by recursive least squares with forgetting on every
  window that ran steps (the EngineLink report already carries steps, busy time and prefill tokens).

From it, at any cap, for a forecast load (decode tokens/s ``lam_d``, prefill tokens/s ``lam_p``): continuous
batching runs steps back to back while busy, so the running batch is ``B = lam_d x tau`` (Little's law) and the
step time solves ``tau = theta_d t_dec(cap, B) + lam_p tau tpp(cap)``; ``tau`` is the mean time per output
token (TPOT) and ``rho = lam_p tpp(cap) + lam_d t_dec / B`` the busy fraction. TTFT adds the queued prompt
tokens ahead of a request and its own prefill. Tails come from these means through per-engine calibration:
where the engine reports its finished requests, the percentile over the last 512 of (measured TTFT / predicted
mean) and of (measured TPOT - mean step) / prefill-chunk time, the latter per batch column; otherwise an EWMA of
window percentiles. The p90 prediction error per window is reported.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from pals_daemon.model.perf_model import PerfModel

FloatArray = NDArray[np.float64]

# Modelled prior for prefill time per prompt token at the top cap, as a fraction of the decode time per
# token at the profile's largest batch: a prompt token costs the same FLOPs as a decode token but prefill
# runs at far higher arithmetic intensity (thousands of tokens per weight read against tens). 0.02 is a loose
# prior (a 2 ms/token batch-64 decode against ~40 us/token prefill); the RLS term theta_p corrects it within a
# few windows that carry prefill, inside a 20x band either way.
PREFILL_PRIOR_FRACTION = 0.02
# RLS forgetting factor per window (0.5 s): an effective memory of ~1 / (1 - 0.98) = 50 windows, 25 s.
RLS_FORGETTING = 0.98
# Bounds on the learned corrections: outside them the profile is wrong, not off.
THETA_D_RANGE = (0.5, 2.0)
THETA_P_RANGE = (0.05, 20.0)  # x the prior: 0.001 to 0.4 of a decode token
# TTFT: percentile / mean calibration factors, priors and clamp (modelled: per-request TTFT spreads around
# the mean; the p99 of a 0.5 s window is close to its worst request). TPOT's tail is additive instead: a
# request's TPOT percentile is the mean step time plus k prefill chunks' worth of interference, because the
# tail comes from steps that carry a large prompt chunk, and only that part slows strongly with the cap (a
# uniform factor learned at a high cap under-predicts the tail at a low one). k per percentile, learned.
TPOT_CHUNKS_PRIOR = {90: 0.3, 99: 1.0}
TPOT_CHUNKS_MAX = 20.0
CAL_PRIOR = {90: 1.3, 99: 2.0}
CAL_RANGE = (0.5, 10.0)
CAL_ALPHA = 0.15
# Request-level tails: where the engine reports its finished requests, the calibration is the percentile itself
# over the last REQUEST_SAMPLES requests (measured TTFT / predicted mean; (measured TPOT - predicted mean step) /
# chunk time), the per-request share the operator judges; a window's p99 over a handful of requests is their
# maximum, and an EWMA of those under-states the tail (Mixtral, Azure code trace at light load: k99 0.16 chunks
# learned per window against ~0.7 per request). The priors hold until MIN_REQUEST_SAMPLES have finished.
REQUEST_SAMPLES = 512
MAX_COLUMNS = 8
MIN_REQUEST_SAMPLES = 20
# Fixed-point iterations of the step-time equation (converges in a few; 16 leaves margin).
_FIXED_POINT_ITERS = 16


@dataclass
class _Rls:
    """Two-parameter recursive least squares with forgetting (theta_d, theta_p)."""

    theta: FloatArray = field(default_factory=lambda: np.array([1.0, 1.0]))
    cov: FloatArray = field(default_factory=lambda: np.diag([0.5, 5.0]))
    samples: int = 0

    def update(self, x: FloatArray, y: float) -> float:
        """Fold one window in; returns the prior prediction's relative error (for the report)."""
        pred = float(x @ self.theta)
        px = self.cov @ x
        gain = px / (RLS_FORGETTING + float(x @ px))
        self.theta = self.theta + gain * (y - pred)
        self.cov = (self.cov - np.outer(gain, px)) / RLS_FORGETTING
        self.theta[0] = min(max(self.theta[0], THETA_D_RANGE[0]), THETA_D_RANGE[1])
        self.theta[1] = min(max(self.theta[1], THETA_P_RANGE[0]), THETA_P_RANGE[1])
        # Keep the covariance bounded when a feature is absent for long (no prefill): forgetting would blow it up.
        self.cov = (
            np.minimum(self.cov, np.diag([0.5, 5.0]) * 10) if np.isfinite(self.cov).all() else np.diag([0.5, 5.0])
        )
        self.samples += 1
        return abs(pred - y) / y if y > 0 else 0.0


@dataclass(frozen=True)
class Prediction:
    """What the model predicts at each candidate cap (arrays over caps)."""

    caps_w: FloatArray
    step_s: FloatArray  # mean step time = mean TPOT (s)
    batch: FloatArray  # running decode batch
    busy: FloatArray  # busy fraction in [0, 1]
    work: FloatArray  # offered work per second of wall time (busy before clipping at 1; > 1: overloaded)
    prefill_share: FloatArray  # fraction of busy time spent in prefill
    overloaded: NDArray[np.bool_]  # arrivals exceed what the cap can serve at the batch limit
    chunk_s: FloatArray  # time of one full prefill chunk at the prior prefill speed (s)
    ttft_mean_s: FloatArray  # mean TTFT of a request arriving now, behind the backlog (s)
    step_tokens: float  # the batch-limit column's step token budget (the key of its learned TPOT tail)
    tpot_p90_ms: FloatArray
    ttft_p90_ms: FloatArray
    tpot_p99_ms: FloatArray
    ttft_p99_ms: FloatArray
    capacity_tokens_per_s: FloatArray

    def tail_ms(self, kind: str, percentile: int) -> FloatArray:
        """Predicted ``kind`` ("tpot" or "ttft") at ``percentile`` (90 or 99), per cap."""
        return getattr(self, f"{kind}_p{percentile}_ms")  # type: ignore[no-any-return]


class LatencyModel:
    """One engine's online step-time model (see module docstring)."""

    def __init__(self, model: PerfModel, tput_scale: float) -> None:
        self.model = model
        self.tput_scale = tput_scale
        self._rls = _Rls()
        b_max = float(model.batches[-1])
        self._b_max = b_max
        top = float(model.tokens_per_s(model.max_cap_w, b_max)) * tput_scale
        self._tpp0_s = PREFILL_PRIOR_FRACTION / max(top, 1e-9)
        self._top_tput = top
        # Calibration factor per (metric, percentile): measured percentile / predicted mean, EWMA.
        self.cal: dict[tuple[str, int], float] = {("ttft", q): CAL_PRIOR[q] for q in CAL_PRIOR}
        self.tpot_chunks: dict[int, float] = dict(TPOT_CHUNKS_PRIOR)
        self._ttft_ratios: deque[float] = deque(maxlen=REQUEST_SAMPLES)
        # TPOT excess samples per batch-limit column (keyed by the column's step token budget: the chunk size
        # differs, and the tail is not exactly proportional to it), and the tails learned per column from them;
        # a column not run yet uses the pooled samples of the others. At most MAX_COLUMNS keys (the plan has 3).
        self._tpot_excess_chunks: dict[int, deque[float]] = {}
        self.tpot_chunks_by_column: dict[int, dict[int, float]] = {}
        # The same request-level samples, sorted (refreshed when requests finish): the predicted share of requests
        # meeting the SLOs at any cap (attainment()) is read from them by bisection.
        self._ttft_sorted: FloatArray = np.zeros(0)
        self._tpot_sorted: dict[int, FloatArray] = {}
        self._tpot_pooled_sorted: FloatArray = np.zeros(0)
        # Relative errors of the p90 predictions (EWMA over windows), reported.
        self.tpot_error = math.nan
        self.ttft_error = math.nan
        self.busy_error = math.nan

    # ---- priors -------------------------------------------------------------------------------------------
    def decode_step_s(self, cap_w: FloatArray, batch: FloatArray) -> FloatArray:
        """Prior decode step time (s) at per-GPU cap and decode batch (broadcasts)."""
        b = np.maximum(batch, 1.0)
        tput = self.model.tokens_per_s(cap_w, b) * self.tput_scale
        return b / np.maximum(tput, 1e-9)

    def prefill_slowdown(self, cap_w: FloatArray) -> FloatArray:
        """g(cap): prefill time at ``cap_w`` relative to the top cap (>= 1)."""
        t = self.model.tokens_per_s(cap_w, self._b_max) * self.tput_scale
        return np.maximum(self._top_tput / np.maximum(t, 1e-9), 1.0)

    def prefill_s_per_token(self, cap_w: FloatArray) -> FloatArray:
        """Learned prefill time per prompt token (s) at ``cap_w``."""
        return self._rls.theta[1] * self._tpp0_s * self.prefill_slowdown(cap_w)

    @property
    def theta(self) -> tuple[float, float]:
        """The learned (decode, prefill) corrections of the prior."""
        return float(self._rls.theta[0]), float(self._rls.theta[1])

    # ---- learning -----------------------------------------------------------------------------------------
    def observe_window(
        self, cap_w: float, num_steps: int, decode_tokens: int, prefill_tokens: int, busy_s: float
    ) -> None:
        """Fold one telemetry window into the step-time correction (RLS)."""
        if num_steps <= 0 or busy_s <= 0 or not math.isfinite(busy_s):
            return
        b_mean = max(1.0, decode_tokens / num_steps)
        x_d = num_steps * float(self.decode_step_s(np.float64(cap_w), np.float64(b_mean)))
        x_p = prefill_tokens * self._tpp0_s * float(self.prefill_slowdown(np.float64(cap_w)))
        err = self._rls.update(np.array([x_d, x_p]), busy_s)
        self.busy_error = err if math.isnan(self.busy_error) else 0.9 * self.busy_error + 0.1 * err

    def calibrate(
        self,
        predicted: Prediction | None,
        index: int,
        measured: dict[tuple[str, int], float | None],
        finished_ms: Sequence[tuple[float, float]] = (),
    ) -> None:
        """Update the calibration factors from what the last tick predicted at the configuration in force.

        ``measured`` maps (metric, percentile) to the window's measured value (None: nothing finished);
        ``finished_ms`` holds the window's finished requests (TTFT, TPOT ms; TPOT NaN: one output token).
        """
        if predicted is None:
            return
        by_request = self._calibrate_requests(predicted, index, finished_ms)  # kinds set from requests
        for (kind, q), value in measured.items():
            if value is None or not math.isfinite(value) or value <= 0:
                continue
            pred = float(predicted.tail_ms(kind, q)[index])
            if not math.isfinite(pred) or pred <= 0:
                continue
            if kind in by_request:
                pass  # the request-level percentile is the calibration
            elif kind == "ttft":
                cal = self.cal[(kind, q)]
                mean_ms = 1000.0 * float(predicted.ttft_mean_s[index])
                if not (math.isfinite(mean_ms) and mean_ms > 0):
                    continue
                sample = min(max(value / mean_ms, CAL_RANGE[0]), CAL_RANGE[1])
                self.cal[(kind, q)] = (1 - CAL_ALPHA) * cal + CAL_ALPHA * sample
            else:
                tau, chunk = float(predicted.step_s[index]), float(predicted.chunk_s[index])
                if math.isfinite(tau) and chunk > 0:
                    sample = min(max((value / 1000.0 - tau) / chunk, 0.0), TPOT_CHUNKS_MAX)
                    self.tpot_chunks[q] = (1 - CAL_ALPHA) * self.tpot_chunks[q] + CAL_ALPHA * sample
            if q != 90:
                continue
            err = abs(pred - value) / value
            if kind == "tpot":
                self.tpot_error = err if math.isnan(self.tpot_error) else 0.9 * self.tpot_error + 0.1 * err
            else:
                self.ttft_error = err if math.isnan(self.ttft_error) else 0.9 * self.ttft_error + 0.1 * err

    def _calibrate_requests(
        self, predicted: Prediction, index: int, finished_ms: Sequence[tuple[float, float]]
    ) -> frozenset[str]:
        """Fold finished requests into the request-level tails; the kinds ("ttft", "tpot") they now set."""
        mean_s = float(predicted.ttft_mean_s[index])
        tau, chunk = float(predicted.step_s[index]), float(predicted.chunk_s[index])
        key = int(predicted.step_tokens)
        column = self._tpot_excess_chunks.get(key)
        if column is None and len(self._tpot_excess_chunks) < MAX_COLUMNS:
            column = self._tpot_excess_chunks[key] = deque(maxlen=REQUEST_SAMPLES)
        for ttft_ms, tpot_ms in finished_ms:
            if math.isfinite(mean_s) and mean_s > 0 and math.isfinite(ttft_ms):
                self._ttft_ratios.append(ttft_ms / 1000.0 / mean_s)
            if column is not None and math.isfinite(tpot_ms) and math.isfinite(tau) and chunk > 0:
                column.append((tpot_ms / 1000.0 - tau) / chunk)
        if not finished_ms:
            # Nothing new: the tails stand as they were (no percentiles recomputed on the tick's hot path).
            ready = {"ttft": len(self._ttft_ratios), "tpot": sum(len(c) for c in self._tpot_excess_chunks.values())}
            return frozenset(k for k, n in ready.items() if n >= MIN_REQUEST_SAMPLES)
        kinds = set()
        self._ttft_sorted = np.sort(np.fromiter(self._ttft_ratios, dtype=np.float64))
        if column is not None:
            self._tpot_sorted[key] = np.sort(np.fromiter(column, dtype=np.float64))
        if len(self._ttft_ratios) >= MIN_REQUEST_SAMPLES:
            ratios = self._ttft_sorted
            for q in CAL_PRIOR:
                self.cal[("ttft", q)] = float(np.clip(np.percentile(ratios, q), *CAL_RANGE))
            kinds.add("ttft")
        if column is not None and len(column) >= MIN_REQUEST_SAMPLES:
            self.tpot_chunks_by_column[key] = _tails(np.fromiter(column, dtype=np.float64))
        pooled = [x for c in self._tpot_excess_chunks.values() for x in c]
        self._tpot_pooled_sorted = np.sort(np.asarray(pooled, dtype=np.float64))
        if len(pooled) >= MIN_REQUEST_SAMPLES:
            self.tpot_chunks = _tails(self._tpot_pooled_sorted)
            kinds.add("tpot")
        return frozenset(kinds)

    def attainment(self, pred: Prediction, ttft_slo_ms: float | None, tpot_slo_ms: float | None) -> FloatArray | None:
        """Predicted share of requests meeting both SLOs at each cap of ``pred``; None before MIN_REQUEST_SAMPLES
        requests have finished.

        The last REQUEST_SAMPLES requests' own deviations from the model (TTFT / predicted mean; TPOT excess in
        prefill chunks, of this batch column where it has enough, else pooled) are carried to each cap's
        predicted mean and chunk time: the whole distribution, not one percentile. TTFT and TPOT misses are
        taken as independent.
        """
        n_ttft = self._ttft_sorted.size
        tpot = self._tpot_sorted.get(int(pred.step_tokens), np.zeros(0))
        if tpot.size < MIN_REQUEST_SAMPLES:
            tpot = self._tpot_pooled_sorted
        if n_ttft < MIN_REQUEST_SAMPLES or tpot.size < MIN_REQUEST_SAMPLES:
            return None
        meet = np.ones_like(pred.caps_w)
        with np.errstate(divide="ignore", invalid="ignore"):
            if ttft_slo_ms and ttft_slo_ms > 0:
                # A request meets TTFT when its ratio <= SLO / predicted mean (an infinite mean: none does).
                limit = np.nan_to_num(ttft_slo_ms / 1000.0 / pred.ttft_mean_s, nan=0.0, posinf=np.inf)
                meet = meet * np.searchsorted(self._ttft_sorted, limit, side="right") / n_ttft
            if tpot_slo_ms and tpot_slo_ms > 0:
                spare_s = tpot_slo_ms / 1000.0 - pred.step_s
                limit = np.where(pred.chunk_s > 0, spare_s / pred.chunk_s, np.where(spare_s >= 0, np.inf, -np.inf))
                limit = np.nan_to_num(limit, nan=-np.inf)
                meet = meet * np.searchsorted(tpot, limit, side="right") / tpot.size
        return np.where(pred.overloaded, 0.0, meet)

    # ---- prediction ---------------------------------------------------------------------------------------
    def predict(
        self,
        caps_w: FloatArray,
        decode_tokens_per_s: float,
        prefill_tokens_per_s: float,
        batch_limit: int,
        prompt_tokens: float,
        backlog_prompt_tokens: float,
        backlog_output_tokens: float = 0.0,
        chunk_tokens: float = 0.0,
        step_tokens: float = 0.0,
    ) -> Prediction:
        """Step time, batch, busy fraction and p90 TPOT/TTFT at each cap for the forecast load."""
        caps = np.asarray(caps_w, dtype=np.float64)
        lam_d = max(decode_tokens_per_s, 0.0)
        tpp = self.prefill_s_per_token(caps)
        theta_d = self._rls.theta[0]
        rho_p = prefill_tokens_per_s * tpp
        b_lim = float(max(1, batch_limit))
        tau = theta_d * self.decode_step_s(caps, np.ones_like(caps))
        with np.errstate(divide="ignore", invalid="ignore"):
            for _ in range(_FIXED_POINT_ITERS):
                b = np.clip(np.nan_to_num(lam_d * tau, nan=1.0, posinf=b_lim), 1.0, b_lim)
                tau_dec = theta_d * self.decode_step_s(caps, b)
                tau = np.where(rho_p < 1.0, tau_dec / np.maximum(1.0 - rho_p, 1e-3), np.inf)
            b = np.clip(np.nan_to_num(lam_d * tau, nan=1.0, posinf=b_lim), 1.0, b_lim)
            capacity = (
                b_lim
                / np.maximum(theta_d * self.decode_step_s(caps, np.full_like(caps, b_lim)), 1e-9)
                * np.maximum(1.0 - rho_p, 0.0)
            )
            overloaded = (rho_p >= 0.98) | (lam_d > capacity)
            # Busy: decode steps run while a sequence is running; at batch b each step serves b tokens.
            dec_busy = np.where(b > 0, lam_d * theta_d * self.decode_step_s(caps, b) / b, 0.0)
            work = dec_busy + rho_p
            busy = np.clip(work, 0.0, 1.0)
            prefill_share = np.where(busy > 0, np.minimum(rho_p / np.maximum(busy, 1e-9), 1.0), 0.0)
            own = prompt_tokens * tpp
            if step_tokens > 0:
                # A prompt longer than the step's token budget is prefilled over several steps, each with a decode pass.
                own = own + max(0.0, math.ceil(prompt_tokens / step_tokens) - 1.0) * tau
            # Ahead of a new request: the queued prompts' prefill, and when the batch is full the decode of the
            # queued requests' outputs at the cap's capacity (they wait for seats).
            # FCFS: the waiting prompts drain at the prefill speed left over by the decode steps interleaved with
            # them; later arrivals queue behind a new request, not ahead of it (so not / (1 - busy)).
            queue = backlog_prompt_tokens * tpp / np.maximum(1.0 - np.clip(dec_busy, 0.0, 1.0), 0.05)
            queue = queue + np.where(b >= b_lim, backlog_output_tokens / np.maximum(capacity, 1e-9), 0.0)
            # The tails scale the whole mean, backlog included (conservative: with a few requests waiting it
            # over-predicts, Mixtral on the Azure code trace at light load 4-11 s against 0.5-2 s measured; leaving
            # the backlog out of the tail factor lost 1.4 pp of SLO attainment on OLMoE near capacity).
            # A request arriving now, behind the backlog, waits the mean: what the release judges.
            ttft_s = np.where(overloaded, np.inf, tau + own + queue)
            tpot_s = tau
            # The chunk's time at the PRIOR prefill speed (not the learned one): the tail samples are normalised
            # by it, so samples taken while theta_p was still being learned stay comparable.
            chunk_s = max(chunk_tokens, 0.0) * self._tpp0_s * self.prefill_slowdown(caps)
            chunks = self.tpot_chunks_by_column.get(int(step_tokens), self.tpot_chunks)
        return Prediction(
            caps_w=caps,
            step_s=tau,
            batch=b,
            busy=busy,
            work=work,
            prefill_share=prefill_share,
            overloaded=overloaded,
            chunk_s=chunk_s,
            ttft_mean_s=ttft_s,
            step_tokens=float(step_tokens),
            tpot_p90_ms=1000.0 * (tpot_s + chunks[90] * chunk_s),
            ttft_p90_ms=1000.0 * ttft_s * self.cal[("ttft", 90)],
            tpot_p99_ms=1000.0 * (tpot_s + chunks[99] * chunk_s),
            ttft_p99_ms=1000.0 * ttft_s * self.cal[("ttft", 99)],
            capacity_tokens_per_s=capacity,
        )


def _tails(excess_chunks: FloatArray) -> dict[int, float]:
    """TPOT excess (in prefill chunks) at each calibrated percentile of ``excess_chunks``."""
    return {q: float(np.clip(np.percentile(excess_chunks, q), 0.0, TPOT_CHUNKS_MAX)) for q in TPOT_CHUNKS_PRIOR}
