"""Figures and plots of simulated-node runs (the main job's output)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from pals_daemon.sim.node import ENGINE_ID, SimNodeResult


def policy_name(result: SimNodeResult) -> str:
    """'pals' for the daemon enforcing, 'default' for advise mode (GPUs and batch left as configured), and
    'static:CAP[:BATCH]' for advise mode over GPUs held at a static cap (the best static in hindsight)."""
    spec = result.spec
    if spec.mode == "enforce":
        return "pals"
    if spec.static_cap_w is None:
        return "default"
    return f"static:{spec.static_cap_w:g}:{spec.max_num_seqs}"


def summarize(result: SimNodeResult, ttft_slo_ms: float | None, tpot_slo_ms: float | None) -> dict[str, Any]:
    """Per-engine and node figures of one run, as plain data."""
    ttft, tpot = np.asarray(result.ttft_ms), np.asarray(result.tpot_ms)
    all_tokens = result.output_tokens + result.prompt_tokens
    engine = {
        "gpus": list(result.engine_gpus),
        "requests_finished": result.requests_finished,
        "requests_arrived": result.requests_arrived,
        "output_tokens": result.output_tokens,
        "prompt_tokens": result.prompt_tokens,
        "energy_j": round(result.engine_energy_j, 1),
        "output_tokens_per_j": _ratio(result.output_tokens, result.engine_energy_j),
        "all_tokens_per_j": _ratio(all_tokens, result.engine_energy_j),
        "qos_violation_windows": result.qos_violations,
        "qos_windows": result.qos_windows,
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p90_ms": _pct(ttft, 90),
        "tpot_p50_ms": _pct(tpot, 50),
        "tpot_p90_ms": _pct(tpot, 90),
        "slo_attainment": None if result.slo_attainment is None else round(result.slo_attainment, 4),
        "energy_per_output_token_j": _per(result.engine_energy_j, result.output_tokens),
        "ttft_slo_attainment": float((ttft <= ttft_slo_ms).mean()) if ttft_slo_ms and len(ttft) else None,
        "tpot_slo_attainment": float((tpot <= tpot_slo_ms).mean()) if tpot_slo_ms and len(tpot) else None,
    }
    node = {
        "simulated_s": round(result.duration_s, 1),
        "output_tokens": result.output_tokens,
        "energy_j": round(result.gpu_energy_j, 1),
        "output_tokens_per_j": _ratio(result.output_tokens, result.gpu_energy_j),
        "all_tokens_per_j": _ratio(all_tokens, result.gpu_energy_j),
        "energy_per_output_token_j": _per(result.gpu_energy_j, result.output_tokens),
        "time_over_budget_s": round(result.time_over_budget_s(), 1),
        "power_limit_writes": result.limit_calls,
    }
    return {"policy": policy_name(result), "engines": {ENGINE_ID: engine}, "node": node}


def _per(joules: float, tokens: float) -> float | None:
    return round(joules / tokens, 4) if tokens > 0 else None


def _ratio(tokens: float, joules: float) -> float:
    return round(tokens / joules, 4) if joules > 0 else 0.0


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


COLUMNS = (
    ("requests", "requests_finished"),
    ("out tokens", "output_tokens"),
    ("energy J", "energy_j"),
    ("out tok/J", "output_tokens_per_j"),
    ("J/out tok", "energy_per_output_token_j"),
    ("SLO att", "slo_attainment"),
    ("QoS viol", "qos_violation_windows"),
    ("windows", "qos_windows"),
    ("over budget s", "time_over_budget_s"),
    ("TTFT p90 ms", "ttft_p90_ms"),
    ("TPOT p90 ms", "tpot_p90_ms"),
)


def format_table(summaries: list[dict[str, Any]]) -> str:
    """One row per engine and one per node, for every run."""
    width = max([8] + [len(s["policy"]) for s in summaries])
    header = f"{'policy':<{width}} {'scope':<8}" + "".join(f"{name:>14}" for name, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for summary in summaries:
        scopes = [(eid, fig) for eid, fig in summary["engines"].items()] + [("node", summary["node"])]
        for scope, fig in scopes:
            cells = "".join(f"{_cell(fig.get(key)):>14}" for _, key in COLUMNS)
            lines.append(f"{summary['policy']:<{width}} {scope:<8}{cells}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    return str(value)


def write_json(path: pathlib.Path, payload: dict[str, Any]) -> None:
    """Write the figures as JSON."""
    path.write_text(json.dumps(payload, indent=2, default=str))


def plot(results: list[SimNodeResult], path: pathlib.Path) -> None:
    """Power vs budget, per-GPU enforced caps and the batch limit over time, one column per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(results), figsize=(7 * len(results), 9), sharex="col", squeeze=False)
    for col, result in enumerate(results):
        s = result.samples
        t_min = np.array([x.t_s for x in s]) / 60.0
        name = policy_name(result)
        title = {"pals": "pals (enforce)", "default": "default (advise: no change)"}.get(name, f"{name} (advise)")
        ax = axes[0][col]
        ax.plot(t_min, [x.node_power_w for x in s], lw=0.8, label="GPU power (sum of 1 s averages)")
        budget = [np.nan if x.budget_w is None else x.budget_w for x in s]
        ax.plot(t_min, budget, "r--", lw=1.5, label="budget")
        ax.set_ylabel("W")
        ax.set_title(f"{title}: {result.spec.model}, {result.tokens_per_joule:.3f} output tokens/J")
        ax.legend(loc="upper right", fontsize=8)
        ax = axes[1][col]
        limits = np.array([x.enforced_limits_w for x in s])
        for i in range(limits.shape[1] if limits.size else 0):
            ax.plot(t_min, limits[:, i], lw=1.0, label=f"GPU {i}")
        ax.set_ylabel("enforced power limit (W)")
        ax.legend(loc="upper right", fontsize=8)
        ax = axes[2][col]
        ax.step(t_min, [x.max_num_seqs for x in s], where="post", lw=1.0, label="max_num_seqs limit")
        ax.set_ylabel("batch limit (sequences)")
        ax.set_xlabel("simulated time (min)")
        ax2 = ax.twinx()
        ax2.plot(t_min, [x.throughput_tokens_per_s for x in s], color="grey", lw=0.5, alpha=0.6)
        ax2.set_ylabel("output tokens/s", color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
