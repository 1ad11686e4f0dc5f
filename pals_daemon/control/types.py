"""Inputs and outputs of the controller core. Plain frozen data: no sockets, no NVML, no clock."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuObservation:
    """What the daemon knows about one GPU at the start of a tick (watts, joules)."""

    index: int
    uuid: str
    min_limit_w: float
    max_limit_w: float
    default_limit_w: float
    requested_limit_w: float
    enforced_limit_w: float
    power_avg_w: float
    power_instant_w: float | None
    energy_j: float
    sm_clock_mhz: int
    power_capped: bool
    # False once a fatal error stopped the daemon controlling this GPU: its limit is left alone.
    controlled: bool = True
    # The clock knob: True while the daemon may lock this GPU's SM clock (Decision.gpu_locked_clocks_mhz);
    # the supported range (0 when unknown) and the ceiling locked now (None: unlocked).
    clock_control: bool = False
    min_clock_mhz: int = 0
    max_clock_mhz: int = 0
    locked_clock_mhz: int | None = None


@dataclass(frozen=True)
class EngineTargets:
    """An engine's service targets; None means no target of that kind."""

    tokens_per_s: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None


@dataclass(frozen=True)
class EngineObservation:
    """One engine's telemetry aggregated over the last control window."""

    engine_id: str
    model: str
    gpu_indices: tuple[int, ...]
    configured_max_num_seqs: int
    configured_max_num_batched_tokens: int
    # Length of the window the figures below cover; 0 when no report arrived in it.
    window_s: float
    # Output (decode) tokens per second generated in the window; prompt tokens are counted separately.
    throughput_tokens_per_s: float
    prefill_tokens: int
    decode_tokens: int
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    # Fraction of the window the engine was stepping (sum of step times / window).
    busy_fraction: float
    # 90th percentile TTFT/TPOT of requests finished in the window; None when none finished.
    ttft_p90_ms: float | None = None
    tpot_p90_ms: float | None = None
    # The batch limits in force during the window.
    current_max_num_seqs: int = 0
    # Per-GPU share of the engine's expert load (sums to 1 over the engine's GPUs); empty when unknown.
    expert_load_share: Mapping[int, float] = field(default_factory=dict)
    # Steps run and requests arrived in the window (what the latency model learns from; 0 when unknown).
    num_steps: int = 0
    arrived_requests: int = 0
    # 99th percentile TTFT/TPOT of requests finished in the window (the SLO planner's tail); None when none.
    ttft_p99_ms: float | None = None
    tpot_p99_ms: float | None = None
    # Every request finished in the window: (TTFT ms, TPOT ms), TPOT NaN for a single output token (judged on
    # TTFT only). The SLO planner learns its tails per request from these (a window's p99 of a handful of
    # requests is their maximum, not the tail the operator judges).
    finished_ms: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class ControllerInput:
    """Everything one tick decides from."""

    # Seconds on the daemon's (possibly simulated) clock; used only for rates and ramps, never read here.
    now_s: float
    # The node GPU budget in force: the sum of every GPU's power limit must not exceed it. None: no budget.
    budget_w: float | None
    gpus: tuple[GpuObservation, ...]
    engines: tuple[EngineObservation, ...]
    targets: Mapping[str, EngineTargets]


@dataclass(frozen=True)
class EngineDecision:
    """Batch limits for one engine and what the model predicts at the chosen configuration."""

    engine_id: str
    max_num_seqs: int
    max_num_batched_tokens: int
    predicted_tokens_per_s: float
    # Predicted power of the engine's GPUs together.
    predicted_power_w: float
    # Whether the engine's model has a profile (without one only the budget share applies).
    has_profile: bool
    # Under latency SLOs: the p90 TTFT and TPOT the latency model predicts at the chosen cap (None otherwise).
    predicted_ttft_p90_ms: float | None = None
    predicted_tpot_p90_ms: float | None = None


@dataclass(frozen=True)
class Decision:
    """The tick's outcome: a power limit for every controlled GPU and batch limits per engine."""

    gpu_limits_w: Mapping[int, float]
    engines: Mapping[str, EngineDecision]
    # True when this tick changed a limit or a batch limit (hysteresis holds it False on noise).
    changed: bool
    # One short line on why (budget cut, target missed, better efficiency, hold).
    reason: str
    # Per-GPU SM clock ceiling in MHz (the locked-clock actuator); absent or None: leave the clock unlocked.
    gpu_locked_clocks_mhz: Mapping[int, int | None] = field(default_factory=dict)
