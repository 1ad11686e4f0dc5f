"""Throughput and power of an engine at any (power cap, batch), interpolated from a profile's grid."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pals_daemon.model.profile import Profile

FloatArray = NDArray[np.float64]


class PerfModel:
    """Predict engine throughput (tokens/s) and per-GPU power (W) from a profile's (cap, batch) grid.

    Physics the interpolation respects, and why:

    * Bilinear in (cap, log2 batch): batch sizes are measured on a roughly geometric ladder (1, 4, 8, 32,
      64 in the A100 sweep) and decode throughput grows roughly with log(batch) until the GPU saturates, so
      linear-in-log2 interpolation follows the measured curves far better than linear-in-batch.
    * Throughput is made non-decreasing in cap and in batch (cumulative maximum along each axis, before
      interpolating): a looser cap or a larger batch limit never slows decode; measured dips (e.g.
      qwen1.5-moe-a2.7b at 400 W vs 350 W, batch 64, in data/a100_moe_tp4_power_cap_sweep.csv) are noise.
      Bilinear interpolation of a grid that is monotone along both axes is monotone everywhere.
    * Per-GPU power is made non-decreasing in batch and in cap (more work or a looser cap never draws less)
      and never above the cap: the driver enforces the cap on its power average, so a measured overshoot
      (e.g. 101.7 W at a 100 W cap) is not sustainable draw.
    * Outside the measured range the model clamps (saturation): beyond the largest batch or cap the GPU
      is already saturated in the data, so extrapolating growth would over-promise throughput. Below the
      smallest measured cap the prediction is the smallest cap's throughput with power capped at the
      query; the controller never asks for caps below a GPU's minimum limit, which for the A100 profiles
      equals the smallest measured cap (100 W, data/gpu_power_limits.csv row A100-SXM4-80GB).
    """

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        caps = np.array(profile.caps_w, dtype=np.float64)
        batches = np.array(profile.batches, dtype=np.float64)
        cap_index = {c: i for i, c in enumerate(profile.caps_w)}
        batch_index = {b: j for j, b in enumerate(profile.batches)}
        tput = np.empty((caps.size, batches.size))
        power = np.empty((caps.size, batches.size))
        for p in profile.points:
            tput[cap_index[p.cap_w], batch_index[p.batch]] = p.tokens_per_s
            power[cap_index[p.cap_w], batch_index[p.batch]] = p.gpu_power_w
        # Monotone envelopes; the second pass keeps the first's monotonicity (see class docstring).
        tput = np.maximum.accumulate(np.maximum.accumulate(tput, axis=0), axis=1)
        power = np.maximum.accumulate(np.maximum.accumulate(power, axis=1), axis=0)
        # Clipping row i at cap_i keeps monotonicity in cap because the caps ascend.
        power = np.minimum(power, caps[:, None])
        self._caps_w = caps
        self._log2_batches = np.log2(batches)
        self.grid_tokens_per_s: FloatArray = tput
        self.grid_gpu_power_w: FloatArray = power

    @property
    def caps_w(self) -> FloatArray:
        """The measured caps (W per GPU), ascending."""
        return self._caps_w.copy()

    @property
    def batches(self) -> FloatArray:
        """The measured batch sizes, ascending."""
        return np.exp2(self._log2_batches)

    @property
    def min_cap_w(self) -> float:
        """The smallest measured cap."""
        return float(self._caps_w[0])

    @property
    def max_cap_w(self) -> float:
        """The largest measured cap (the model saturates above it)."""
        return float(self._caps_w[-1])

    @property
    def num_gpus(self) -> int:
        """GPUs the profile's engine ran on (throughput is for all of them, power is per GPU)."""
        return self.profile.num_gpus

    def _interp(self, grid: FloatArray, cap_w: FloatArray, batch: FloatArray) -> FloatArray:
        caps, lbs = self._caps_w, self._log2_batches
        x = np.clip(cap_w, caps[0], caps[-1])
        y = np.clip(np.log2(batch), lbs[0], lbs[-1])
        i = np.clip(np.searchsorted(caps, x, side="right") - 1, 0, caps.size - 2)
        j = np.clip(np.searchsorted(lbs, y, side="right") - 1, 0, lbs.size - 2)
        wx = (x - caps[i]) / (caps[i + 1] - caps[i])
        wy = (y - lbs[j]) / (lbs[j + 1] - lbs[j])
        return (
            grid[i, j] * (1 - wx) * (1 - wy)
            + grid[i + 1, j] * wx * (1 - wy)
            + grid[i, j + 1] * (1 - wx) * wy
            + grid[i + 1, j + 1] * wx * wy
        )

    def predict(self, cap_w: ArrayLike, batch: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """(engine tokens/s, per-GPU power W) at per-GPU cap ``cap_w`` and batch ``batch``; broadcasts."""
        cap = np.asarray(cap_w, dtype=np.float64)
        b = np.asarray(batch, dtype=np.float64)
        if np.any(~np.isfinite(cap)) or np.any(cap <= 0):
            raise ValueError("cap_w must be positive and finite")
        if np.any(~np.isfinite(b)) or np.any(b < 1):
            raise ValueError("batch must be >= 1")
        cap, b = np.broadcast_arrays(cap, b)
        tput = self._interp(self.grid_tokens_per_s, cap, b)
        power = np.minimum(self._interp(self.grid_gpu_power_w, cap, b), cap)
        return tput, power

    def tokens_per_s(self, cap_w: ArrayLike, batch: ArrayLike) -> FloatArray:
        """Predicted engine throughput (tokens/s)."""
        return self.predict(cap_w, batch)[0]

    def gpu_power_w(self, cap_w: ArrayLike, batch: ArrayLike) -> FloatArray:
        """Predicted per-GPU power (W)."""
        return self.predict(cap_w, batch)[1]

    def tokens_per_j(self, cap_w: ArrayLike, batch: ArrayLike) -> FloatArray:
        """Predicted tokens per joule of GPU energy (all ``num_gpus`` GPUs of the engine)."""
        tput, power = self.predict(cap_w, batch)
        return tput / (self.num_gpus * power)

    def tpot_ms(self, cap_w: ArrayLike, batch: ArrayLike) -> FloatArray:
        """Predicted decode step time (time per output token, ms) with ``batch`` sequences: 1000 b / T."""
        tput = self.tokens_per_s(cap_w, batch)
        return 1000.0 * np.asarray(batch, dtype=np.float64) / tput
