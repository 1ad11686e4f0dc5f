"""Simulated ground truth of one served model: step time, power and clock as functions of cap and batch.

Decode comes from a physical model (:mod:`pals_daemon.sim.physics`: DVFS under the cap, memory-bound vs.
clock-bound time, MoE expert activation) fitted per model to measured sweeps:

- 4x A100-SXM4 (TP4) power-cap x batch sweep, data/a100_moe_tp4_power_cap_sweep.csv (source: mrhankendi/AI_LLM
  ``moe_summary_tp4.xlsx``, the first PALS author's repository; see data/README.md), via :func:`load_a100_truth`;
- ML.ENERGY Benchmark v3 H100 batch sweeps at 700 W (median inter-token latency and power per GPU),
  mlenergy_v3_vllm_batch_sweep.csv (ml-energy/leaderboard, Apache-2.0), via :func:`load_h100_truth`.

The physics leaves residuals against the measurements (A100: a few percent on average, up to about 20% at single
points, see bench/sim_calibration.py). A residual-correction table (log of measured / modelled at each measured
point, interpolated bilinearly in (cap, log2 batch) and held at the edges) makes the truth reproduce every
measured point exactly; between points the physics sets the shape. Prefill is modelled from FLOPs and slows with
the SM clock the same DVFS model gives.

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

import csv
import math
from array import array
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pals_daemon.sim.hardware import A100_SXM4, H100_SXM5, HardwareProfile
from pals_daemon.sim.physics import DecodePhysics, fit_decode_physics

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DEFAULT_SWEEP_CSV = DATA_DIR / "a100_moe_tp4_power_cap_sweep.csv"
_MLENERGY_NAME = "mlenergy_v3_vllm_batch_sweep.csv"
_SHARED_CALIBRATION_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "calibration"

# Modelled: model FLOPs utilisation of prefill with vLLM. Not measured here; 0.35 is a typical order for MoE
# prefill (sparse expert GEMMs run far below the dense peak).
PREFILL_MFU = 0.35
# Modelled: prefill is compute-bound and, uncapped, draws close to the board limit; we take 90% of the
# hardware's maximum limit (360 W on A100-SXM4, 630 W on H100-SXM5).
PREFILL_DEMAND_FRACTION = 0.9
# Modelled: SM clock vs. power for prefill when the model has no fitted physics: clock / max =
# (dynamic power share) ** 0.75 (the pre-physics rule, kept for grid-only truths).
CLOCK_POWER_EXPONENT = 0.75
# Modelled: the lowest clock ratio we let a cap force (real GPUs bottom out at a minimum clock).
MIN_CLOCK_RATIO = 0.1
# Modelled: vLLM's default gpu_memory_utilization (0.9) of each GPU, minus a per-GPU reserve for
# activations and CUDA graphs (4 GiB), is available for weights plus KV cache.
_GPU_MEMORY_UTILIZATION = 0.9
_ACTIVATION_RESERVE_BYTES = 4 * 2**30
_BYTES_PER_PARAM_BF16 = 2

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
class ModelSpec:
    """Facts about one model used for prefill FLOPs, the KV-cache size and expert activation."""

    name: str  # as in the sweep CSV's ``model`` column (A100) or the Hugging Face id (H100)
    hf_id: str
    active_params: float  # parameters used per token
    total_params: float  # all parameters (weights held in memory)
    # K and V bytes per token over all layers in bf16: 2 x layers x kv_heads x head_dim x 2 bytes.
    kv_bytes_per_token: int
    num_experts: int = 0  # routed experts per MoE layer (config.json)
    top_k: int = 0  # routed experts per token (config.json)
    bytes_per_param: float = _BYTES_PER_PARAM_BF16  # weight storage (bf16 2, fp8 1, mxfp4 about 0.55)


# Parameter counts from each model card (Hugging Face); layer, head and expert counts from each config.json.
_SPECS: tuple[ModelSpec, ...] = (
    # mistralai/Mixtral-8x7B-Instruct-v0.1: 46.7B total, 12.9B active; 32 layers, 8 KV heads x 128; 8 experts, top-2.
    ModelSpec(
        "mixtral-8x7b-instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1", 12.9e9, 46.7e9, 2 * 32 * 8 * 128 * 2, 8, 2
    ),
    # deepseek-ai/deepseek-moe-16b-base: 16.4B total, 2.8B active; 28 layers, 16 KV heads x 128 (MHA);
    # 64 routed experts, top-6 (plus 2 shared).
    ModelSpec(
        "deepseek-moe-16b-base", "deepseek-ai/deepseek-moe-16b-base", 2.8e9, 16.4e9, 2 * 28 * 16 * 128 * 2, 64, 6
    ),
    # microsoft/Phi-3.5-MoE-instruct: 41.9B total, 6.6B active; 32 layers, 8 KV heads x 128; 16 experts, top-2.
    ModelSpec("phi-3.5-moe-instruct", "microsoft/Phi-3.5-MoE-instruct", 6.6e9, 41.9e9, 2 * 32 * 8 * 128 * 2, 16, 2),
    # allenai/OLMoE-1B-7B-0924: 6.9B total, 1.3B active; 16 layers, 16 KV heads x 128; 64 experts, top-8.
    ModelSpec("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", 1.3e9, 6.9e9, 2 * 16 * 16 * 128 * 2, 64, 8),
    # Qwen/Qwen1.5-MoE-A2.7B: 14.3B total, 2.7B active; 24 layers, 16 KV heads x 128; 60 routed experts,
    # top-4 (plus 4 shared).
    ModelSpec("qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B", 2.7e9, 14.3e9, 2 * 24 * 16 * 128 * 2, 60, 4),
)
_SPEC_BY_NAME = {s.name: s for s in _SPECS}
# Case-insensitive aliases (Hugging Face ids, with or without the org, and a few short names).
_ALIASES: dict[str, str] = {}
for _s in _SPECS:
    _ALIASES[_s.name] = _s.name
    _ALIASES[_s.hf_id.lower()] = _s.name
    _ALIASES[_s.hf_id.split("/", 1)[1].lower()] = _s.name
del _s
_ALIASES.update(
    {
        "mixtral-8x7b": "mixtral-8x7b-instruct",
        "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b-instruct",
        "deepseek-moe-16b": "deepseek-moe-16b-base",
        "deepseek-ai/deepseek-moe-16b-chat": "deepseek-moe-16b-base",
        "phi-3.5-moe": "phi-3.5-moe-instruct",
        "allenai/olmoe-1b-7b-0924-instruct": "olmoe-1b-7b",
        "qwen/qwen1.5-moe-a2.7b-chat": "qwen1.5-moe-a2.7b",
    }
)

# H100 MoE architectures (config.json of each Hugging Face repo): name prefix -> (layers, KV heads, head dim,
# routed experts, top-k). Parameter counts come from the ML.ENERGY CSV's total_params_b / active_params_b.
_H100_ARCH: dict[str, tuple[int, int, int, int, int]] = {
    "Qwen/Qwen3-235B-A22B": (94, 4, 128, 128, 8),
    "Qwen/Qwen3-30B-A3B": (48, 4, 128, 128, 8),
    "Qwen/Qwen3-Coder-30B-A3B": (48, 4, 128, 128, 8),
    "meta-llama/Llama-4-Maverick-17B-128E": (48, 8, 128, 128, 1),
    "meta-llama/Llama-4-Scout-17B-16E": (48, 8, 128, 16, 1),
    "openai/gpt-oss-120b": (36, 8, 64, 128, 4),
    "openai/gpt-oss-20b": (24, 8, 64, 32, 4),
}
# Weight bytes per parameter by the CSV's precision column; mxfp4 (gpt-oss): 4.25-bit expert weights plus bf16
# attention, about 0.55 B/param on average (modelled from the checkpoint sizes on the model cards).
_BYTES_PER_PARAM = {"bfloat16": 2.0, "fp8": 1.0, "mxfp4": 0.55}
# The ML.ENERGY tasks that are text-only (the image/video tasks add vision encoders we do not model).
_H100_TEXT_TASKS = ("lm-arena-chat", "gpqa", "sourcegraph-fim")


def known_models() -> list[str]:
    """Model names (as in the sweep CSV) that :func:`load_a100_truth` accepts."""
    return [s.name for s in _SPECS]


def canonical_model_name(name: str) -> str:
    """The sweep-CSV name for ``name`` or one of its aliases (case-insensitive); ValueError otherwise."""
    key = name.strip().lower()
    try:
        return _ALIASES[key]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(known_models())}") from None


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


class PrefillStep(NamedTuple):
    """Prefilling some prompt tokens: duration, per-GPU power, per-GPU uncapped demand, and SM clock."""

    time_s: float
    power_w_per_gpu: float
    demand_power_w: float
    sm_clock_mhz: float


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
        self._skew_cache: dict[tuple[tuple[float, ...], int, tuple[float, ...]], SkewedDecodeStep] = {}
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

    def decode_step(self, cap_w: float, batch: int) -> DecodeStep:
        """Duration, per-GPU power, per-GPU demand at the top cap, and SM clock of one decode step."""
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

    def decode_step_skewed(
        self, cap_w_per_gpu: Sequence[float], batch: int, expert_load_share: Sequence[float]
    ) -> SkewedDecodeStep:
        """One decode step with expert parallelism when GPU i receives ``expert_load_share[i]`` of the routing.

        The GPU hosting the hottest experts is the straggler: the step lasts as long as the slowest GPU, the
        others finish early and wait at idle power, so a lower cap on a lightly loaded GPU saves energy without
        lengthening the step. Shares are normalised to sum to 1; uniform shares with equal caps give
        :meth:`decode_step` (its step time, power and clock on every GPU). The residual correction of the
        measured sweep (measured under uniform routing) is applied at each GPU's cap.
        """
        ph = self.physics
        if ph is None:
            raise ValueError(f"{self.model}: a grid-only truth has no physics for routing skew")
        caps = [float(c) for c in cap_w_per_gpu]
        shares = [float(s) for s in expert_load_share]
        key = (tuple(caps), int(batch), tuple(shares))
        hit = self._skew_cache.get(key)
        if hit is not None:
            return hit
        if len(caps) != self.num_gpus or len(shares) != self.num_gpus:
            raise ValueError(f"need one cap and one share per GPU ({self.num_gpus}), got {len(caps)} and {len(shares)}")
        b = max(1, int(batch))
        pert = self.perturbation
        clamped = [self._clamp_cap(c) for c in caps]
        busy, p_busy, f = ph.per_gpu(b, [c / pert.power_factor for c in clamped], shares)
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

    def prefill_demand_power_w(self) -> float:
        """Modelled per-GPU power prefill would draw uncapped."""
        return PREFILL_DEMAND_FRACTION * self.hardware.max_limit_w * self.perturbation.power_factor

    def prefill_step(self, cap_w: float, prompt_tokens: int) -> PrefillStep:
        """Duration, per-GPU power, demand and SM clock of prefilling ``prompt_tokens`` under ``cap_w``.

        Prefill is compute-bound and slows roughly with the SM clock (GreenLLM, arXiv 2508.16449; Maliakel
        et al., arXiv 2501.08219). At full clock its time is 2 x active params x tokens /
        (num_gpus x peak bf16 FLOP/s x MFU); attention's quadratic term is ignored (modelled). Under a cap
        the clock falls until the power, idle + (demand - idle) x clock ** alpha with the model's fitted
        alpha, meets the cap.
        """
        demand = self.prefill_demand_power_w()
        power = min(cap_w, demand)  # modelled: prefill runs at the cap when the cap binds
        clock = self._clock_mhz(cap_w, power, demand)
        flops = 2.0 * self.spec.active_params * max(0, prompt_tokens)
        rate = self.num_gpus * self.hardware.peak_bf16_tflop_s * 1e12 * PREFILL_MFU
        t_full_clock = flops / rate / self.perturbation.throughput_factor
        return PrefillStep(t_full_clock * self.hardware.max_sm_clock_mhz / clock, power, demand, clock)

    def prefill_time_s(self, cap_w: float, prompt_tokens: int) -> float:
        """Seconds to prefill ``prompt_tokens`` under ``cap_w`` per GPU (see :meth:`prefill_step`)."""
        return self.prefill_step(cap_w, prompt_tokens).time_s

    # ---- internals --------------------------------------------------------------------------------------

    def _clock_mhz(self, cap_w: float, power_w: float, demand_w: float) -> float:
        """SM clock for clock-bound work: full unless the cap holds power below demand, then by DVFS."""
        max_clock = float(self.hardware.max_sm_clock_mhz)
        if demand_w <= cap_w:
            return max_clock
        idle = self.hardware.idle_power_w
        share = (power_w - idle) / (demand_w - idle) if demand_w > idle else 1.0
        share = min(1.0, max(0.0, share))
        if self.physics is not None:
            # All-compute work draws idle + dynamic x f ** alpha (see physics): invert for f.
            return max_clock * max(self.physics.f_min, share ** (1.0 / self.physics.alpha))
        return max_clock * max(MIN_CLOCK_RATIO, share**CLOCK_POWER_EXPONENT)

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


def modelled_kv_capacity_tokens(spec: ModelSpec, num_gpus: int, hardware: HardwareProfile) -> int:
    """Modelled KV-cache capacity (tokens): usable GPU memory minus the weights, over KV bytes per token."""
    usable = num_gpus * (hardware.memory_gb * 2**30 * _GPU_MEMORY_UTILIZATION - _ACTIVATION_RESERVE_BYTES)
    free = usable - spec.total_params * spec.bytes_per_param
    return max(1, int(free // spec.kv_bytes_per_token))


# ---- fitted physics -------------------------------------------------------------------------------------

# MODELLED: per-model decode physics fitted by ``python bench/sim_calibration.py --refit`` (fit_a100_physics) to
# the A100 sweep; idle power (60 W), expert counts and top-k are cited (hardware profile, config.json).
# BEGIN FITTED A100
_A100_PHYSICS: dict[str, dict[str, float]] = {
    "mixtral-8x7b-instruct": {
        "t_fixed_s": 0.00352848,
        "t_expert_s": 0.0154612,
        "t_token_mem_s": 0.000990943,
        "t_clk0_s": 0.000571654,
        "t_clk_token_s": 0.00102744,
        "p_mem_w": 141.153,
        "p_sm_w": 510,
        "alpha": 1.68606,
        "f_knee": 0.433264,
        "routing_factor": 1.38765,
        "f_min": 0.15,
    },
    "deepseek-moe-16b-base": {
        "t_fixed_s": 0.00354295,
        "t_expert_s": 0.0136511,
        "t_token_mem_s": 0.000251184,
        "t_clk0_s": 0.000284178,
        "t_clk_token_s": 0.000278458,
        "p_mem_w": 77.8536,
        "p_sm_w": 509.967,
        "alpha": 1.38634,
        "f_knee": 0.262384,
        "routing_factor": 2.13629,
        "f_min": 0.15,
    },
    "phi-3.5-moe-instruct": {
        "t_fixed_s": 0.00163469,
        "t_expert_s": 0.0139358,
        "t_token_mem_s": 0.00066925,
        "t_clk0_s": 0.000573521,
        "t_clk_token_s": 0.000822237,
        "p_mem_w": 100.994,
        "p_sm_w": 509.997,
        "alpha": 1.48455,
        "f_knee": 0.325665,
        "routing_factor": 4.66031,
        "f_min": 0.15,
    },
    "olmoe-1b-7b": {
        "t_fixed_s": 0.00268407,
        "t_expert_s": 0.00827286,
        "t_token_mem_s": 0.000156422,
        "t_clk0_s": 9.9344e-05,
        "t_clk_token_s": 0.000181878,
        "p_mem_w": 67.3911,
        "p_sm_w": 445.088,
        "alpha": 1.37055,
        "f_knee": 0.188262,
        "routing_factor": 1.41213,
        "f_min": 0.15,
    },
    "qwen1.5-moe-a2.7b": {
        "t_fixed_s": 0.00127957,
        "t_expert_s": 0.00888108,
        "t_token_mem_s": 0.000286917,
        "t_clk0_s": 0.000202967,
        "t_clk_token_s": 0.000206375,
        "p_mem_w": 87.174,
        "p_sm_w": 509.998,
        "alpha": 1.39286,
        "f_knee": 0.294416,
        "routing_factor": 6.51735,
        "f_min": 0.15,
    },
}
# END FITTED A100

# MODELLED: H100 physics fitted by ``fit_h100_physics`` to the ML.ENERGY v3 batch sweeps at 700 W. The sweeps
# hold no cap dimension, so alpha (SM power vs. clock) and f_knee are transferred from the A100 fits (their
# median), and f_min is the lowest H100 clock ratio we allow (modelled).
# BEGIN FITTED H100
_H100_PHYSICS: dict[tuple[str, int], dict[str, float]] = {
    ("Qwen/Qwen3-235B-A22B-Instruct-2507", 8): {
        "t_fixed_s": 0.0113533,
        "t_expert_s": 0.0237688,
        "t_token_mem_s": 1.15457e-05,
        "t_clk0_s": 1.5809e-14,
        "t_clk_token_s": 7.98275e-05,
        "p_mem_w": 302.649,
        "p_sm_w": 773.049,
        "routing_factor": 0.803827,
    },
    ("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", 4): {
        "t_fixed_s": 0.0243305,
        "t_expert_s": 0.0137438,
        "t_token_mem_s": 3.92973e-15,
        "t_clk0_s": 0.00654447,
        "t_clk_token_s": 8.04227e-05,
        "p_mem_w": 343.003,
        "p_sm_w": 939.75,
        "routing_factor": 0.546961,
    },
    ("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", 8): {
        "t_fixed_s": 0.0231131,
        "t_expert_s": 0.00980677,
        "t_token_mem_s": 1.24804e-05,
        "t_clk0_s": 8.74772e-14,
        "t_clk_token_s": 7.36475e-05,
        "p_mem_w": 377.778,
        "p_sm_w": 514.843,
        "routing_factor": 0.249147,
    },
    ("Qwen/Qwen3-235B-A22B-Thinking-2507", 8): {
        "t_fixed_s": 0.0154653,
        "t_expert_s": 0.00153368,
        "t_token_mem_s": 1.12329e-05,
        "t_clk0_s": 5.04539e-14,
        "t_clk_token_s": 0.000509248,
        "p_mem_w": 230.098,
        "p_sm_w": 497.932,
        "routing_factor": 1.02581,
    },
    ("Qwen/Qwen3-235B-A22B-Thinking-2507-FP8", 4): {
        "t_fixed_s": 0.0216804,
        "t_expert_s": 0.011538,
        "t_token_mem_s": 7.24858e-15,
        "t_clk0_s": 1.28136e-11,
        "t_clk_token_s": 0.000315401,
        "p_mem_w": 432.348,
        "p_sm_w": 540.561,
        "routing_factor": 4.8669,
    },
    ("Qwen/Qwen3-235B-A22B-Thinking-2507-FP8", 8): {
        "t_fixed_s": 0.0222863,
        "t_expert_s": 0.0243991,
        "t_token_mem_s": 1.46889e-14,
        "t_clk0_s": 8.52223e-14,
        "t_clk_token_s": 2.31353e-05,
        "p_mem_w": 380.633,
        "p_sm_w": 939.75,
        "routing_factor": 0.243575,
    },
    ("Qwen/Qwen3-30B-A3B-Instruct-2507", 1): {
        "t_fixed_s": 0.00581633,
        "t_expert_s": 0.0134587,
        "t_token_mem_s": 3.2605e-07,
        "t_clk0_s": 1.30741e-14,
        "t_clk_token_s": 0.00014804,
        "p_mem_w": 318.095,
        "p_sm_w": 592.871,
        "routing_factor": 1.11871,
    },
    ("Qwen/Qwen3-30B-A3B-Instruct-2507", 2): {
        "t_fixed_s": 0.00759729,
        "t_expert_s": 0.0133338,
        "t_token_mem_s": 7.60896e-06,
        "t_clk0_s": 3.45985e-14,
        "t_clk_token_s": 4.78445e-05,
        "p_mem_w": 295.47,
        "p_sm_w": 607.532,
        "routing_factor": 0.28022,
    },
    ("Qwen/Qwen3-30B-A3B-Thinking-2507", 1): {
        "t_fixed_s": 0.00710198,
        "t_expert_s": 0.00465937,
        "t_token_mem_s": 0.000127365,
        "t_clk0_s": 0.000567422,
        "t_clk_token_s": 0.000331882,
        "p_mem_w": 311.839,
        "p_sm_w": 823.4,
        "routing_factor": 0.458823,
    },
    ("Qwen/Qwen3-30B-A3B-Thinking-2507", 2): {
        "t_fixed_s": 0.0066393,
        "t_expert_s": 0.0190106,
        "t_token_mem_s": 6.27016e-16,
        "t_clk0_s": 1.84926e-15,
        "t_clk_token_s": 4.69123e-05,
        "p_mem_w": 272.363,
        "p_sm_w": 939.75,
        "routing_factor": 0.269444,
    },
    ("Qwen/Qwen3-Coder-30B-A3B-Instruct", 1): {
        "t_fixed_s": 0.00550907,
        "t_expert_s": 0.0131858,
        "t_token_mem_s": 1.08182e-14,
        "t_clk0_s": 2.09915e-14,
        "t_clk_token_s": 0.000138601,
        "p_mem_w": 400.697,
        "p_sm_w": 882.406,
        "routing_factor": 1.131,
    },
    ("Qwen/Qwen3-Coder-30B-A3B-Instruct", 2): {
        "t_fixed_s": 0.00516511,
        "t_expert_s": 0.00701013,
        "t_token_mem_s": 4.16246e-05,
        "t_clk0_s": 2.6945e-14,
        "t_clk_token_s": 5.27527e-05,
        "p_mem_w": 366.216,
        "p_sm_w": 721.644,
        "routing_factor": 1.25746,
    },
    ("meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8", 8): {
        "t_fixed_s": 0.00952901,
        "t_expert_s": 0.00627191,
        "t_token_mem_s": 3.60023e-05,
        "t_clk0_s": 1.25076e-14,
        "t_clk_token_s": 5.22383e-05,
        "p_mem_w": 143.459,
        "p_sm_w": 785.475,
        "routing_factor": 3.71024,
    },
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct", 4): {
        "t_fixed_s": 0.0132023,
        "t_expert_s": 0.0172935,
        "t_token_mem_s": 5.49558e-06,
        "t_clk0_s": 7.845e-14,
        "t_clk_token_s": 8.16286e-05,
        "p_mem_w": 289.077,
        "p_sm_w": 555.526,
        "routing_factor": 1.71979,
    },
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct", 8): {
        "t_fixed_s": 0.0154988,
        "t_expert_s": 0.00582836,
        "t_token_mem_s": 2.4183e-05,
        "t_clk0_s": 1.95258e-15,
        "t_clk_token_s": 4.45011e-05,
        "p_mem_w": 209.804,
        "p_sm_w": 577.034,
        "routing_factor": 2.46585,
    },
    ("openai/gpt-oss-120b", 1): {
        "t_fixed_s": 0.00482064,
        "t_expert_s": 0.00827981,
        "t_token_mem_s": 1.80083e-10,
        "t_clk0_s": 2.10904e-14,
        "t_clk_token_s": 0.000167536,
        "p_mem_w": 417.784,
        "p_sm_w": 939.75,
        "routing_factor": 2.29659,
    },
    ("openai/gpt-oss-120b", 2): {
        "t_fixed_s": 0.000955821,
        "t_expert_s": 0.0120624,
        "t_token_mem_s": 3.28418e-05,
        "t_clk0_s": 0.00440949,
        "t_clk_token_s": 2.78068e-05,
        "p_mem_w": 626.5,
        "p_sm_w": 267.903,
        "routing_factor": 0.453457,
    },
    ("openai/gpt-oss-20b", 1): {
        "t_fixed_s": 0.0061167,
        "t_expert_s": 0.00285827,
        "t_token_mem_s": 1.48899e-05,
        "t_clk0_s": 3.01965e-14,
        "t_clk_token_s": 4.59173e-05,
        "p_mem_w": 405.043,
        "p_sm_w": 599.268,
        "routing_factor": 0.110075,
    },
}
# END FITTED H100
H100_ALPHA = float(np.median([v["alpha"] for v in _A100_PHYSICS.values()]))  # modelled: median of the A100 fits
H100_F_KNEE = float(np.median([v["f_knee"] for v in _A100_PHYSICS.values()]))  # modelled: median of the A100 fits
H100_F_MIN = 0.17  # modelled: about 345 of 1980 MHz


def load_a100_truth(
    model_name: str,
    csv_path: str | Path = DEFAULT_SWEEP_CSV,
    *,
    perturbation: Perturbation | None = None,
    kv_capacity_tokens: int | None = None,
    monotone: bool = False,
    physics: bool = True,
) -> ModelTruth:
    """The truth of ``model_name`` (CSV name or alias) from the 4x A100-SXM4 TP4 power-cap sweep.

    ``monotone=True`` replaces each value by the running maximum along cap (and throughput along batch) so
    that more power never gives less; the default keeps the measurements exactly (they have a few
    non-monotone points within measurement noise, e.g. qwen1.5-moe-a2.7b batch 64 at 350 vs. 400 W).
    ``physics=False`` gives the grid-only truth (bilinear interpolation of the measurements).
    """
    name = canonical_model_name(model_name)
    spec = _SPEC_BY_NAME[name]
    caps, batches, thr, pw, tp = read_a100_sweep(name, csv_path)
    if monotone:
        thr = np.maximum.accumulate(np.maximum.accumulate(thr, axis=0), axis=1)
        pw = np.maximum.accumulate(pw, axis=0)
    ph = a100_physics(name) if physics else None
    return ModelTruth(
        spec,
        caps,
        batches,
        thr,
        pw,
        num_gpus=tp,
        hardware=A100_SXM4,
        kv_capacity_tokens=kv_capacity_tokens,
        perturbation=perturbation,
        physics=ph,
        source=f"{Path(csv_path).name} (A100-SXM4, TP{tp})",
    )


def read_a100_sweep(
    model_name: str, csv_path: str | Path = DEFAULT_SWEEP_CSV
) -> tuple[list[float], list[int], np.ndarray, np.ndarray, int]:
    """(caps, batches, throughput grid, per-GPU power grid, tp) of one model of the A100 sweep CSV."""
    name = canonical_model_name(model_name)
    points: dict[tuple[float, int], tuple[float, float]] = {}
    num_gpus: set[int] = set()
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"model", "tp", "cap_w", "batch", "avg_Tokens_per_s", "avg_gpu_power"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path}: missing columns {sorted(missing)}")
        for row_no, row in enumerate(reader, start=2):
            if row["model"].strip().lower() != name:
                continue
            try:
                key = (float(row["cap_w"]), int(row["batch"]))
                points[key] = (float(row["avg_Tokens_per_s"]), float(row["avg_gpu_power"]))
                num_gpus.add(int(row["tp"]))
            except ValueError as e:
                raise ValueError(f"{csv_path}:{row_no}: {e}") from None
    if not points:
        raise ValueError(f"{csv_path}: no rows for model {name!r}")
    if len(num_gpus) != 1:
        raise ValueError(f"{csv_path}: model {name!r} has rows with several tp values {sorted(num_gpus)}")
    caps = sorted({c for c, _ in points})
    batches = sorted({b for _, b in points})
    thr = np.full((len(caps), len(batches)), np.nan)
    pw = np.full_like(thr, np.nan)
    for (c, b), (t, p) in points.items():
        thr[caps.index(c), batches.index(b)] = t
        pw[caps.index(c), batches.index(b)] = p
    _fill_missing_along_caps(thr, caps, name)
    _fill_missing_along_caps(pw, caps, name)
    return caps, batches, thr, pw, num_gpus.pop()


def a100_physics(model_name: str) -> DecodePhysics | None:
    """The fitted A100 decode physics of ``model_name`` (None if it has no fitted constants)."""
    name = canonical_model_name(model_name)
    fitted = _A100_PHYSICS.get(name)
    if fitted is None:
        return None
    spec = _SPEC_BY_NAME[name]
    return DecodePhysics(idle_w=A100_SXM4.idle_power_w, num_experts=spec.num_experts, top_k=spec.top_k, **fitted)


def fit_a100_physics(model_name: str, csv_path: str | Path = DEFAULT_SWEEP_CSV) -> DecodePhysics:
    """Fit the decode physics of one A100 model to its sweep (multi-start Levenberg-Marquardt; seconds)."""
    name = canonical_model_name(model_name)
    spec = _SPEC_BY_NAME[name]
    caps, batches, thr, pw, _ = read_a100_sweep(name, csv_path)
    cc, bb = np.meshgrid(np.array(caps), np.array(batches, dtype=float), indexing="ij")
    c, b, t, p = cc.ravel(), bb.ravel(), (bb / thr).ravel(), pw.ravel()
    top = np.argmax(caps)
    t1, tn = t[(c == caps[top]) & (b == b.min())][0], t[(c == caps[top]) & (b == b.max())][0]
    slope = max(tn - t1, 1e-6) / max(1.0, b.max() - b.min())
    base = DecodePhysics(
        A100_SXM4.idle_power_w, spec.num_experts, spec.top_k, 0.5 * t1, 0.2 * t1, 0.3 * slope, 0.2 * t1, 0.5 * slope,
        150.0, 300.0, 2.5, 0.4, 1.0, 0.15,
    )  # fmt: skip
    return _best_fit(base, b, c, t, p, _A100_STARTS, free=None, bounds=physics_bounds(A100_SXM4))


def physics_bounds(hw: HardwareProfile) -> dict[str, tuple[float, float]]:
    """Physically plausible ranges of the fitted physics (modelled).

    Memory-bound work draws at most the board's range above idle; clock-bound work at full clock at most 1.5x
    it (dense GEMMs exceed the default limit when uncapped); alpha between 1 (frequency only) and 4; the
    memory knee below 0.8 of the clock; the routing multiplier within 0.05-8.
    """
    span = hw.max_limit_w - hw.idle_power_w
    return {
        "p_mem_w": (1.0, span),
        "p_sm_w": (1.0, 1.5 * span),
        "alpha": (1.05, 4.0),
        "f_knee": (0.05, 0.8),
        "routing_factor": (0.05, 8.0),
    }


# Modelled: starting points of the multi-start fit (alpha, p_mem_w, f_knee, routing_factor).
_A100_STARTS = [
    {"alpha": a, "p_mem_w": pm, "f_knee": fk, "routing_factor": rf}
    for a in (1.6, 2.5)
    for pm in (80.0, 200.0)
    for fk in (0.3, 0.6)
    for rf in (1.0, 0.3)
]
_H100_FREE = (
    "t_fixed_s",
    "t_expert_s",
    "t_token_mem_s",
    "t_clk0_s",
    "t_clk_token_s",
    "p_mem_w",
    "p_sm_w",
    "routing_factor",
)
_H100_STARTS = [{"p_mem_w": pm, "routing_factor": rf} for pm in (100.0, 300.0) for rf in (1.0, 0.3)]


def _best_fit(
    base: DecodePhysics,
    b: np.ndarray,
    c: np.ndarray,
    t: np.ndarray,
    p: np.ndarray,
    starts: list[dict[str, float]],
    free: Sequence[str] | None,
    bounds: dict[str, tuple[float, float]],
) -> DecodePhysics:
    """The lowest-cost of the fits started from ``base`` updated with each of ``starts``."""
    best: tuple[float, DecodePhysics] | None = None
    for start in starts:
        init = replace(base, **start)
        if free is None:
            ph = fit_decode_physics(init, b, c, t, p, bounds=bounds)
        else:
            ph = fit_decode_physics(init, b, c, t, p, free=free, bounds=bounds)
        tm, pm, _ = ph.decode(b, c)
        cost = float(np.sum(np.log(tm / t) ** 2 + np.log(pm / p) ** 2))
        if best is None or cost < best[0]:
            best = (cost, ph)
    assert best is not None
    return best[1]


def _fill_missing_along_caps(grid: np.ndarray, caps: list[float], name: str) -> None:
    """Fill grid points the sweep lacks by linear interpolation along cap at the same batch (in place)."""
    for j in range(grid.shape[1]):
        col = grid[:, j]
        have = ~np.isnan(col)
        if not have.any():
            raise ValueError(f"model {name!r}: a batch column has no measurements")
        if not have.all():
            xs = np.array(caps)
            col[~have] = np.interp(xs[~have], xs[have], col[have])


def with_perturbation(truth: ModelTruth, throughput_factor: float = 1.0, power_factor: float = 1.0) -> ModelTruth:
    """Shorthand for ``truth.with_perturbation(Perturbation(throughput_factor, power_factor))``."""
    return truth.with_perturbation(Perturbation(throughput_factor, power_factor))


# ---- H100 (ML.ENERGY v3) --------------------------------------------------------------------------------


def default_mlenergy_csv() -> Path:
    """data/mlenergy_v3_vllm_batch_sweep.csv if present, else the shared calibration copy."""
    for cand in (
        DATA_DIR / _MLENERGY_NAME,
        DATA_DIR.parent / "shared" / "data" / "calibration" / _MLENERGY_NAME,
        _SHARED_CALIBRATION_DIR / _MLENERGY_NAME,
    ):
        if cand.exists():
            return cand
    return DATA_DIR / _MLENERGY_NAME


@dataclass(frozen=True)
class H100Sweep:
    """One (model, GPU count) batch sweep of ML.ENERGY v3 on H100 at 700 W, duplicates averaged."""

    model_id: str
    num_gpus: int
    task: str
    precision: str
    tp: int
    ep: int
    total_params: float
    active_params: float
    max_num_seqs: tuple[int, ...]
    batch: np.ndarray  # mean running batch (avg_batch_size)
    itl_s: np.ndarray  # median inter-token latency
    power_w_per_gpu: np.ndarray  # avg_power_watts / num_gpus
    throughput_tokens_per_s: np.ndarray  # output_throughput_tok_s


def _h100_arch(model_id: str) -> tuple[int, int, int, int, int] | None:
    """(layers, KV heads, head dim, experts, top-k) of an H100 MoE model id, or None if unknown."""
    for prefix, arch in _H100_ARCH.items():
        if model_id.startswith(prefix):
            return arch
    return None


def known_h100_models(csv_path: str | Path | None = None) -> list[tuple[str, int]]:
    """(model id, GPU count) of the text-task H100 MoE sweeps :func:`load_h100_truth` accepts."""
    path = Path(csv_path) if csv_path is not None else default_mlenergy_csv()
    out: set[tuple[str, int]] = set()
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["gpu_model"] == "H100" and r["task"] in _H100_TEXT_TASKS and _h100_arch(r["model_id"]):
                out.add((r["model_id"], int(r["num_gpus"])))
    return sorted(out)


def read_h100_sweep(model_id: str, num_gpus: int, csv_path: str | Path | None = None) -> H100Sweep:
    """The H100 sweep of ``model_id`` on ``num_gpus`` GPUs (text tasks), rows with equal max_num_seqs averaged."""
    path = Path(csv_path) if csv_path is not None else default_mlenergy_csv()
    groups: dict[int, list[dict[str, str]]] = defaultdict(list)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if (
                r["gpu_model"] == "H100"
                and r["model_id"].lower() == model_id.lower()
                and int(r["num_gpus"]) == num_gpus
                and r["task"] in _H100_TEXT_TASKS
            ):
                groups[int(r["max_num_seqs"])].append(r)
    if not groups:
        raise ValueError(f"{path}: no H100 text-task rows for {model_id!r} on {num_gpus} GPUs")
    first = next(iter(groups.values()))[0]
    seqs = tuple(sorted(groups))

    def mean(col: str, scale: float = 1.0) -> np.ndarray:
        return np.array([np.mean([float(r[col]) for r in groups[s]]) * scale for s in seqs])

    return H100Sweep(
        model_id=first["model_id"],
        num_gpus=num_gpus,
        task=first["task"],
        precision=first["precision"],
        tp=int(first["tp"]),
        ep=int(first["ep"]),
        total_params=float(first["total_params_b"]) * 1e9,
        active_params=float(first["active_params_b"]) * 1e9,
        max_num_seqs=seqs,
        batch=mean("avg_batch_size"),
        itl_s=mean("median_itl_ms", 1e-3),
        power_w_per_gpu=mean("avg_power_watts", 1.0 / num_gpus),
        throughput_tokens_per_s=mean("output_throughput_tok_s"),
    )


def _h100_spec(sweep: H100Sweep) -> ModelSpec:
    """ModelSpec of an H100 sweep's model (architecture from config.json, parameters from the CSV)."""
    arch = _h100_arch(sweep.model_id)
    if arch is None:
        raise ValueError(f"no architecture facts for {sweep.model_id!r}")
    layers, kv_heads, head_dim, experts, top_k = arch
    return ModelSpec(
        sweep.model_id,
        sweep.model_id,
        sweep.active_params,
        sweep.total_params,
        2 * layers * kv_heads * head_dim * 2,
        experts,
        top_k,
        _BYTES_PER_PARAM.get(sweep.precision, 2.0),
    )


def fit_h100_physics(model_id: str, num_gpus: int, csv_path: str | Path | None = None) -> DecodePhysics:
    """Fit the decode physics of one H100 sweep (power and median ITL vs. batch at 700 W)."""
    sw = read_h100_sweep(model_id, num_gpus, csv_path)
    spec = _h100_spec(sw)
    b, t, p = sw.batch, sw.itl_s, sw.power_w_per_gpu
    c = np.full_like(b, H100_SXM5.max_limit_w)
    slope = max(t[-1] - t[0], 1e-6) / max(1.0, b[-1] - b[0])
    base = DecodePhysics(
        H100_SXM5.idle_power_w, spec.num_experts, spec.top_k, 0.5 * t[0], 0.3 * t[0], 0.3 * slope, 0.1 * t[0],
        0.3 * slope, 200.0, 300.0, H100_ALPHA, H100_F_KNEE, 1.0, H100_F_MIN,
    )  # fmt: skip
    return _best_fit(base, b, c, t, p, _H100_STARTS, free=_H100_FREE, bounds=physics_bounds(H100_SXM5))


def h100_physics(model_id: str, num_gpus: int) -> DecodePhysics | None:
    """The fitted H100 decode physics of (``model_id``, ``num_gpus``), or None if it has no constants."""
    arch = _h100_arch(model_id)
    fitted = _H100_PHYSICS.get((model_id, num_gpus))
    if arch is None or fitted is None:
        return None
    return DecodePhysics(
        idle_w=H100_SXM5.idle_power_w,
        num_experts=arch[3],
        top_k=arch[4],
        alpha=H100_ALPHA,
        f_knee=H100_F_KNEE,
        f_min=H100_F_MIN,
        **fitted,
    )


def load_h100_truth(
    model_id: str,
    num_gpus: int,
    csv_path: str | Path | None = None,
    *,
    perturbation: Perturbation | None = None,
    kv_capacity_tokens: int | None = None,
    physics: bool = True,
) -> ModelTruth:
    """The truth of an H100 MoE model from ML.ENERGY v3 (decode step = median ITL, power per GPU, at 700 W).

    The measured batch dimension is at the 700 W default limit; the cap dimension is MODELLED by the physics
    (DVFS with alpha transferred from the A100 fits). Batches are the mean running batch sizes, rounded.
    """
    sw = read_h100_sweep(model_id, num_gpus, csv_path)
    spec = _h100_spec(sw)
    merged: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for b, t, p in zip(sw.batch, sw.itl_s, sw.power_w_per_gpu, strict=True):
        merged[max(1, round(float(b)))].append((float(t), float(p)))
    batches = sorted(merged)
    itl = np.array([np.mean([t for t, _ in merged[b]]) for b in batches])
    pw = np.array([np.mean([p for _, p in merged[b]]) for b in batches])
    thr = np.array(batches, dtype=float) / itl
    ph = h100_physics(sw.model_id, num_gpus) if physics else None
    return ModelTruth(
        spec,
        [H100_SXM5.max_limit_w],
        batches,
        thr[None, :],
        pw[None, :],
        num_gpus=num_gpus,
        hardware=H100_SXM5,
        kv_capacity_tokens=kv_capacity_tokens,
        perturbation=perturbation,
        physics=ph,
        source=f"ML.ENERGY v3 {sw.task} (H100, {num_gpus} GPUs, tp {sw.tp}, ep {sw.ep}, {sw.precision})",
    )


# ---- calibration ----------------------------------------------------------------------------------------


def _errors(model: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """MAPE and max absolute relative error (both in %) of ``model`` against ``measured``."""
    rel = np.abs(np.asarray(model, float) / np.asarray(measured, float) - 1.0) * 100.0
    return {"mape_pct": float(rel.mean()), "max_pct": float(rel.max())}


def a100_calibration(model_name: str, csv_path: str | Path = DEFAULT_SWEEP_CSV) -> dict[str, object]:
    """Errors of the physics alone and of the truth (physics + residual table) at every measured A100 point."""
    name = canonical_model_name(model_name)
    caps, batches, thr, pw, tp = read_a100_sweep(name, csv_path)
    ph = a100_physics(name)
    truth = load_a100_truth(name, csv_path)
    cc, bb = np.meshgrid(np.array(caps), np.array(batches, dtype=float), indexing="ij")
    out: dict[str, object] = {"model": name, "gpu": "A100-SXM4", "num_gpus": tp, "points": int(thr.size)}
    if ph is not None:
        t, p, _ = ph.decode(bb.ravel(), cc.ravel())
        out["physics_throughput"] = _errors(bb.ravel() / t, thr.ravel())
        out["physics_power"] = _errors(p, pw.ravel())
    tt = np.array([truth.throughput_tokens_per_s(c, b) for c, b in zip(cc.ravel(), bb.ravel(), strict=True)])
    tp_ = np.array([truth.power_w(c, b) for c, b in zip(cc.ravel(), bb.ravel(), strict=True)])
    out["truth_throughput"] = _errors(tt, thr.ravel())
    out["truth_power"] = _errors(tp_, pw.ravel())
    return out


def h100_calibration(model_id: str, num_gpus: int, csv_path: str | Path | None = None) -> dict[str, object]:
    """Errors of the physics alone (ITL, power, b / ITL vs. output throughput) and of the truth on one H100 sweep."""
    sw = read_h100_sweep(model_id, num_gpus, csv_path)
    ph = h100_physics(sw.model_id, num_gpus)
    out: dict[str, object] = {
        "model": sw.model_id,
        "gpu": "H100-SXM5",
        "num_gpus": num_gpus,
        "task": sw.task,
        "precision": sw.precision,
        "points": int(sw.batch.size),
    }
    if ph is not None:
        t, p, _ = ph.decode(sw.batch, np.full_like(sw.batch, H100_SXM5.max_limit_w))
        out["physics_itl"] = _errors(t, sw.itl_s)
        out["physics_power"] = _errors(p, sw.power_w_per_gpu)
        out["physics_throughput"] = _errors(sw.batch / t, sw.throughput_tokens_per_s)
    truth = load_h100_truth(sw.model_id, num_gpus, csv_path)
    bs = [max(1, round(float(b))) for b in sw.batch]
    cap = H100_SXM5.max_limit_w
    out["truth_itl"] = _errors([truth.decode_step(cap, b).step_time_s for b in bs], sw.itl_s)
    out["truth_power"] = _errors([truth.power_w(cap, b) for b in bs], sw.power_w_per_gpu)
    return out
