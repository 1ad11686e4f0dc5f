"""Simulated ground truth of one served model: step time, power and clock as functions of cap and batch.

Decode comes from the measured 4x A100-SXM4 (TP4) power-cap x batch sweep in
data/a100_moe_tp4_power_cap_sweep.csv (source: mrhankendi/AI_LLM ``moe_summary_tp4.xlsx``, the first PALS
author's repository; see data/README.md). Prefill is modelled from FLOPs and scaled with the SM clock.
"""

from __future__ import annotations

import csv
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pals_daemon.sim.hardware import A100_SXM4, HardwareProfile

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DEFAULT_SWEEP_CSV = DATA_DIR / "a100_moe_tp4_power_cap_sweep.csv"

# Modelled: model FLOPs utilisation of prefill on A100 with vLLM. Not measured here; 0.35 is a typical
# order for MoE prefill (sparse expert GEMMs run far below the dense peak).
PREFILL_MFU = 0.35
# Modelled: prefill is compute-bound and, uncapped, draws close to the board limit; we take 90% of the
# hardware's maximum limit (360 W on A100-SXM4).
PREFILL_DEMAND_FRACTION = 0.9
# Modelled: SM clock vs. power. Dynamic power grows faster than linearly with the clock (voltage rises
# with it), so clock/max = (dynamic power share)^0.75. The exponent is chosen so that the modelled clock ratio
# stays at or below the measured decode-throughput ratio (memory-bound decode slows less than the clock):
# mixtral-8x7b-instruct batch 64 in the sweep CSV keeps 24% of its 400 W throughput at 100 W and 71% at
# 200 W, where this model gives clock ratios of 21% and 54%.
CLOCK_POWER_EXPONENT = 0.75
# Modelled: the lowest clock ratio we let a cap force (real GPUs bottom out at a minimum clock).
MIN_CLOCK_RATIO = 0.1
# Modelled: vLLM's default gpu_memory_utilization (0.9) of each GPU, minus a per-GPU reserve for
# activations and CUDA graphs (4 GiB), is available for weights plus KV cache.
_GPU_MEMORY_UTILIZATION = 0.9
_ACTIVATION_RESERVE_BYTES = 4 * 2**30
_BYTES_PER_PARAM_BF16 = 2


@dataclass(frozen=True)
class ModelSpec:
    """Facts about one model used for prefill FLOPs and the KV-cache size."""

    name: str  # as in the sweep CSV's ``model`` column
    hf_id: str
    active_params: float  # parameters used per token
    total_params: float  # all parameters (weights held in memory)
    # K and V bytes per token over all layers in bf16: 2 x layers x kv_heads x head_dim x 2 bytes.
    kv_bytes_per_token: int


# Parameter counts from each model card (Hugging Face); layer and head counts from each config.json.
_SPECS: tuple[ModelSpec, ...] = (
    # mistralai/Mixtral-8x7B-Instruct-v0.1: 46.7B total, 12.9B active; 32 layers, 8 KV heads x 128.
    ModelSpec("mixtral-8x7b-instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1", 12.9e9, 46.7e9, 2 * 32 * 8 * 128 * 2),
    # deepseek-ai/deepseek-moe-16b-base: 16.4B total, 2.8B active; 28 layers, 16 KV heads x 128 (MHA).
    ModelSpec("deepseek-moe-16b-base", "deepseek-ai/deepseek-moe-16b-base", 2.8e9, 16.4e9, 2 * 28 * 16 * 128 * 2),
    # microsoft/Phi-3.5-MoE-instruct: 41.9B total, 6.6B active; 32 layers, 8 KV heads x 128.
    ModelSpec("phi-3.5-moe-instruct", "microsoft/Phi-3.5-MoE-instruct", 6.6e9, 41.9e9, 2 * 32 * 8 * 128 * 2),
    # allenai/OLMoE-1B-7B-0924: 6.9B total, 1.3B active; 16 layers, 16 KV heads x 128.
    ModelSpec("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", 1.3e9, 6.9e9, 2 * 16 * 16 * 128 * 2),
    # Qwen/Qwen1.5-MoE-A2.7B: 14.3B total, 2.7B active; 24 layers, 16 KV heads x 128.
    ModelSpec("qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B", 2.7e9, 14.3e9, 2 * 24 * 16 * 128 * 2),
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
    """Multiplicative factors applied to the truth so it differs from a controller's profile."""

    throughput_factor: float = 1.0
    power_factor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("throughput_factor", "power_factor"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v!r}")


class DecodeStep(NamedTuple):
    """One decode step: its duration, per-GPU power, per-GPU uncapped demand, and SM clock."""

    step_time_s: float
    power_w_per_gpu: float
    demand_power_w: float
    sm_clock_mhz: float


class PrefillStep(NamedTuple):
    """Prefilling some prompt tokens: duration, per-GPU power, per-GPU uncapped demand, and SM clock."""

    time_s: float
    power_w_per_gpu: float
    demand_power_w: float
    sm_clock_mhz: float


class ModelTruth:
    """How one model on its GPUs responds to power cap and batch (the simulated ground truth)."""

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
        self.caps_w: tuple[float, ...] = tuple(float(c) for c in caps_w)
        self.batches: tuple[int, ...] = tuple(int(b) for b in batches)
        self._log_batches = [math.log2(b) for b in self.batches]
        self._thr = [list(map(float, row)) for row in thr]
        self._pw = [list(map(float, row)) for row in pw]
        self.perturbation = perturbation or Perturbation()
        self.kv_capacity_tokens = (
            modelled_kv_capacity_tokens(spec, num_gpus, hardware) if kv_capacity_tokens is None else kv_capacity_tokens
        )
        if self.kv_capacity_tokens < 1:
            raise ValueError(f"kv_capacity_tokens must be >= 1, got {self.kv_capacity_tokens!r}")
        self._decode_cache: dict[tuple[float, int], DecodeStep] = {}

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
        )

    # ---- decode -----------------------------------------------------------------------------------------

    def throughput_tokens_per_s(self, cap_w: float, batch: float) -> float:
        """Output tokens/s of the engine at ``batch`` running requests under ``cap_w`` per GPU."""
        return self._interp(self._thr, cap_w, batch) * self.perturbation.throughput_factor

    def power_w(self, cap_w: float, batch: float) -> float:
        """Average per-GPU power (W) while decoding ``batch`` requests under ``cap_w`` (not clamped to it)."""
        return self._interp(self._pw, cap_w, batch) * self.perturbation.power_factor

    def decode_step(self, cap_w: float, batch: int) -> DecodeStep:
        """Duration, per-GPU power, per-GPU demand at the top cap, and SM clock of one decode step."""
        key = (float(cap_w), int(batch))
        hit = self._decode_cache.get(key)
        if hit is not None:
            return hit
        b = max(1, int(batch))
        thr = self.throughput_tokens_per_s(cap_w, b)
        power = self.power_w(cap_w, b)
        demand = self.power_w(self.caps_w[-1], b)
        step = DecodeStep(b / thr, power, demand, self._clock_mhz(cap_w, min(power, cap_w), demand))
        if len(self._decode_cache) < 100_000:
            self._decode_cache[key] = step
        return step

    # ---- prefill ----------------------------------------------------------------------------------------

    def prefill_demand_power_w(self) -> float:
        """Modelled per-GPU power prefill would draw uncapped."""
        return PREFILL_DEMAND_FRACTION * self.hardware.max_limit_w * self.perturbation.power_factor

    def prefill_step(self, cap_w: float, prompt_tokens: int) -> PrefillStep:
        """Duration, per-GPU power, demand and SM clock of prefilling ``prompt_tokens`` under ``cap_w``.

        Prefill is compute-bound and slows roughly with the SM clock (GreenLLM, arXiv 2508.16449; Maliakel
        et al., arXiv 2501.08219). At full clock its time is 2 x active params x tokens /
        (num_gpus x peak bf16 FLOP/s x MFU); attention's quadratic term is ignored (modelled).
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
        """Modelled SM clock: full unless the cap holds power below demand, then by the dynamic-power ratio."""
        max_clock = float(self.hardware.max_sm_clock_mhz)
        if demand_w <= cap_w:
            return max_clock
        idle = self.hardware.idle_power_w
        share = (power_w - idle) / (demand_w - idle) if demand_w > idle else 1.0
        share = min(1.0, max(0.0, share))
        return max_clock * max(MIN_CLOCK_RATIO, share**CLOCK_POWER_EXPONENT)

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
    """Modelled KV-cache capacity (tokens): usable GPU memory minus bf16 weights, over KV bytes per token."""
    usable = num_gpus * (hardware.memory_gb * 2**30 * _GPU_MEMORY_UTILIZATION - _ACTIVATION_RESERVE_BYTES)
    free = usable - spec.total_params * _BYTES_PER_PARAM_BF16
    return max(1, int(free // spec.kv_bytes_per_token))


def load_a100_truth(
    model_name: str,
    csv_path: str | Path = DEFAULT_SWEEP_CSV,
    *,
    perturbation: Perturbation | None = None,
    kv_capacity_tokens: int | None = None,
    monotone: bool = False,
) -> ModelTruth:
    """The truth of ``model_name`` (CSV name or alias) from the 4x A100-SXM4 TP4 power-cap sweep.

    ``monotone=True`` replaces each value by the running maximum along cap (and throughput along batch) so
    that more power never gives less; the default keeps the measurements exactly (they have a few
    non-monotone points within measurement noise, e.g. qwen1.5-moe-a2.7b batch 64 at 350 vs. 400 W).
    """
    name = canonical_model_name(model_name)
    spec = _SPEC_BY_NAME[name]
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
    if monotone:
        thr = np.maximum.accumulate(np.maximum.accumulate(thr, axis=0), axis=1)
        pw = np.maximum.accumulate(pw, axis=0)
    return ModelTruth(
        spec,
        caps,
        batches,
        thr,
        pw,
        num_gpus=num_gpus.pop(),
        hardware=A100_SXM4,
        kv_capacity_tokens=kv_capacity_tokens,
        perturbation=perturbation,
    )


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
