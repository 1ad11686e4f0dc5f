"""SLO-driven model-predictive choice of an engine's cap: the least energy per output token whose predicted p90
TTFT and TPOT stay within the SLOs with a margin (pure; one ``SloEngine`` per engine with latency SLOs).

Every tick, for each cap of the grid, the latency model (control/latency.py) predicts the step time, running
batch, busy fraction and p90 TTFT/TPOT under the load forecast for the next seconds; the power model (the
profile) gives the GPUs' power at that operating point; energy per output token follows. The choice:
- feasible caps: not overloaded and both predicted p90s within ``SLO x (1 - margin)``; where a (cap, batch limit)
  has enough finished requests of its own (control/measured.py), their tails decide instead of the prediction,
  both ways, and one cap step below the setting in force the requests in force scaled by the model's ratio of the
  two settings' predicted tails (a probe): the engine's own requests set the level, the model the direction;
- the feasible cap with the least predicted energy per output token; none feasible (or the SLO not being met
  over the regime window) and nobody waiting: the most goodput, then the least energy: the settings whose
  predicted share of requests meeting the SLOs (the latency model's attainment(), from the engine's own
  finished requests) is within ``slo_attainment_tolerance`` of the best, and among them the least energy;
  otherwise (requests waiting, or the attainment not learned yet) the top cap;
- fast release: a cap above the one in force is taken at once; a measured SLO breach raises it by at least
  ``slo_release_w`` the next tick (the top cap by default), and a growing queue whose requests would miss TTFT
  raises it to the lowest cap at which they would not;
- a learned floor: a breach at a cap makes the caps up to one step above it unavailable while the load stays
  within 80% of the load it breached at (the model's error where it showed), one step less per regime window
  without a breach;
- rate-limited descent: at most ``slo_step_down_w`` per tick, only for a predicted saving of at least
  ``slo_min_saving``, none within ``slo_breach_hold_s`` of a breach or ``slo_startup_hold_s`` of start-up;
  after a transient lift (nothing predicted feasible for a tick, or a backlog release), straight back down to
  the cap it lifted from (not below what the plan wants) within SPIKE_RETURN_S, unless a breach was measured
  since: that cap met the SLO at this load a moment ago, and stepping down from the top after every waiting
  prompt kept the cap far above it (a sawtooth on long-prompt traffic);
- the margin adapts from measured slack: an integral on (measured p90 / SLO - 1) when it is above 1, with
  anti-windup (no growth while at the top cap, where a larger margin cannot help), decaying slowly with slack.
The batch limit (and with it the step's token budget, scaled alike) is chosen with the cap among the configured
maximum and its half and quarter: a smaller token budget cuts the prompt chunk that stalls every decoding request
in a step (TPOT's tail) at the cost of more steps per long prompt (TTFT), and a limit below what keeps up with
arrivals is never feasible (the issue's "never cut the batch below what keeps up with arrivals"), nor one below
the requests present (running and waiting); when nothing is feasible the batch limit in force is kept while it
keeps up; in the overload regime, the configured batch.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.latency import LatencyModel, Prediction
from pals_daemon.control.measured import MeasuredTails, allowances, probe_ok, within
from pals_daemon.control.types import EngineObservation, EngineTargets

FloatArray = NDArray[np.float64]

# Modelled: per-GPU power while prefilling (compute-bound) is the cap, up to this fraction of the GPU's
# maximum limit (prefill draws near TDP uncapped; GreenLLM, arXiv 2508.16449).
PREFILL_POWER_FRACTION = 0.9
# Load forecast from ARRIVALS (what is processed lags demand under overload): the request rate smoothed over a
# few seconds (EWMA weight per window), and the forecast is its peak over the last ``slo_forecast_window_s``:
# bursty traffic is planned for at the bursts of the recent past, so the cap stays up while bursts recur and
# comes down after a quiet stretch (a steady load is planned at its mean). Mean prompt and output tokens per
# request are long-run ratios of processed tokens to arrivals (sums decaying by SIZE_DECAY per window, a
# memory of ~4 minutes at 0.5 s windows), which equal the arrivals' sizes over time.
FAST_ALPHA = 0.1
SIZE_DECAY = 0.998
# The learned cap floor (SloEngine._raise_floor; modelled choices): the caps in force over the last 5 s are those
# the requests finishing now were served under (the TTFT SLOs of the suite are 2-3 s); the floor holds while the
# forecast is at least 80% of the load it was learned at.
FLOOR_LOOKBACK_S = 5.0
FLOOR_LOAD_FRACTION = 0.8
# How long the cap a transient lift left stays a place to return to straight away (modelled: the breach hold's
# 15 s, the time over which a recent load is trusted to recur; 10 s and 30 s gave the same A100 quick-matrix
# results, bench/slo_suite_pals.py).
SPIKE_RETURN_S = 15.0


@dataclass(frozen=True)
class SloChoice:
    """The SLO planner's pick for one engine this tick: cap row and batch column of its plan."""

    row: int
    col: int
    cause: str


class SloEngine:
    """Forecast, latency model, margin and last prediction of one engine under latency SLOs."""

    def __init__(self, latency: LatencyModel, config: ControllerConfig) -> None:
        self.latency = latency
        self.config = config
        self.requests_fast = 0.0
        self._sum_arrived = self._sum_prefill = self._sum_decode = 0.0
        self.prompt_tokens = 0.0
        self.output_tokens = 0.0
        self.margin = config.slo_margin
        self.last_waiting = 0
        self.breach = False
        self.queue_growing = False
        self.idle_w: float | None = None
        # Per batch-limit column of the last plan, and the column chosen last.
        self.predictions: list[Prediction] = []
        self.column = -1
        # Per cap of the last plan: 1 when the SLO is predicted met, else how close (the budget split's score).
        self.closeness: FloatArray = np.zeros(0)
        # The (cap row, batch column) chosen last without the budget (the budget split offers nothing above it).
        self.choice: tuple[int, int] | None = None
        # (time s, smoothed decode tokens/s, smoothed prefill tokens/s) over the forecast window.
        self._history: deque[tuple[float, float, float]] = deque()
        self._clock_s = 0.0
        self._last_breach_s = -math.inf
        # Fraction of the windows with finished requests that breached, averaged over slo_regime_window_s.
        self.breach_rate = 0.0
        self._ttft_slo_ms: float | None = None
        # Learned cap floor (see _raise_floor): no plan below floor_w while the forecast is at least
        # FLOOR_LOAD_FRACTION of the load it was learned at.
        self.floor_w = 0.0
        self._floor_load = math.inf
        self._floor_set_s = -math.inf
        self._recent_caps: deque[tuple[float, float]] = deque()
        # (time s, cap W) a transient lift (slo-infeasible, or a backlog release) left; None when there is none.
        self._lifted_from: tuple[float, float] | None = None
        # Per batch column of the last plan: its limit is below the requests present (running + waiting).
        self._too_small: NDArray[np.bool_] = np.zeros(0, dtype=bool)
        # (caps x batch limits) of the last plan: the predicted share of requests meeting the SLOs (None until
        # enough requests have finished to learn it).
        self.attainment: FloatArray | None = None
        # The engine's own finished requests per (cap W, batch limit, lock MHz) they finished under: where a
        # setting has enough of them, they judge its feasibility instead of the model (control/measured.py).
        # Off on the clock planner's view of this engine (its rows share one cap but not one clock).
        self.measured = MeasuredTails()
        self.use_measured = True
        self._in_force: tuple[int, int, int | None] | None = None

    # ---- per-window learning ------------------------------------------------------------------------------
    def observe(
        self,
        eng: EngineObservation,
        cap_in_force_w: float,
        at_top: bool,
        target: EngineTargets,
        gpu_power_w: float,
        lock_mhz: int | None = None,
    ) -> None:
        """Fold the window into the forecast, the step-time model, the p90 calibration, the margin and the
        measured tails of the setting in force (``lock_mhz``: the clock locked on its GPUs, None: unlocked)."""
        self.queue_growing = eng.num_waiting > self.last_waiting and eng.num_waiting > 0
        self.last_waiting = eng.num_waiting
        self.breach = False
        if eng.window_s <= 0:
            return
        span = eng.window_s
        self.requests_fast = (1 - FAST_ALPHA) * self.requests_fast + FAST_ALPHA * eng.arrived_requests / span
        self._sum_arrived = SIZE_DECAY * self._sum_arrived + eng.arrived_requests
        self._sum_prefill = SIZE_DECAY * self._sum_prefill + eng.prefill_tokens
        self._sum_decode = SIZE_DECAY * self._sum_decode + eng.decode_tokens
        if self._sum_arrived >= 1.0:
            self.prompt_tokens = self._sum_prefill / self._sum_arrived
            self.output_tokens = self._sum_decode / self._sum_arrived
        self._clock_s += span
        self._in_force = (round(cap_in_force_w), int(eng.current_max_num_seqs), lock_mhz)
        self.measured.observe(self._in_force, eng.finished_ms, self._clock_s)
        caps = self._recent_caps
        caps.append((self._clock_s, cap_in_force_w))
        while caps and caps[0][0] < self._clock_s - FLOOR_LOOKBACK_S:
            caps.popleft()
        if self._clock_s - self._floor_set_s >= self.config.slo_regime_window_s and self.floor_w > 0:
            # A regime window without a breach: the floor comes down one descent step (re-probed).
            self.floor_w = max(0.0, self.floor_w - self.config.slo_step_down_w)
            self._floor_set_s = self._clock_s
            if self.floor_w == 0.0:
                self._floor_load = math.inf
        hist = self._history
        hist.append((self._clock_s, self.requests_fast, 0.0))
        while hist and hist[0][0] < self._clock_s - self.config.slo_forecast_window_s:
            hist.popleft()
        busy_s = eng.busy_fraction * span
        if eng.busy_fraction < 0.02 and gpu_power_w > 0:
            self.idle_w = gpu_power_w if self.idle_w is None else 0.8 * self.idle_w + 0.2 * gpu_power_w
        self.latency.observe_window(cap_in_force_w, eng.num_steps, eng.decode_tokens, eng.prefill_tokens, busy_s)
        pred = self.predictions[self.column] if self.predictions else None
        if pred is not None and pred.caps_w.size:
            row = int(np.argmin(np.abs(pred.caps_w - cap_in_force_w)))
            self.latency.calibrate(
                pred,
                row,
                {
                    ("tpot", 90): eng.tpot_p90_ms,
                    ("ttft", 90): eng.ttft_p90_ms,
                    ("tpot", 99): eng.tpot_p99_ms,
                    ("ttft", 99): eng.ttft_p99_ms,
                },
                eng.finished_ms,
            )
        ratio = _slo_ratio(eng, target, self.config.slo_percentile)
        if ratio is None:
            return
        cfg = self.config
        a = min(1.0, span / cfg.slo_regime_window_s)
        self.breach_rate = (1 - a) * self.breach_rate + a * (1.0 if ratio > 1.0 else 0.0)
        if ratio > 1.0:
            self.breach = True
            self._last_breach_s = self._clock_s
            self._raise_floor(at_top)
            if not at_top:  # anti-windup: at the top cap a larger margin cannot help
                self.margin = min(cfg.slo_margin_max, self.margin + cfg.slo_margin_gain * (ratio - 1.0))
        elif ratio < 1.0 - self.margin:
            self.margin = max(cfg.slo_margin, self.margin - cfg.slo_margin_decay)

    # ---- per-tick planning --------------------------------------------------------------------------------
    def forecast(self) -> tuple[float, float]:
        """(decode tokens/s, prefill tokens/s) expected over the next seconds."""
        rate = max((h[1] for h in self._history), default=self.requests_fast)
        return rate * self.output_tokens, rate * self.prompt_tokens

    def plan(
        self,
        eff_caps_w: FloatArray,
        n_gpus: int,
        max_limit_w: float,
        batch_limits: Sequence[int],
        batched_tokens_limits: Sequence[int],
        num_waiting: int,
        power_ratio: float,
        target: EngineTargets,
        num_running: int = 0,
    ) -> tuple[FloatArray, NDArray[np.bool_], FloatArray]:
        """(predicted engine power W, feasible, energy per output token J), each (caps x batch limits)."""
        lam_d, lam_p = self.forecast()
        self._ttft_slo_ms = target.ttft_ms
        backlog = num_waiting * self.prompt_tokens
        columns = []
        for b_lim, tok_lim in zip(batch_limits, batched_tokens_limits, strict=True):
            pred = self.latency.predict(
                eff_caps_w,
                lam_d,
                lam_p,
                b_lim,
                self.prompt_tokens,
                backlog,
                num_waiting * self.output_tokens,
                # A step's prompt chunk: its token budget, or less when prompts are short (modelled: two prompts).
                chunk_tokens=min(float(tok_lim), 2.0 * self.prompt_tokens),
                step_tokens=float(tok_lim),
            )
            columns.append(self._column(pred, eff_caps_w, n_gpus, max_limit_w, lam_d, power_ratio, target))
        self.predictions = [c[0] for c in columns]
        power, ok, energy, closeness = (np.stack([c[k] for c in columns], axis=1) for k in range(1, 5))
        if self.use_measured:
            ok = self._measured_ok(ok, eff_caps_w, batch_limits, target)
        shares = [self.latency.attainment(c[0], target.ttft_ms, target.tpot_ms) for c in columns]
        self.attainment = None if any(a is None for a in shares) else np.stack(shares, axis=1)  # type: ignore[arg-type]
        # A batch limit below the requests present now (running and waiting) would queue some of them for a
        # seat mid-burst (the forecast lags a burst's onset): never feasible while they are there.
        below = np.asarray(batch_limits) < num_running + num_waiting
        ok = ok & ~below[None, :]
        self._too_small = below
        closeness = np.where(below[None, :], np.minimum(closeness, 0.5), closeness)
        self.closeness = closeness
        return power, ok, energy

    def _column(
        self,
        pred: Prediction,
        eff_caps: FloatArray,
        n_gpus: int,
        max_limit_w: float,
        lam_d: float,
        power_ratio: float,
        target: EngineTargets,
    ) -> tuple[Prediction, FloatArray, NDArray[np.bool_], FloatArray, FloatArray]:
        """One batch limit's (prediction, power, feasible, energy per output token, closeness to the SLO)."""
        model = self.latency.model
        p_dec = np.minimum(model.gpu_power_w(eff_caps, pred.batch) * power_ratio, eff_caps)
        p_pre = np.minimum(eff_caps, PREFILL_POWER_FRACTION * max_limit_w)
        p_busy = pred.prefill_share * p_pre + (1 - pred.prefill_share) * p_dec
        idle = self.idle_w if self.idle_w is not None else float(np.min(p_dec))
        idle = min(idle, float(np.min(p_dec)))
        power = n_gpus * (pred.busy * p_busy + (1 - pred.busy) * idle)
        # Energy per output token from the work, not the clipped busy time: past saturation a slower cap still
        # costs its power for longer per token.
        energy = n_gpus * (pred.work * p_busy + np.maximum(0.0, 1 - pred.work) * idle) / max(lam_d, 1e-6)
        m = self.margin
        q = self.config.slo_percentile
        # How close each cap comes to the SLO: 1 when every predicted tail is within SLO x (1 - margin), else
        # the worst (allowed / predicted) ratio; an overloaded cap scores what it can serve of the arrivals.
        closeness = np.ones_like(energy)
        with np.errstate(divide="ignore", invalid="ignore"):
            for kind, slo_ms in (("tpot", target.tpot_ms), ("ttft", target.ttft_ms)):
                if slo_ms is not None and slo_ms > 0:
                    ratio = slo_ms * (1 - m) / pred.tail_ms(kind, q)
                    closeness = np.minimum(closeness, np.nan_to_num(ratio, nan=0.0, posinf=1.0, neginf=0.0))
            served = np.minimum(1.0, pred.capacity_tokens_per_s / max(lam_d, 1e-9))
        closeness = np.clip(np.where(pred.overloaded, np.minimum(closeness, 0.5 * served), closeness), 0.0, 1.0)
        ok = ~pred.overloaded & (closeness >= 1.0)
        return pred, power, ok, energy, closeness

    def choose(
        self,
        energy: FloatArray,
        feasible: NDArray[np.bool_],
        caps_w: FloatArray,
        incumbent: tuple[int, int] | None,
    ) -> SloChoice:
        """The (cap row, batch column) to run next tick (see module docstring); the last column is the
        engine's configured batch limit."""
        cfg = self.config
        top = caps_w.size - 1
        configured = energy.shape[1] - 1
        regime = self.breach_rate > cfg.slo_infeasible_breach_rate
        # The attainment is predicted for requests arriving from now on; requests already waiting are not in it,
        # and their TTFT is protected by draining them (the top cap below), so the goodput choice waits for them.
        goodput = self._most_goodput() if (regime or not feasible.any()) and self.last_waiting == 0 else None
        if self.floor_w > 0 and self.forecast()[0] >= FLOOR_LOAD_FRACTION * self._floor_load:
            feasible = feasible & (caps_w >= self.floor_w - 1e-9)[:, None]
        if goodput is not None:
            # The SLO is not being met (or not predicted met anywhere): the settings that serve the most goodput
            # within slo_attainment_tolerance are equal; among them the least energy, as below.
            feasible = goodput
            best = float(np.min(np.where(feasible, energy, np.inf)))
            near = feasible & (energy <= best * (1 + cfg.slo_min_saving))
            want, cause = int(np.flatnonzero(near.any(axis=1))[-1]), "slo-goodput"
        elif regime:
            # The SLO is not being met at the caps tried: serve the most goodput (the top cap, the configured
            # batch), and come back down only once breaches have become rare again.
            want, cause = top, "slo-overload"
        elif feasible.any():
            # The highest feasible cap within slo_min_saving of the least energy: where the cap does not
            # matter (idle, or below where it binds) a higher one costs nothing and absorbs the next burst.
            best = float(np.min(np.where(feasible, energy, np.inf)))
            near = feasible & (energy <= best * (1 + cfg.slo_min_saving))
            want = int(np.flatnonzero(near.any(axis=1))[-1])
            cause = "slo-energy"
        else:
            want, cause = top, "slo-infeasible"
        first = incumbent is None
        inc = top if incumbent is None else incumbent[0]  # a new engine starts from the top cap
        inc_col = configured if incumbent is None else incumbent[1]
        row = want
        recent_breach = self._clock_s - self._last_breach_s < cfg.slo_breach_hold_s
        if want < inc and (recent_breach or self._clock_s < cfg.slo_startup_hold_s):
            # No descent within slo_breach_hold_s of a measured breach (the load that caused it may recur), nor
            # before the engine has been watched for slo_startup_hold_s (its load is not known yet).
            row, cause = inc, "hold"
        elif want < inc:
            floor_w = caps_w[inc] - cfg.slo_step_down_w
            lifted = self._lifted_from
            if lifted is not None and self._clock_s - lifted[0] <= SPIKE_RETURN_S:
                floor_w = min(floor_w, lifted[1])  # back to the cap the transient lift left
            lowest = int(np.searchsorted(caps_w, floor_w - 1e-9))
            row = max(want, min(lowest, inc))
            # Judged at the destination: one grid step down may save nothing where the cap does not bind.
            if not np.min(energy[want]) < energy[inc, inc_col] * (1 - cfg.slo_min_saving):
                row, cause = inc, "hold"
        elif want == inc:
            cause = "hold"
        if self.breach:
            # Measured: the model was wrong here; release by slo_release_w (to the top cap by default).
            up = int(np.searchsorted(caps_w, caps_w[inc] + cfg.slo_release_w - 1e-9))
            row = max(row, min(up, top))
            cause = "slo-release"
        elif self.queue_growing and self._backlog_threatens(inc, inc_col):
            # Predicted: the requests waiting would miss TTFT at this cap. The next tick, the lowest cap above at
            # which a request behind them meets it (the top cap if none does): a burst's backlog at light load
            # drains at a middle cap, and the top one would spend the burst's energy at its power.
            drains = [r for r in range(inc + 1, top + 1) if not self._backlog_threatens(r, inc_col)]
            row = max(row, drains[0] if drains else top)
            cause = "slo-release"
        self._note_lift(cause, row, inc, caps_w, recent_breach)
        col = configured
        if cause != "slo-overload" and feasible[row].any():
            # The batch limit of least energy that meets the SLO at this cap (ties: the larger one).
            e = np.where(feasible[row], energy[row], np.inf)
            near_cols = np.flatnonzero(e <= float(e.min()) * (1 + cfg.slo_min_saving))
            col = int(near_cols[-1])
        elif (
            cause != "slo-overload"
            and not first
            and self.predictions
            and not self.predictions[inc_col].overloaded[row]
            and not self._too_small[inc_col]
        ):
            # Nothing meets the SLO at this cap (a burst's backlog): keep the batch limit in force while it keeps
            # up with the arrivals; the configured one would only add prompt-chunk stalls to every decode.
            col = inc_col
        self.column = col
        self.choice = (row, col)
        return SloChoice(row, col, "first" if first else cause)

    def _note_lift(self, cause: str, row: int, inc: int, caps_w: FloatArray, recent_breach: bool) -> None:
        """Remember the cap a transient lift leaves (the first of a run of lifts within SPIKE_RETURN_S); forget it
        after a measured breach (the cap was too low after all)."""
        if self.breach or recent_breach:
            self._lifted_from = None
        elif row > inc and (cause == "slo-infeasible" or cause == "slo-release"):
            lifted = self._lifted_from
            if lifted is None or self._clock_s - lifted[0] > SPIKE_RETURN_S:
                self._lifted_from = (self._clock_s, float(caps_w[inc]))

    def _measured_ok(
        self, model_ok: NDArray[np.bool_], caps_w: FloatArray, batch_limits: Sequence[int], target: EngineTargets
    ) -> NDArray[np.bool_]:
        """(caps x batch limits): feasible by the setting's own recent requests where it has enough of them (both
        ways: the model's level can be off either way), else by the model; one cap step below the setting in
        force, also by the requests in force scaled by the model's ratio of the two settings' predicted tails (a
        probe: the engine's own requests set the level, the model the direction)."""
        q = self.config.slo_percentile
        allowed = allowances(target, self.margin)
        if not allowed:
            return model_ok
        ok = model_ok.copy()
        rows = {round(float(c)): r for r, c in enumerate(caps_w)}
        for r, cap in enumerate(caps_w):
            for c, batch in enumerate(batch_limits):
                own = self.measured.tails((round(float(cap)), int(batch), None), q)
                if own is not None:
                    ok[r, c] = within(own, allowed) and not bool(self.predictions[c].overloaded[r])
        key = self._in_force
        in_force = self.measured.tails(key, q) if key is not None and key[2] is None else None
        if in_force is None or key is None or key[0] not in rows or key[1] not in batch_limits:
            return ok
        r0, c0 = rows[key[0]], list(batch_limits).index(key[1])
        if r0 > 0 and self.measured.tails((round(float(caps_w[r0 - 1])), key[1], None), q) is None:
            ok[r0 - 1, c0] |= probe_ok(in_force, self.predictions[c0], r0, r0 - 1, allowed, q)
        return ok

    def _raise_floor(self, at_top: bool) -> None:
        """A measured breach: the lowest cap in force over the last FLOOR_LOOKBACK_S (what the requests finishing
        now ran under) was too low for this load; plan no lower than one descent step above it while the load
        stays near. The model's error at low caps is thereby learned where it shows, per engine and load, and
        the floor comes back down one step per regime window without a breach (so it is re-probed)."""
        if at_top or not self._recent_caps:
            return
        low = min(c for _, c in self._recent_caps)
        self.floor_w = max(self.floor_w, low + self.config.slo_step_down_w)
        self._floor_load = min(self._floor_load, self.forecast()[0])
        self._floor_set_s = self._clock_s

    def _most_goodput(self) -> NDArray[np.bool_] | None:
        """(caps x batch limits): the settings whose predicted attainment is within slo_attainment_tolerance of
        the best one's, keeping up with arrivals and seating the requests present; None until the attainment is
        learned (or where no setting keeps up)."""
        att = self.attainment
        if att is None or not self.predictions or att.shape[1] != len(self.predictions):
            return None
        att = np.where(self._too_small[None, :], 0.0, att)
        best = float(att.max())
        if best <= 0.0:
            return None
        return att >= best - self.config.slo_attainment_tolerance - 1e-12

    def _backlog_threatens(self, row: int, col: int) -> bool:
        """Whether a request arriving now, behind the requests waiting, would wait past the TTFT SLO (with the
        margin) at the cap and batch limit in force."""
        slo = self._ttft_slo_ms
        if not slo or slo <= 0 or not self.predictions:
            return False
        return bool(1000.0 * self.predictions[col].ttft_mean_s[row] > slo * (1 - self.margin))


def _slo_ratio(eng: EngineObservation, target: EngineTargets, percentile: int) -> float | None:
    """The worst measured percentile / SLO of the window, None when nothing finished."""
    ratios = []
    ttft = eng.ttft_p99_ms if percentile == 99 else eng.ttft_p90_ms
    tpot = eng.tpot_p99_ms if percentile == 99 else eng.tpot_p90_ms
    if target.ttft_ms and ttft is not None and math.isfinite(ttft):
        ratios.append(ttft / target.ttft_ms)
    if target.tpot_ms and tpot is not None and math.isfinite(tpot):
        ratios.append(tpot / target.tpot_ms)
    return max(ratios) if ratios else None


def slo_mode(target: EngineTargets) -> bool:
    """Latency SLOs without a throughput target: the SLO planner decides the engine's cap."""
    has_slo = bool((target.ttft_ms and target.ttft_ms > 0) or (target.tpot_ms and target.tpot_ms > 0))
    return has_slo and not (target.tokens_per_s and target.tokens_per_s > 0)
