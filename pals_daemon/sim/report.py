"""Figures and plots of simulated-node runs (the main job's output)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from pals_daemon.sim.node import SimNodeResult


def summarize(result: SimNodeResult, ttft_slo_ms: float | None, tpot_slo_ms: float | None) -> dict[str, Any]:
    """The per-run figures as plain data."""
    tpot = np.asarray(result.tpot_ms)
    ttft = np.asarray(result.ttft_ms)
    slo_ok = None
    if len(ttft):
        ok = np.ones(len(ttft), dtype=bool)
        if ttft_slo_ms is not None:
            ok &= ttft <= ttft_slo_ms
        slo_ok = float(ok.mean())
    return {
        "policy": "pals" if result.spec.mode == "enforce" else "default (advise mode: nothing changed)",
        "simulated_s": round(result.duration_s, 1),
        "requests_finished": result.requests_finished,
        "requests_arrived": result.requests_arrived,
        "output_tokens": result.output_tokens,
        "prompt_tokens": result.prompt_tokens,
        "gpu_energy_j": round(result.gpu_energy_j, 1),
        "output_tokens_per_j": round(result.tokens_per_joule, 4),
        "all_tokens_per_j": round((result.output_tokens + result.prompt_tokens) / result.gpu_energy_j, 3)
        if result.gpu_energy_j > 0
        else 0.0,
        "qos_violation_windows": result.qos_violations,
        "qos_windows": result.qos_windows,
        "time_over_budget_s": round(result.time_over_budget_s(), 1),
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p90_ms": _pct(ttft, 90),
        "tpot_p50_ms": _pct(tpot, 50),
        "tpot_p90_ms": _pct(tpot, 90),
        "tpot_slo_attainment": float((tpot <= tpot_slo_ms).mean()) if tpot_slo_ms and len(tpot) else None,
        "ttft_slo_attainment": slo_ok,
        "power_limit_writes": result.limit_calls,
    }


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def format_table(rows: list[dict[str, Any]]) -> str:
    """Side-by-side table of summaries (one column per run)."""
    keys = [k for k in rows[0] if k != "policy"]
    width = max(len(k) for k in keys)
    lines = [f"{'':<{width}}  " + "  ".join(f"{r['policy'][:22]:>22}" for r in rows)]
    for k in keys:
        cells = []
        for r in rows:
            v = r[k]
            cells.append(f"{'-' if v is None else (f'{v:.4g}' if isinstance(v, float) else v):>22}")
        lines.append(f"{k:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


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
        title = "pals (enforce)" if result.spec.mode == "enforce" else "default (advise: no change)"
        ax = axes[0][col]
        ax.plot(t_min, [x.node_power_w for x in s], lw=0.8, label="GPU power (sum of 1 s averages)")
        budget = [np.nan if x.budget_w is None else x.budget_w for x in s]
        ax.plot(t_min, budget, "r--", lw=1.5, label="budget")
        ax.set_ylabel("W")
        ax.set_title(f"{title}: {result.spec.model}, {result.tokens_per_joule:.3f} tokens/J")
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
