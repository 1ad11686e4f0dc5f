"""Simulated ground truth of one served model: step time, power and clock as functions of cap and batch.

Decode comes from a physical model (:mod:`pals_daemon.sim.physics`: DVFS under the cap, memory-bound vs.
clock-bound time, MoE expert activation) fitted per model to measured sweeps (the loaders:
:mod:`pals_daemon.sim.a100`, :mod:`pals_daemon.sim.h100`; the fitted constants: :mod:`pals_daemon.sim.fitted`).

The physics leaves residuals against the measurements (A100: a few percent on average, up to about 20% at single
points, see bench/sim_calibration.py). A residual-correction table (log of measured / modelled at each measured
point, interpolated bilinearly in (cap, log2 batch) and held at the edges) makes the truth reproduce every
measured point exactly; between points the physics sets the shape. Prefill is modelled from FLOPs and slows with
the SM clock the same DVFS model gives (:mod:`pals_daemon.sim.prior`, shared with the controller's prior).

Expert-routing skew (:meth:`ModelTruth.decode_step_skewed`): with expert parallelism the GPU holding the hottest
experts is the straggler; the step follows it and the other GPUs wait at idle power, so routing-aware per-GPU caps
(lower on the lightly loaded GPUs) save energy at the same step time. The measured sweeps ran with uniform routing
(TP), so the skew response is modelled.

Model mismatch (:class:`Perturbation`, :meth:`Perturbation.for_prompt_mix`): the simulated node can serve a mix
other than the one the controller's profile was measured on; the truth then runs slower or faster and draws more or
less power than the profile says (10% or more for the Azure code trace against the modelled profiling mix). The
default (no perturbation) is the calibrated truth.

Everything labelled "modelled" is an assumption or a fit, not a measurement; everything else cites its source.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pals_daemon.sim.catalogue import ModelSpec, modelled_kv_capacity_tokens
from pals_daemon.sim.hardware import A100_SXM4, HardwareProfile
from pals_daemon.sim.physics import DecodePhysics
from pals_daemon.sim.prior import PrefillStep, clock_mhz_under_cap, prefill_demand_power_w, prefill_step

# Modelled: the prompt mix the shipped A100 profile stands for. The sweep's source (mrhankendi/AI_LLM) does
# not state its prompt lengths; we take a short chat-style mix (512 prompt, 256 output tokens on average).
PROFILE_PROMPT_TOKENS = 512.0
PROFILE_OUTPUT_TOKENS = 256.0
# Modelled: workload sensitivity of decode to the served mix's mean KV context per decode step
# (prompt + output / 2) relative to the profiling mix: throughput ~ (ctx / ctx_profile) ** -0.12 (more KV
# read per token, paged-attention gathers, prefill chunks interleaved with decode) and power
# ~ (ctx / ctx_profile) ** 0.04 (more HBM traffic per step). With the Azure code trace (mean context about
# 2,000 tokens, outputs of a few tens) against 512 / 256 this gives a throughput factor near 0.86 and a power
# factor near 1.05: the controller's profile is off by more than 10%.
MIX_THROUGHPUT_EXPONENT = 0.12
MIX_POWER_EXPONENT = 0.04
# Modelled: the factors a mix can produce are kept within [0.5, 2] (far outside, the model is meaningless).
_MIX_FACTOR_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class Perturbation:
    """Multiplicative factors applied to the truth so it differs from a controller's profile.

    ``throughput_factor`` scales decode and prefill speed (step times / factor); ``power_factor`` scales the
    power the work draws. The power cap still holds: where the scaled demand exceeds the cap, DVFS lowers the
    clock (so the mismatch then shows as lower throughput at the cap, as on a real GPU).
    """

    throughput_factor: float = 1.0
    power_factor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("throughput_factor", "power_factor"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v!r}")

    @property
    def magnitude(self) -> float:
        """Largest relative deviation of either factor from 1."""
        return max(abs(self.throughput_factor - 1.0), abs(self.power_factor - 1.0))

    @classmethod
    def for_prompt_mix(
        cls,
        mean_prompt_tokens: float,
        mean_output_tokens: float,
        *,
        profile_prompt_tokens: float = PROFILE_PROMPT_TOKENS,
        profile_output_tokens: float = PROFILE_OUTPUT_TOKENS,
    ) -> Perturbation:
        """The mismatch of serving a mix against a profile measured on another mix (modelled, see module).

        With c = mean prompt + mean output / 2 (the mean KV context a decode step reads), the truth runs at
        (c / c_profile) ** -MIX_THROUGHPUT_EXPONENT of the profiled throughput and draws
        (c / c_profile) ** MIX_POWER_EXPONENT of its power. The profiling mix itself gives no perturbation.
        """
        for v in (mean_prompt_tokens, mean_output_tokens, profile_prompt_tokens, profile_output_tokens):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"token counts must be finite and >= 0, got {v!r}")
        ctx = max(1.0, mean_prompt_tokens + mean_output_tokens / 2.0)
        ctx_profile = max(1.0, profile_prompt_tokens + profile_output_tokens / 2.0)
        ratio = ctx / ctx_profile
        lo, hi = _MIX_FACTOR_RANGE
        tf = min(hi, max(lo, ratio**-MIX_THROUGHPUT_EXPONENT))
        pf = min(hi, max(lo, ratio**MIX_POWER_EXPONENT))
        return cls(tf, pf)

    @classmethod
    def for_requests(cls, requests: Iterable[object], **profile: float) -> Perturbation:
        """:meth:`for_prompt_mix` of the mean ``prompt_tokens`` / ``output_tokens`` of ``requests``."""
        n = p_sum = o_sum = 0.0
        for r in requests:
            n += 1
            p_sum += float(r.prompt_tokens)  # type: ignore[attr-defined]
            o_sum += float(r.output_tokens)  # type: ignore[attr-defined]
        if n == 0:
            return cls()
        return cls.for_prompt_mix(p_sum / n, o_sum / n, **profile)


class DecodeStep(NamedTuple):
    """One decode step: its duration, per-GPU power, per-GPU uncapped demand, and SM clock."""

    step_time_s: float
    power_w_per_gpu: float
    demand_power_w: float
    sm_clock_mhz: float


class SkewedDecodeStep(NamedTuple):
    """One decode step under expert-routing skew: the slowest GPU's time and each GPU's power and clock."""

    step_time_s: float
    power_w_per_gpu: tuple[float, ...]
    sm_clock_mhz_per_gpu: tuple[float, ...]
    straggler: int  # index of the GPU that sets the step time


class ModelTruth:
    """How one model on its GPUs responds to power cap and batch (the simulated ground truth).

    With ``physics`` the decode behaviour is the fitted physical model times a residual correction that is
    exact at the measured (cap, batch) points; without it (a grid-only truth) it is bilinear interpolation in
    (cap, log2 batch) of the measured grid.
    """

    def __init__(
        self,
        spec: ModelSpec,
        caps_w: Sequence[float],
        batches: Sequence[int],
        throughput_tokens_per_s: np.ndarray,
        power_w: np.ndarray,
        *,
        num_gpus: int = 4,
        hardware: HardwareProfile = A100_SXM4,
        kv_capacity_tokens: int | None = None,
        perturbation: Perturbation | None = None,
        physics: DecodePhysics | None = None,
        source: str = "",
    ) -> None:
        thr = np.asarray(throughput_tokens_per_s, dtype=float)
        pw = np.asarray(power_w, dtype=float)
        shape = (len(caps_w), len(batches))
        if thr.shape != shape or pw.shape != shape:
            raise ValueError(f"grids must have shape {shape}, got {thr.shape} and {pw.shape}")
        if list(caps_w) != sorted(set(caps_w)) or list(batches) != sorted(set(batches)):
            raise ValueError("caps_w and batches must be strictly increasing")
        if min(batches) < 1 or not (np.all(thr > 0) and np.all(pw > 0)):
            raise ValueError("batches must be >= 1 and every throughput and power > 0")
        if num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {num_gpus!r}")
        self.spec = spec
        self.model = spec.name
        self.num_gpus = num_gpus
        self.hardware = hardware
        self.source = source
        self.caps_w: tuple[float, ...] = tuple(float(c) for c in caps_w)
        self.batches: tuple[int, ...] = tuple(int(b) for b in batches)
        self._log_batches = [math.log2(b) for b in self.batches]
        self._thr = [list(map(float, row)) for row in thr]
        self._pw = [list(map(float, row)) for row in pw]
        self.perturbation = perturbation or Perturbation()
        self.physics = physics
        self.kv_capacity_tokens = (
            modelled_kv_capacity_tokens(spec, num_gpus, hardware) if kv_capacity_tokens is None else kv_capacity_tokens
        )
        if self.kv_capacity_tokens < 1:
            raise ValueError(f"kv_capacity_tokens must be >= 1, got {self.kv_capacity_tokens!r}")
        self._decode_cache: dict[tuple[float, int], DecodeStep] = {}
        self._skew_cache: dict[tuple[tuple[float, ...], int, tuple[float, ...], float | None], SkewedDecodeStep] = {}
        self._locked_cache: dict[tuple[float, int, float], DecodeStep] = {}
        if physics is not None:
            # Physics rows are tabulated per integer batch over a 1 W cap grid spanning the hardware's range
            # and the measured caps (computed lazily, one vectorised DVFS solve per batch).
            lo = math.floor(min(hardware.min_limit_w, self.caps_w[0]))
            hi = math.ceil(max(hardware.max_limit_w, self.caps_w[-1]))
            self._cap_lo = float(lo)
            self._cap_grid = np.arange(lo, hi + 1, dtype=float)
            # array('d'): 8 bytes an entry (a few MB even for thousands of batch sizes).
            self._rows: dict[int, tuple[array[float], array[float], array[float]]] = {}
            self._res_thr = [[0.0] * len(self.batches) for _ in self.caps_w]
            self._res_pw = [[0.0] * len(self.batches) for _ in self.caps_w]
            for i, c in enumerate(self.caps_w):
                for j, b in enumerate(self.batches):
                    t, p, _ = self._physics_at(c, b)
                    self._res_thr[i][j] = math.log(thr[i, j] * t / b)
                    self._res_pw[i][j] = math.log(pw[i, j] / p)

    def with_perturbation(self, perturbation: Perturbation) -> ModelTruth:
        """A copy of this truth with ``perturbation`` applied (replacing any previous one)."""
        return ModelTruth(
            self.spec,
            self.caps_w,
            self.batches,
            np.array(self._thr),
            np.array(self._pw),
            num_gpus=self.num_gpus,
            hardware=self.hardware,
            kv_capacity_tokens=self.kv_capacity_tokens,
            perturbation=perturbation,
            physics=self.physics,
            source=self.source,
        )

    # ---- decode -----------------------------------------------------------------------------------------

    def throughput_tokens_per_s(self, cap_w: float, batch: float) -> float:
        """Output tokens/s of the engine at ``batch`` running requests under ``cap_w`` per GPU."""
        if self.physics is None:
            return self._interp(self._thr, cap_w, batch) * self.perturbation.throughput_factor
        b = max(1.0, float(batch))
        t, _, _ = self._physics_interp(cap_w, b)  # the table includes the perturbation
        return b / t * math.exp(self._interp(self._res_thr, cap_w, b))

    def power_w(self, cap_w: float, batch: float) -> float:
        """Average per-GPU power (W) while decoding ``batch`` requests under ``cap_w`` (not clamped to it)."""
        if self.physics is None:
            return self._interp(self._pw, cap_w, batch) * self.perturbation.power_factor
        b = max(1.0, float(batch))
        _, p, _ = self._physics_interp(cap_w, b)  # the table includes the perturbation
        return self._corrected_power_w(self._clamp_cap(cap_w), b, p)

    def _corrected_power_w(self, cap_w: float, batch: float, physics_power_w: float) -> float:
        """Physics power times the residual correction; below the measured caps the cap holds it.

        The residuals were measured at the measured caps; under a lower cap (H100: anything below 700 W) a
        correction above 1 would push the draw past the cap, which the GPU's power controller prevents.
        """
        v = physics_power_w * math.exp(self._interp(self._res_pw, cap_w, batch))
        if cap_w < self.caps_w[0]:
            v = min(v, max(float(cap_w), physics_power_w))
        return v

    def clock_ratio(self, cap_w: float, batch: float) -> float:
        """Modelled SM clock / max clock while decoding ``batch`` under ``cap_w``."""
        return self.decode_step(cap_w, max(1, round(batch))).sm_clock_mhz / self.hardware.max_sm_clock_mhz

    def decode_step(self, cap_w: float, batch: int, locked_clock_mhz: float | None = None) -> DecodeStep:
        """Duration, per-GPU power, per-GPU demand at the top cap, and SM clock of one decode step.

        ``locked_clock_mhz``: a locked SM clock ceiling. The clock in force is the lower of it and the clock the
        cap leaves; step time and power follow it through the physics at any load (at light load, where the cap
        does not bind, a lock still lowers power and lengthens the clock-bound part of the step), with the same
        residual correction as the unlocked step at that cap. None (or a lock at or above the cap's clock) is the
        unlocked truth exactly. A grid-only truth has no clock model and ignores the lock.
        """
        if locked_clock_mhz is not None and self.physics is not None:
            return self._decode_step_locked(cap_w, batch, float(locked_clock_mhz))
        key = (float(cap_w), int(batch))
        hit = self._decode_cache.get(key)
        if hit is not None:
            return hit
        b = max(1, int(batch))
        thr = self.throughput_tokens_per_s(cap_w, b)
        power = self.power_w(cap_w, b)
        demand = self.power_w(self.hardware.max_limit_w if self.physics is not None else self.caps_w[-1], b)
        if self.physics is not None:
            clock = self.hardware.max_sm_clock_mhz * self._physics_interp(cap_w, b)[2]
        else:
            clock = self._clock_mhz(cap_w, min(power, cap_w), demand)
        step = DecodeStep(b / thr, power, demand, clock)
        if len(self._decode_cache) < 100_000:
            self._decode_cache[key] = step
        return step

    def _decode_step_locked(self, cap_w: float, batch: int, locked_clock_mhz: float) -> DecodeStep:
        """:meth:`decode_step` under a locked clock (physics truths only)."""
        ph = self.physics
        assert ph is not None
        base = self.decode_step(cap_w, batch)
        max_clock = float(self.hardware.max_sm_clock_mhz)
        f_lock = max(ph.f_min, locked_clock_mhz / max_clock)
        if f_lock * max_clock >= base.sm_clock_mhz:
            return base  # the cap already holds the clock at or below the lock
        key = (float(cap_w), int(batch), f_lock)
        hit = self._locked_cache.get(key)
        if hit is not None:
            return hit
        b = max(1, int(batch))
        pert = self.perturbation
        t_mem, t_clk = ph.times_s(float(b))
        t = float(ph.busy_time_s(t_mem, t_clk, f_lock)) / pert.throughput_factor
        p = float(ph.busy_power_w(t_mem, t_clk, f_lock)) * pert.power_factor
        step_s = t * math.exp(-self._interp(self._res_thr, cap_w, b))
        power = min(base.power_w_per_gpu, self._corrected_power_w(self._clamp_cap(cap_w), b, p))
        top = self.hardware.max_limit_w
        if cap_w >= top:
            demand = base.demand_power_w
        else:
            demand = self._decode_step_locked(top, b, locked_clock_mhz).power_w_per_gpu
        out = DecodeStep(max(step_s, base.step_time_s), power, demand, f_lock * max_clock)
        if len(self._locked_cache) < 100_000:
            self._locked_cache[key] = out
        return out

    def decode_step_skewed(
        self,
        cap_w_per_gpu: Sequence[float],
        batch: int,
        expert_load_share: Sequence[float],
        locked_clock_mhz: float | None = None,
    ) -> SkewedDecodeStep:
        """One decode step with expert parallelism when GPU i receives ``expert_load_share[i]`` of the routing.

        The GPU hosting the hottest experts is the straggler: the step lasts as long as the slowest GPU, the
        others finish early and wait at idle power, so a lower cap on a lightly loaded GPU saves energy without
        lengthening the step. Shares are normalised to sum to 1; uniform shares with equal caps give
        :meth:`decode_step` (its step time, power and clock on every GPU). The residual correction of the
        measured sweep (measured under uniform routing) is applied at each GPU's cap. ``locked_clock_mhz``: a
        locked SM clock ceiling on every GPU (the lower of it and each GPU's cap clock is in force).
        """
        ph = self.physics
        if ph is None:
            raise ValueError(f"{self.model}: a grid-only truth has no physics for routing skew")
        caps = [float(c) for c in cap_w_per_gpu]
        shares = [float(s) for s in expert_load_share]
        f_lock = None if locked_clock_mhz is None else float(locked_clock_mhz) / self.hardware.max_sm_clock_mhz
        key = (tuple(caps), int(batch), tuple(shares), f_lock)
        hit = self._skew_cache.get(key)
        if hit is not None:
            return hit
        if len(caps) != self.num_gpus or len(shares) != self.num_gpus:
            raise ValueError(f"need one cap and one share per GPU ({self.num_gpus}), got {len(caps)} and {len(shares)}")
        b = max(1, int(batch))
        pert = self.perturbation
        clamped = [self._clamp_cap(c) for c in caps]
        busy, p_busy, f = ph.per_gpu(b, [c / pert.power_factor for c in clamped], shares, f_lock)
        # Each GPU's busy time carries the residual correction at its cap; the slowest sets the step.
        times = [
            float(busy[i]) / pert.throughput_factor * math.exp(-self._interp(self._res_thr, clamped[i], b))
            for i in range(len(caps))
        ]
        i_max = max(range(len(times)), key=times.__getitem__)
        step_time = times[i_max]
        idle = ph.idle_w
        # Busy for times[i] of the step at p_busy, idle for the rest; then the power residual, within the cap
        # (or within what the uniform truth draws at that cap, which measurements may put a little above it).
        powers = tuple(
            min(
                self._corrected_power_w(
                    clamped[i], b, (idle + (float(p_busy[i]) - idle) * times[i] / step_time) * pert.power_factor
                ),
                max(clamped[i], self.power_w(clamped[i], b)),
            )
            for i in range(len(caps))
        )
        clocks = tuple(float(x) * self.hardware.max_sm_clock_mhz for x in f)
        out = SkewedDecodeStep(step_time, powers, clocks, i_max)
        if len(self._skew_cache) < 100_000:
            self._skew_cache[key] = out
        return out

    # ---- prefill ----------------------------------------------------------------------------------------
    # ---- prefill ----------------------------------------------------------------------------------------

    def prefill_demand_power_w(self) -> float:
        """Modelled per-GPU power prefill would draw uncapped."""
        return prefill_demand_power_w(self.hardware, self.perturbation.power_factor)

    def prefill_step(self, cap_w: float, prompt_tokens: int, locked_clock_mhz: float | None = None) -> PrefillStep:
        """Duration, per-GPU power, demand and SM clock of prefilling ``prompt_tokens`` under ``cap_w``.

        :func:`pals_daemon.sim.prior.prefill_step` (the physics prior) with this truth's perturbation; under a
        locked clock below the cap's, prefill runs at the lock and draws what the DVFS relation gives there.
        """
        pert = self.perturbation
        return prefill_step(
            self.spec,
            self.hardware,
            self.num_gpus,
            self.physics,
            cap_w,
            prompt_tokens,
            throughput_factor=pert.throughput_factor,
            power_factor=pert.power_factor,
            locked_clock_mhz=locked_clock_mhz,
        )

    def prefill_time_s(self, cap_w: float, prompt_tokens: int) -> float:
        """Seconds to prefill ``prompt_tokens`` under ``cap_w`` per GPU (see :meth:`prefill_step`)."""
        return self.prefill_step(cap_w, prompt_tokens).time_s

    # ---- internals --------------------------------------------------------------------------------------

    def _clock_mhz(self, cap_w: float, power_w: float, demand_w: float) -> float:
        """SM clock for clock-bound work: full unless the cap holds power below demand, then by DVFS."""
        return clock_mhz_under_cap(self.hardware, self.physics, cap_w, power_w, demand_w)

    def _clamp_cap(self, cap_w: float) -> float:
        """``cap_w`` held within the tabulated cap range."""
        return min(max(float(cap_w), self._cap_lo), float(self._cap_grid[-1]))

    def _physics_at(self, cap_w: float, batch: int) -> tuple[float, float, float]:
        """Unperturbed physics (step time s, power W, clock ratio) at an integer-W cap and integer batch."""
        t_row, p_row, f_row = self._physics_row(batch, perturbed=False)
        k = int(round(self._clamp_cap(cap_w) - self._cap_lo))
        return t_row[k], p_row[k], f_row[k]

    def _physics_row(self, batch: int, *, perturbed: bool = True) -> tuple[array[float], array[float], array[float]]:
        """Tabulated (step time, power, clock ratio) over the cap grid at ``batch`` (perturbation included)."""
        key = batch if perturbed else -batch
        row = self._rows.get(key)
        if row is None:
            ph = self.physics
            assert ph is not None
            pf, tf = (self.perturbation.power_factor, self.perturbation.throughput_factor) if perturbed else (1, 1)
            t_mem, t_clk = ph.times_s(float(batch))
            f = ph.clock_for_cap(t_mem, t_clk, self._cap_grid / pf)
            t = ph.busy_time_s(t_mem, t_clk, f) / tf
            p = ph.busy_power_w(t_mem, t_clk, f) * pf
            row = (array("d", t.tolist()), array("d", p.tolist()), array("d", f.tolist()))
            self._rows[key] = row
        return row

    def _physics_interp(self, cap_w: float, batch: float) -> tuple[float, float, float]:
        """Physics (step time s, power W, clock ratio) at any cap and batch: linear between table entries."""
        x = self._clamp_cap(cap_w) - self._cap_lo
        k = min(int(x), len(self._cap_grid) - 2)
        wx = x - k
        b0 = int(batch)
        wb = batch - b0
        out = []
        for idx in range(3):
            row = self._physics_row(b0)[idx]
            v = row[k] * (1 - wx) + row[k + 1] * wx if wx else row[k]
            if wb:
                row1 = self._physics_row(b0 + 1)[idx]
                v1 = row1[k] * (1 - wx) + row1[k + 1] * wx if wx else row1[k]
                v = v * (1 - wb) + v1 * wb
            out.append(v)
        return out[0], out[1], out[2]

    def _interp(self, grid: list[list[float]], cap_w: float, batch: float) -> float:
        """Bilinear in (cap, log2 batch) over the measured grid, clamped at its edges."""
        i, wx = _bracket(self.caps_w, float(cap_w))
        j, wy = _bracket(self._log_batches, math.log2(max(1.0, float(batch))))
        i1 = min(i + 1, len(self.caps_w) - 1)
        j1 = min(j + 1, len(self.batches) - 1)
        return (
            grid[i][j] * (1 - wx) * (1 - wy)
            + grid[i1][j] * wx * (1 - wy)
            + grid[i][j1] * (1 - wx) * wy
            + grid[i1][j1] * wx * wy
        )


def _bracket(xs: Sequence[float], x: float) -> tuple[int, float]:
    """Index i and weight w with x = xs[i] * (1 - w) + xs[i + 1] * w, clamped to the ends."""
    if x <= xs[0]:
        return 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 1, 0.0
    i = bisect_right(xs, x) - 1
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


def with_perturbation(truth: ModelTruth, throughput_factor: float = 1.0, power_factor: float = 1.0) -> ModelTruth:
    """Shorthand for ``truth.with_perturbation(Perturbation(throughput_factor, power_factor))``."""
    return truth.with_perturbation(Perturbation(throughput_factor, power_factor))
