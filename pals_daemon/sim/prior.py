"""Modelled latency of prefill and decode under a power cap: the physics prior, valid for a real GPU.

This is the part of the simulated truth that holds no simulation: cited facts (the model catalogue, the GPU's
hardware profile) and the decode physics fitted to measured sweeps (:mod:`pals_daemon.sim.fitted`). It has no
model mismatch (:class:`~pals_daemon.sim.model_truth.Perturbation`) and no residual table, so a controller may
use it as the prior of a latency model that it then corrects online from its own engine's telemetry; the
simulated truth (:class:`~pals_daemon.sim.model_truth.ModelTruth`) is built on the same functions and adds both.

- Prefill is compute-bound: at full clock it takes 2 x active params x tokens / (GPUs x peak BF16 FLOP/s x MFU)
  and it slows with the SM clock a binding cap leaves (DVFS: power = idle + (demand - idle) x clock ** alpha).
- Decode is memory-bound and weakly cap-dependent: :meth:`DecodePhysics.decode` (step time, power, clock).

Every constant below is MODELLED (labelled where it is set); the fitted ones cite their data file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from pals_daemon.sim.catalogue import ModelSpec, model_spec
from pals_daemon.sim.fitted import a100_physics
from pals_daemon.sim.hardware import A100_SXM4, HardwareProfile
from pals_daemon.sim.physics import DecodePhysics

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


class PrefillStep(NamedTuple):
    """Prefilling some prompt tokens: duration, per-GPU power, per-GPU uncapped demand, and SM clock."""

    time_s: float
    power_w_per_gpu: float
    demand_power_w: float
    sm_clock_mhz: float


def prefill_demand_power_w(hardware: HardwareProfile, power_factor: float = 1.0) -> float:
    """Modelled per-GPU power prefill would draw uncapped (``power_factor``: a simulated mismatch, 1 for a prior)."""
    return PREFILL_DEMAND_FRACTION * hardware.max_limit_w * power_factor


def clock_mhz_under_cap(
    hardware: HardwareProfile, physics: DecodePhysics | None, cap_w: float, power_w: float, demand_w: float
) -> float:
    """SM clock for clock-bound work: full unless the cap holds power below demand, then by DVFS."""
    max_clock = float(hardware.max_sm_clock_mhz)
    if demand_w <= cap_w:
        return max_clock
    idle = hardware.idle_power_w
    share = (power_w - idle) / (demand_w - idle) if demand_w > idle else 1.0
    share = min(1.0, max(0.0, share))
    if physics is not None:
        # All-compute work draws idle + dynamic x f ** alpha (see physics): invert for f.
        return max_clock * max(physics.f_min, share ** (1.0 / physics.alpha))
    return max_clock * max(MIN_CLOCK_RATIO, share**CLOCK_POWER_EXPONENT)


def locked_prefill_clock_power(
    hardware: HardwareProfile, physics: DecodePhysics | None, locked_clock_mhz: float, demand_w: float
) -> tuple[float, float]:
    """(SM clock MHz, per-GPU power W) of prefill held at a locked clock below the one the cap leaves.

    The same DVFS relation as under a cap, read the other way: all-compute work draws idle + (demand - idle) x
    f ** alpha at clock ratio f (alpha: the fitted one, else the pre-physics rule's 1 / CLOCK_POWER_EXPONENT).
    """
    max_clock = float(hardware.max_sm_clock_mhz)
    floor = physics.f_min if physics is not None else MIN_CLOCK_RATIO
    ratio = min(1.0, max(floor, locked_clock_mhz / max_clock))
    alpha = physics.alpha if physics is not None else 1.0 / CLOCK_POWER_EXPONENT
    idle = hardware.idle_power_w
    return max_clock * ratio, idle + max(0.0, demand_w - idle) * ratio**alpha


def prefill_step(
    spec: ModelSpec,
    hardware: HardwareProfile,
    num_gpus: int,
    physics: DecodePhysics | None,
    cap_w: float,
    prompt_tokens: int,
    *,
    throughput_factor: float = 1.0,
    power_factor: float = 1.0,
    locked_clock_mhz: float | None = None,
) -> PrefillStep:
    """Duration, per-GPU power, demand and SM clock of prefilling ``prompt_tokens`` under ``cap_w`` per GPU.

    Prefill is compute-bound and slows roughly with the SM clock (GreenLLM, arXiv 2508.16449; Maliakel et al.,
    arXiv 2501.08219). At full clock its time is 2 x active params x tokens / (num_gpus x peak bf16 FLOP/s x
    MFU); attention's quadratic term is ignored (modelled). Under a cap the clock falls until the power,
    idle + (demand - idle) x clock ** alpha with the model's fitted alpha, meets the cap. The two factors are
    the simulated truth's mismatch (:class:`~pals_daemon.sim.model_truth.Perturbation`); a prior leaves them 1.
    ``locked_clock_mhz``: a locked SM clock ceiling; the clock in force is the lower of it and the cap's clock.
    """
    demand = prefill_demand_power_w(hardware, power_factor)
    power = min(cap_w, demand)  # modelled: prefill runs at the cap when the cap binds
    clock = clock_mhz_under_cap(hardware, physics, cap_w, power, demand)
    if locked_clock_mhz is not None and locked_clock_mhz < clock:
        clock, power = locked_prefill_clock_power(hardware, physics, float(locked_clock_mhz), demand)
    flops = 2.0 * spec.active_params * max(0, prompt_tokens)
    rate = num_gpus * hardware.peak_bf16_tflop_s * 1e12 * PREFILL_MFU
    t_full_clock = flops / rate / throughput_factor
    return PrefillStep(t_full_clock * hardware.max_sm_clock_mhz / clock, power, demand, clock)


@dataclass(frozen=True)
class LatencyPrior:
    """Modelled prefill and decode latency of one model on ``num_gpus`` GPUs of one kind, as functions of the cap.

    ``physics`` is the decode physics fitted to a measured sweep of this model and GPU kind, or None when there
    is none (then only prefill is modelled, with the pre-physics clock rule).
    """

    spec: ModelSpec
    hardware: HardwareProfile
    num_gpus: int
    physics: DecodePhysics | None

    def prefill_time_s(self, cap_w: float, prompt_tokens: int) -> float:
        """Seconds to prefill ``prompt_tokens`` under ``cap_w`` per GPU (linear in the tokens)."""
        return prefill_step(self.spec, self.hardware, self.num_gpus, self.physics, cap_w, prompt_tokens).time_s

    def prefill_s_per_token(self, cap_w: float) -> float:
        """Seconds of prefill per prompt token under ``cap_w`` per GPU."""
        return self.prefill_time_s(cap_w, 1)

    def decode_step_s(self, cap_w: float, batch: float) -> float:
        """Seconds of one decode step of ``batch`` running sequences under ``cap_w`` per GPU (fitted physics)."""
        return float(self._decode(cap_w, batch)[0])

    def decode_power_w(self, cap_w: float, batch: float) -> float:
        """Per-GPU power (W) while decoding ``batch`` sequences under ``cap_w`` (fitted physics)."""
        return float(self._decode(cap_w, batch)[1])

    def _decode(self, cap_w: float, batch: float) -> tuple[float, float, float]:
        if self.physics is None:
            raise ValueError(f"{self.spec.name} on {self.hardware.name}: no fitted decode physics")
        t, p, f = self.physics.decode(max(1.0, float(batch)), float(cap_w))
        return float(t), float(p), float(f)


def a100_latency_prior(model_name: str) -> LatencyPrior:
    """The prior of an A100-sweep model (any alias) on 4 A100-SXM4 with TP4, the setup its physics was fitted on."""
    return LatencyPrior(model_spec(model_name), A100_SXM4, 4, a100_physics(model_name))
