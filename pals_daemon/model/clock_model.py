"""Throughput and power under a locked SM clock, from a profile's clock dimension (``Profile.clock_points``).

A lock and a binding cap act on the same knob, the SM clock: the clock in force is the lower of the locked
clock and the clock the cap leaves, and throughput and power both rise with that clock. So at (cap, lock) the
engine runs at the slower of the two settings alone:

    tokens_per_s(cap, lock, b) = min(T(cap, b), T(top, b) x r_T(lock, b))
    gpu_power_w(cap, lock, b)  = min(P(cap, b), P(top, b) x r_P(lock, b))

with T, P the profile's cap-only model (:class:`~pals_daemon.model.perf_model.PerfModel`) and r_T, r_P the clock
points' ratios to the unlocked points at their cap, interpolated linearly in clock and log2 batch (held at the
edges; 1 at and above the top profiled clock).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pals_daemon.model.perf_model import PerfModel
from pals_daemon.model.profile import Profile

FloatArray = NDArray[np.float64]


class ClockResponse:
    """Ratios (throughput, power) of locked to unlocked operation per (clock, batch) of one profile."""

    def __init__(self, profile: Profile) -> None:
        if not profile.clock_points:
            raise ValueError(f"profile {profile.model!r} has no clock dimension")
        cap = max(p.cap_w for p in profile.clock_points)
        base = {p.batch: p for p in profile.points if p.cap_w == cap}
        self.clocks_mhz = np.array(sorted({p.clock_mhz for p in profile.clock_points if p.cap_w == cap}), dtype=float)
        self.batches = np.array(sorted(base), dtype=float)
        self._log_b = np.log2(self.batches)
        shape = (self.clocks_mhz.size, self.batches.size)
        self._r_t, self._r_p = np.ones(shape), np.ones(shape)
        ci = {c: i for i, c in enumerate(self.clocks_mhz)}
        bi = {b: j for j, b in enumerate(self.batches)}
        for p in profile.clock_points:
            if p.cap_w != cap:
                continue
            i, j = ci[float(p.clock_mhz or 0)], bi[float(p.batch)]
            ref = base[p.batch]
            self._r_t[i, j] = min(1.0, p.tokens_per_s / ref.tokens_per_s)
            self._r_p[i, j] = min(1.0, p.gpu_power_w / ref.gpu_power_w)

    @property
    def top_clock_mhz(self) -> float:
        """The highest profiled clock (the unlocked clock of the profiled GPU)."""
        return float(self.clocks_mhz[-1])

    def ratios(self, clock_mhz: ArrayLike, batch: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """(throughput ratio, power ratio) of locks at ``clock_mhz`` at ``batch`` (broadcast), both in (0, 1]."""
        c, b = np.broadcast_arrays(np.asarray(clock_mhz, dtype=float), np.asarray(batch, dtype=float))
        logb = np.log2(np.maximum(b, 1.0))
        cs = self.clocks_mhz
        out = []
        for table in (self._r_t, self._r_p):
            # Per profiled clock, the ratio at each batch; then linear in the clock (1 above the top clock).
            rows = np.stack([np.interp(logb, self._log_b, table[i]) for i in range(cs.size)])
            if cs.size == 1:
                r = rows[0]
            else:
                i = np.clip(np.searchsorted(cs, c) - 1, 0, cs.size - 2)
                w = np.clip((c - cs[i]) / (cs[i + 1] - cs[i]), 0.0, 1.0)
                lo = np.take_along_axis(rows, i[None, ...], axis=0)[0]
                hi = np.take_along_axis(rows, (i + 1)[None, ...], axis=0)[0]
                r = (1 - w) * lo + w * hi
            out.append(np.where(c >= self.top_clock_mhz, 1.0, r))
        return out[0], out[1]


class ClockedPerfModel:
    """A :class:`PerfModel` seen under a locked clock: same interface, slower and lower where the lock binds.

    Everything but the two predictions is the base model's (caps, batches, GPU count...), so a latency model
    built for the base model can be pointed at this view to predict a locked engine.
    """

    def __init__(self, base: PerfModel, response: ClockResponse, clock_mhz: ArrayLike) -> None:
        self.base = base
        self.response = response
        # One lock, or one per element of the cap arrays the predictions are asked at (a grid of locks at once).
        self.clock_mhz = np.asarray(clock_mhz, dtype=float)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def tokens_per_s(self, cap_w: ArrayLike, batch: ArrayLike) -> FloatArray:
        """Engine output tokens/s at per-GPU ``cap_w`` and ``batch`` under the lock."""
        r_t, _ = self.response.ratios(self.clock_mhz, batch)
        top = self.base.tokens_per_s(self.base.max_cap_w, batch) * r_t
        return np.minimum(self.base.tokens_per_s(cap_w, batch), top)

    def gpu_power_w(self, cap_w: ArrayLike, batch: ArrayLike) -> FloatArray:
        """Per-GPU power (W) at per-GPU ``cap_w`` and ``batch`` under the lock (never above the cap-only model's)."""
        _, r_p = self.response.ratios(self.clock_mhz, batch)
        top = self.base.gpu_power_w(self.base.max_cap_w, batch) * r_p
        return np.minimum(self.base.gpu_power_w(cap_w, batch), top)

    def predict(self, cap_w: ArrayLike, batch: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """(tokens/s, per-GPU W) under the lock."""
        return self.tokens_per_s(cap_w, batch), self.gpu_power_w(cap_w, batch)

    def tokens_per_j(self, cap_w: ArrayLike, batch: ArrayLike) -> FloatArray:
        """Output tokens per joule of the engine's GPUs under the lock."""
        t, p = self.predict(cap_w, batch)
        return t / np.maximum(p * self.base.num_gpus, 1e-9)


def clock_response(profile: Profile) -> ClockResponse | None:
    """The profile's clock response, None when it has no clock dimension."""
    return ClockResponse(profile) if profile.clock_points else None
