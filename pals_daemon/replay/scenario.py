"""What a replay simulates: engines (model, GPUs, load, targets, model mismatch), a budget schedule, a duration."""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pals_daemon.control.types import EngineTargets
from pals_daemon.sim.engine import Request
from pals_daemon.sim.trace import DEFAULT_TRACE, load_trace_csv, poisson_requests
from pals_daemon.sim.truth import Perturbation

# Server power fit of the PALS paper (arXiv 2605.21427; ../shared/data/README.md): node power =
# 1.05 x sum(GPU power) + 340-350 W per 4-GPU server; we take the midpoint, 345 W.
SERVER_POWER_SLOPE = 1.05
SERVER_BASE_W_PER_SERVER = 345.0
GPUS_PER_SERVER = 4

# vLLM's default max_num_seqs (vllm EngineArgs) and the paper's batch 64 default; 8192 step tokens is
# vLLM V1's default max_num_batched_tokens for online serving.
DEFAULT_MAX_NUM_SEQS = 64
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
# PALS paper: 500 ms control period, QoS judged over 5 s windows.
DEFAULT_PERIOD_S = 0.5
DEFAULT_QOS_WINDOW_S = 5.0


def server_to_gpu_w(server_w: float, num_gpus: int) -> float:
    """The GPU power (sum over ``num_gpus``) that the paper's fit maps to ``server_w`` of server power."""
    servers = math.ceil(num_gpus / GPUS_PER_SERVER)
    return (server_w - SERVER_BASE_W_PER_SERVER * servers) / SERVER_POWER_SLOPE


def gpu_to_server_w(gpu_w: float, num_gpus: int) -> float:
    """Server power for ``gpu_w`` summed GPU power on ``num_gpus`` GPUs (the paper's fit)."""
    servers = math.ceil(num_gpus / GPUS_PER_SERVER)
    return SERVER_POWER_SLOPE * gpu_w + SERVER_BASE_W_PER_SERVER * servers


@dataclass(frozen=True)
class PoissonLoad:
    """Open-loop Poisson arrivals; lengths fixed or sampled from the given lists."""

    rate_per_s: float
    prompt_tokens: int | tuple[int, ...] = 512
    output_tokens: int | tuple[int, ...] = 256
    seed: int = 0


@dataclass(frozen=True)
class BurstyLoad:
    """On/off modulated Poisson arrivals: ``high_rate_per_s`` for ``on_s``, then ``low_rate_per_s`` for ``off_s``."""

    high_rate_per_s: float
    low_rate_per_s: float
    on_s: float = 20.0
    off_s: float = 40.0
    prompt_tokens: int | tuple[int, ...] = 512
    output_tokens: int | tuple[int, ...] = 256
    seed: int = 0

    def requests(self, duration_s: float) -> list[Request]:
        """Arrivals over ``duration_s``, each phase drawn with its own seed (deterministic)."""
        out: list[Request] = []
        t, k = 0.0, 0
        while t < duration_s:
            on = k % 2 == 0
            span = min(self.on_s if on else self.off_s, duration_s - t)
            rate = self.high_rate_per_s if on else self.low_rate_per_s
            if rate > 0 and span > 0:
                seg = poisson_requests(rate, span, self.prompt_tokens, self.output_tokens, seed=self.seed * 100_003 + k)
                out.extend(Request(r.arrival_s + t, r.prompt_tokens, r.output_tokens) for r in seg)
            t += span
            k += 1
        return out


@dataclass(frozen=True)
class TraceLoad:
    """Requests from a CSV (arrival time, input tokens, output tokens; column names configurable)."""

    path: str = str(DEFAULT_TRACE)
    time_column: str = "TIMESTAMP"
    input_column: str = "ContextTokens"
    output_column: str = "GeneratedTokens"
    # <1 compresses the trace (higher request rate).
    time_scale: float = 1.0
    # Serve every ``every``-th request starting at ``offset`` (a round-robin share of a bigger fleet).
    every: int = 1
    offset: int = 0


@dataclass(frozen=True)
class EngineSpec:
    """One engine of the node: a model on its own GPUs, its load, targets and the truth's mismatch."""

    engine_id: str
    model: str
    load: PoissonLoad | BurstyLoad | TraceLoad
    targets: EngineTargets = field(default_factory=EngineTargets)
    num_gpus: int = 4
    gpu_kind: str = "A100-SXM4"
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    # The simulated truth differs from the controller's profile by these factors (model mismatch).
    perturbation: Perturbation = field(default_factory=Perturbation)
    # Per-GPU share of the routed expert load (expert parallelism; normalised); None: uniform routing, no
    # expert-load telemetry.
    expert_load_share: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        share = self.expert_load_share
        if share is None:
            return
        vals = tuple(float(x) for x in share)
        if len(vals) != self.num_gpus:
            raise ValueError(
                f"engine {self.engine_id!r}: expert_load_share needs {self.num_gpus} entries, got {len(vals)}"
            )
        if not all(math.isfinite(x) and x >= 0 for x in vals) or sum(vals) <= 0:
            raise ValueError(f"engine {self.engine_id!r}: expert_load_share must be finite, >= 0 and not all zero")
        object.__setattr__(self, "expert_load_share", vals)

    def requests(self, duration_s: float) -> list[Request]:
        """The requests this engine serves within ``duration_s``."""
        load = self.load
        if isinstance(load, BurstyLoad):
            return load.requests(duration_s)
        if isinstance(load, PoissonLoad):
            return poisson_requests(load.rate_per_s, duration_s, load.prompt_tokens, load.output_tokens, load.seed)
        reqs = load_trace_csv(
            load.path,
            time_column=load.time_column,
            input_column=load.input_column,
            output_column=load.output_column,
            time_scale=load.time_scale,
            limit_s=duration_s,
        )
        return reqs[load.offset :: max(1, load.every)]


@dataclass(frozen=True)
class Budget:
    """A node budget over time: (start time s, watts) steps, held until the next; None watts = no budget.

    ``unit`` "gpu" means the sum of GPU power limits; "server" means server power with the paper's fit
    (converted with :func:`server_to_gpu_w`). ``interpolate`` makes a time series linear between points.
    """

    points: tuple[tuple[float, float | None], ...] = ()
    unit: str = "gpu"
    interpolate: bool = False

    def __post_init__(self) -> None:
        if self.unit not in ("gpu", "server"):
            raise ValueError(f"budget unit must be 'gpu' or 'server', got {self.unit!r}")
        times = [t for t, _ in self.points]
        if times != sorted(times):
            raise ValueError("budget points must be in time order")

    @staticmethod
    def constant(watts: float | None, unit: str = "gpu") -> Budget:
        """One value for the whole run."""
        return Budget(((0.0, watts),), unit)

    def at(self, t_s: float) -> float | None:
        """The budget in its own unit at ``t_s`` (None: no budget)."""
        if not self.points:
            return None
        times = [t for t, _ in self.points]
        i = bisect.bisect_right(times, t_s) - 1
        if i < 0:
            return None
        t0, w0 = self.points[i]
        if self.interpolate and i + 1 < len(self.points) and w0 is not None:
            t1, w1 = self.points[i + 1]
            if w1 is not None and t1 > t0:
                return w0 + (w1 - w0) * (t_s - t0) / (t1 - t0)
        return w0

    def gpu_w(self, t_s: float, num_gpus: int) -> float | None:
        """The GPU budget (sum of limits) at ``t_s`` for a node of ``num_gpus`` GPUs."""
        w = self.at(t_s)
        if w is None:
            return None
        return max(0.0, server_to_gpu_w(w, num_gpus)) if self.unit == "server" else w


@dataclass(frozen=True)
class Scenario:
    """A node to replay: engines, budget schedule, duration and control period."""

    name: str
    engines: tuple[EngineSpec, ...]
    duration_s: float
    budget: Budget = field(default_factory=Budget)
    period_s: float = DEFAULT_PERIOD_S
    qos_window_s: float = DEFAULT_QOS_WINDOW_S
    # Tokens, energy, QoS and SLO figures count from here (start-up transient excluded); budget checks
    # cover the whole run.
    warmup_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(f"warmup_s must be in [0, duration_s), got {self.warmup_s!r}")
        if not self.engines:
            raise ValueError("a scenario needs at least one engine")
        ids = [e.engine_id for e in self.engines]
        if len(set(ids)) != len(ids):
            raise ValueError(f"engine ids must be unique, got {ids}")
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration_s must be > 0, got {self.duration_s!r}")
        if not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ValueError(f"period_s must be > 0, got {self.period_s!r}")

    @property
    def num_gpus(self) -> int:
        """GPUs of the node (the engines' GPUs together)."""
        return sum(e.num_gpus for e in self.engines)


def _targets(raw: Mapping[str, Any] | None) -> EngineTargets:
    raw = raw or {}
    unknown = set(raw) - {"tokens_per_s", "ttft_ms", "tpot_ms"}
    if unknown:
        raise ValueError(f"unknown target keys {sorted(unknown)}")
    return EngineTargets(**{k: float(v) for k, v in raw.items() if v is not None})


def _load(raw: Mapping[str, Any]) -> PoissonLoad | BurstyLoad | TraceLoad:
    raw = dict(raw)
    kind = raw.pop("kind", "poisson")
    for key in ("prompt_tokens", "output_tokens"):
        if isinstance(raw.get(key), list):
            raw[key] = tuple(int(v) for v in raw[key])
    if kind == "poisson":
        return PoissonLoad(**raw)
    if kind == "bursty":
        return BurstyLoad(**raw)
    if kind == "trace":
        return TraceLoad(**raw)
    raise ValueError(f"load kind must be 'poisson', 'bursty' or 'trace', got {kind!r}")


def scenario_from_dict(data: Mapping[str, Any]) -> Scenario:
    """A scenario from plain data (the JSON the CLI reads); see ``pals-replay --help`` for the layout."""
    engines = []
    for i, raw in enumerate(data.get("engines", [])):
        raw = dict(raw)
        pert = raw.pop("perturbation", None) or {}
        if raw.get("expert_load_share") is not None:
            raw["expert_load_share"] = tuple(float(v) for v in raw["expert_load_share"])
        engines.append(
            EngineSpec(
                engine_id=str(raw.pop("engine_id", f"engine{i}")),
                model=str(raw.pop("model")),
                load=_load(raw.pop("load")),
                targets=_targets(raw.pop("targets", None)),
                perturbation=Perturbation(**pert),
                **raw,
            )
        )
    braw = data.get("budget") or {}
    points: Sequence[Any] = braw.get("points", [])
    if "watts" in braw:
        points = [[0.0, braw["watts"]]]
    budget = Budget(
        tuple((float(t), None if w is None else float(w)) for t, w in points),
        unit=str(braw.get("unit", "gpu")),
        interpolate=bool(braw.get("interpolate", False)),
    )
    return Scenario(
        name=str(data.get("name", "scenario")),
        engines=tuple(engines),
        duration_s=float(data["duration_s"]),
        budget=budget,
        period_s=float(data.get("period_s", DEFAULT_PERIOD_S)),
        qos_window_s=float(data.get("qos_window_s", DEFAULT_QOS_WINDOW_S)),
        warmup_s=float(data.get("warmup_s", 0.0)),
    )


def load_scenario(path: str | Path) -> Scenario:
    """A scenario from a JSON file."""
    with open(path) as f:
        return scenario_from_dict(json.load(f))
