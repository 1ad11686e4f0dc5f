"""Physical decode model behind the simulated truth: DVFS under a power cap, memory- vs. compute-bound time, MoE skew.

One decode step of ``b`` sequences at normalised SM clock ``f`` (clock / max clock) takes

    t(b, f) = t_mem(b) * max(1, f_knee / f) + t_clk(b) / f
    t_mem(b) = t_fixed + t_expert * active_expert_fraction(b) + t_token_mem * b     (clock-insensitive)
    t_clk(b) = t_clk0 + t_clk_token * b                                               (scales with 1 / clock)

``active_expert_fraction(b) = 1 - (1 - r * k / E) ** b`` is the expected share of a layer's E routed experts that
b tokens with top-k routing touch (r = 1: uniform independent routing; r is fitted): their weights are streamed
from HBM once per step. Decode is memory-bound, so most of t is in t_mem and the step barely slows until the clock
falls below f_knee, where the SMs can no longer keep HBM busy (GreenLLM, arXiv 2508.16449; Maliakel et al., arXiv
2501.08219: decode is largely clock-insensitive). Power while busy is

    P(b, f) = P_idle + (P_mem * t_mem(b) + P_sm * f ** (alpha - 1) * t_clk(b)) / t(b, f)

i.e. memory energy per step is fixed and SM energy per step scales with f ** (alpha - 1) (dynamic energy per
operation ~ V^2, with the voltage rising with the clock). P grows monotonically with f, so under a cap the
clock is the largest f in [f_min, 1] with P <= cap (DVFS: the clock falls only when the cap binds).

Every coefficient in :class:`DecodePhysics` but idle power and the expert counts (cited) is MODELLED: fitted by
:func:`fit_decode_physics` to measured sweeps (the fitted numbers are data with their provenance, read by
:mod:`pals_daemon.sim.fitted`) or set as labelled, not measured directly.

Expert parallelism skew: with experts spread over the GPUs, GPU i receives a share s_i of the routed tokens
(uniform: 1 / N). Its expert work (weights of the experts its tokens touch, per-token compute) follows
``w_i = N * s_i``; the step ends when the slowest GPU ends (all-to-all barrier), and the others wait at idle
power. See :meth:`DecodePhysics.skewed`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

# Bisection iterations for the clock under a cap: 2^-40 of the clock range, far below any physical effect.
_BISECT_ITERS = 40


@dataclass(frozen=True)
class DecodePhysics:
    """Modelled per-GPU decode physics of one model on one GPU kind (times in s, powers in W)."""

    idle_w: float  # cited: the GPU's idle power (hardware profile)
    num_experts: int  # cited: routed experts per MoE layer (model config)
    top_k: int  # cited: experts per token (model config)
    t_fixed_s: float  # modelled: clock-insensitive time per step (dense weights, launch, sync)
    t_expert_s: float  # modelled: streaming all routed experts' weights once
    t_token_mem_s: float  # modelled: clock-insensitive time per sequence (KV reads, sampling)
    t_clk0_s: float  # modelled: clock-bound time per step at full clock
    t_clk_token_s: float  # modelled: clock-bound time per sequence at full clock
    p_mem_w: float  # modelled: busy power of the memory-bound part above idle
    p_sm_w: float  # modelled: busy power of the clock-bound part above idle at full clock
    alpha: float  # modelled: SM dynamic power ~ f ** alpha at full utilisation
    # modelled: below this clock ratio the SMs can no longer issue loads fast enough to saturate HBM, and the
    # memory-bound part slows in proportion to the clock too (deep capping)
    f_knee: float = 0.3
    # modelled: effective top_k / E multiplier; below 1 when routing concentrates on hot experts, so fewer
    # distinct experts are touched at a given batch than uniform routing would touch
    routing_factor: float = 1.0
    f_min: float = 0.15  # modelled: lowest clock ratio a cap can force (A100: 210 of 1410 MHz)
    # modelled: share of the memory-bound part's busy power drawn by the SMs themselves (clocked, waiting on HBM),
    # which falls with the clock as f ** alpha; the rest (HBM, fabric) does not. 0 (the A100 fits, fitted under
    # caps without it) keeps memory energy per step clock-independent; the H100 value is set where the physics is
    # built (pals_daemon/sim/fitted.py, H100_CORE_MEM_SHARE) against the published clock-locking savings.
    core_mem_share: float = 0.0

    # ---- scalar-or-array building blocks ---------------------------------------------------------------

    def expert_fraction(self, tokens: np.ndarray | float) -> np.ndarray | float:
        """Expected share of the routed experts that ``tokens`` tokens with top-k routing activate."""
        return 1.0 - self._miss_probability() ** np.asarray(tokens, dtype=float)

    def _miss_probability(self) -> float:
        """Probability that one token does not route to a given expert."""
        return 1.0 - min(1.0, self.routing_factor * self.top_k / max(1, self.num_experts))

    def times_s(self, batch: np.ndarray | float, weight: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(t_mem, t_clk at full clock) of one step for ``batch`` sequences and expert-load weight ``weight``."""
        b = np.asarray(batch, dtype=float)
        w = np.asarray(weight, dtype=float)
        q = self._miss_probability()
        frac = 1.0 - q ** (b * w)
        # The expert weights a GPU streams are its experts touched by its tokens; uniform (w = 1) it holds
        # 1 / N of the experts and sees 1 / N of the routed tokens' expert visits, which the fit absorbs.
        t_mem = self.t_fixed_s + self.t_expert_s * frac + self.t_token_mem_s * b
        t_clk = self.t_clk0_s + self.t_clk_token_s * b * w
        return t_mem, t_clk

    def busy_time_s(self, t_mem: np.ndarray, t_clk: np.ndarray, f: np.ndarray | float) -> np.ndarray:
        """Time to run work (t_mem, t_clk) at normalised clock ``f``: memory part slows only below f_knee."""
        f = np.asarray(f, dtype=float)
        return t_mem * np.maximum(1.0, self.f_knee / f) + t_clk / f

    def step_time_s(self, batch: np.ndarray | float, f: np.ndarray | float) -> np.ndarray:
        """Step time at normalised clock ``f``."""
        t_mem, t_clk = self.times_s(batch)
        return self.busy_time_s(t_mem, t_clk, f)

    def dynamic_energy_j(self, t_mem: np.ndarray, t_clk: np.ndarray, f: np.ndarray) -> np.ndarray:
        """Energy above idle of one step's work at clock ``f`` (J)."""
        clk = self.p_sm_w * np.power(f, self.alpha - 1.0) * t_clk
        s = self.core_mem_share
        if s == 0.0:
            return self.p_mem_w * t_mem + clk
        # The SM share of the memory phase draws ~ f ** alpha for as long as the phase lasts (longer below f_knee).
        f = np.asarray(f, dtype=float)
        core = s * np.power(f, self.alpha) * np.maximum(1.0, self.f_knee / f)
        return self.p_mem_w * t_mem * ((1.0 - s) + core) + clk

    def busy_power_w(self, t_mem: np.ndarray, t_clk: np.ndarray, f: np.ndarray) -> np.ndarray:
        """Average power while running the step's work at clock ``f`` (W)."""
        f = np.asarray(f, dtype=float)
        return self.idle_w + self.dynamic_energy_j(t_mem, t_clk, f) / self.busy_time_s(t_mem, t_clk, f)

    def clock_for_cap(self, t_mem: np.ndarray, t_clk: np.ndarray, cap_w: np.ndarray | float) -> np.ndarray:
        """The normalised clock DVFS settles at: 1 if the work draws at most the cap, else where P = cap."""
        t_mem, t_clk, cap = np.broadcast_arrays(
            np.asarray(t_mem, dtype=float), np.asarray(t_clk, dtype=float), np.asarray(cap_w, dtype=float)
        )
        lo = np.full(t_mem.shape, self.f_min)
        hi = np.ones(t_mem.shape)
        free = self.busy_power_w(t_mem, t_clk, hi) <= cap
        floor = self.busy_power_w(t_mem, t_clk, lo) >= cap
        for _ in range(_BISECT_ITERS):
            mid = 0.5 * (lo + hi)
            over = self.busy_power_w(t_mem, t_clk, mid) > cap
            hi = np.where(over, mid, hi)
            lo = np.where(over, lo, mid)
        return np.where(free, 1.0, np.where(floor, self.f_min, lo))

    # ---- uniform decode ---------------------------------------------------------------------------------

    def decode(
        self, batch: np.ndarray | float, cap_w: np.ndarray | float, f_lock: np.ndarray | float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(step time s, per-GPU power W, normalised clock) of a decode step under ``cap_w`` per GPU.

        ``f_lock``: a locked SM clock ceiling (normalised); the clock in force is the lower of it and the clock
        the cap leaves, so a lock lowers power and lengthens the step even where the cap does not bind.
        """
        t_mem, t_clk = self.times_s(batch)
        f = self.clock_for_cap(t_mem, t_clk, cap_w)
        if f_lock is not None:
            f = np.minimum(f, f_lock)
        return self.busy_time_s(t_mem, t_clk, f), self.busy_power_w(t_mem, t_clk, f), f

    # ---- expert-parallel skew ---------------------------------------------------------------------------

    def per_gpu(
        self,
        batch: float,
        cap_w_per_gpu: Sequence[float],
        expert_load_share: Sequence[float],
        f_lock: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(busy time s, busy power W, clock ratio) of each GPU's own work under routing skew.

        GPU i holds experts that receive ``expert_load_share[i]`` of the routed tokens (normalised), so its
        expert work has weight ``N * share_i``; it runs at the clock its own cap allows while busy.
        """
        caps = np.asarray(cap_w_per_gpu, dtype=float)
        share = np.asarray(expert_load_share, dtype=float)
        if caps.shape != share.shape or caps.ndim != 1 or caps.size < 1:
            raise ValueError("cap_w_per_gpu and expert_load_share must be 1-D of the same length")
        if not np.isfinite(share).all() or np.any(share < 0) or share.sum() <= 0:
            raise ValueError("expert_load_share must be finite, >= 0 and not all zero")
        w = share / share.sum() * share.size
        t_mem, t_clk = self.times_s(np.full(share.shape, float(batch)), w)
        f = self.clock_for_cap(t_mem, t_clk, caps)
        if f_lock is not None:
            f = np.minimum(f, f_lock)
        return self.busy_time_s(t_mem, t_clk, f), self.busy_power_w(t_mem, t_clk, f), f

    def skewed(
        self, batch: float, cap_w_per_gpu: Sequence[float], expert_load_share: Sequence[float]
    ) -> tuple[float, np.ndarray, np.ndarray, int]:
        """(step time s, per-GPU average power W, per-GPU clock ratio, straggler index) under routing skew.

        The step ends when the slowest GPU ends (all-to-all barrier); the others wait at idle power. With
        uniform shares and equal caps this equals :meth:`decode`.
        """
        busy, p_busy, f = self.per_gpu(batch, cap_w_per_gpu, expert_load_share)
        i_max = int(np.argmax(busy))
        step = float(busy[i_max])
        power = self.idle_w + (p_busy - self.idle_w) * busy / step
        return step, power, f, i_max


_FIT_FIELDS = (
    "t_fixed_s",
    "t_expert_s",
    "t_token_mem_s",
    "t_clk0_s",
    "t_clk_token_s",
    "p_mem_w",
    "p_sm_w",
    "alpha",
    "f_knee",
    "routing_factor",
)


def fit_decode_physics(
    init: DecodePhysics,
    batch: np.ndarray,
    cap_w: np.ndarray,
    step_time_s: np.ndarray,
    power_w: np.ndarray,
    *,
    free: Sequence[str] = _FIT_FIELDS,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    iters: int = 200,
) -> DecodePhysics:
    """Least-squares fit (Levenberg-Marquardt on log errors of step time and power) of the ``free`` fields.

    Fields in ``bounds`` stay within (lo, hi) through a logistic transform; the others stay positive.
    """
    names = [n for n in _FIT_FIELDS if n in set(free)]
    bnd = dict(bounds or {})
    batch, cap_w = np.asarray(batch, float), np.asarray(cap_w, float)
    y_t, y_p = np.log(np.asarray(step_time_s, float)), np.log(np.asarray(power_w, float))

    def value(n: str, v: float) -> float:
        if n in bnd:
            lo, hi = bnd[n]
            return lo + (hi - lo) / (1.0 + np.exp(-v))
        return float(np.exp(v))

    def build(x: np.ndarray) -> DecodePhysics:
        return replace(init, **{n: value(n, v) for n, v in zip(names, x, strict=True)})

    def resid(x: np.ndarray) -> np.ndarray:
        ph = build(x)
        t, p, _ = ph.decode(batch, cap_w)
        return np.concatenate([np.log(t) - y_t, np.log(p) - y_p])

    x0 = []
    for n in names:
        v = float(getattr(init, n))
        if n in bnd:
            lo, hi = bnd[n]
            u = min(max((v - lo) / (hi - lo), 1e-6), 1 - 1e-6)
            x0.append(float(np.log(u / (1 - u))))
        else:
            x0.append(float(np.log(max(v, 1e-12))))
    x = np.array(x0)
    return build(_levenberg_marquardt(resid, x, iters))


def _levenberg_marquardt(resid: Callable[[np.ndarray], np.ndarray], x: np.ndarray, iters: int) -> np.ndarray:
    """Minimise ||resid(x)||^2 by Levenberg-Marquardt with a forward-difference Jacobian."""
    lam = 1e-2
    r = resid(x)
    cost = float(r @ r)
    for _ in range(iters):
        jac = np.empty((r.size, x.size))
        for k in range(x.size):
            dx = np.zeros_like(x)
            dx[k] = 1e-6
            jac[:, k] = (resid(x + dx) - r) / 1e-6
        g = jac.T @ r
        h = jac.T @ jac
        improved = False
        for _ in range(10):
            step = np.linalg.solve(h + lam * np.diag(np.diag(h) + 1e-12), -g)
            x_new = x + np.clip(step, -2.0, 2.0)
            r_new = resid(x_new)
            c_new = float(r_new @ r_new)
            if np.isfinite(c_new) and c_new < cost:
                x, r, improved = x_new, r_new, cost - c_new > 1e-12 * cost
                cost = c_new
                lam = max(lam / 3, 1e-9)
                break
            lam *= 4
        if not improved:
            break
    return x


def physics_fields() -> list[str]:
    """Names of :class:`DecodePhysics` fields (for serialising fitted constants)."""
    return [f.name for f in fields(DecodePhysics)]
