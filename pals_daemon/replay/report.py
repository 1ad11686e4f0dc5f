"""Figures of replay runs: a summary (plain data for JSON), a text table and PNG plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pals_daemon.replay.simulate import EngineResult, PolicyRun


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, nd)


def _engine_row(e: EngineResult, duration_s: float) -> dict[str, Any]:
    return {
        "engine_id": e.engine_id,
        "model": e.model,
        "gpus": list(e.gpu_indices),
        "output_tokens": e.output_tokens,
        "prompt_tokens": e.prompt_tokens,
        "tokens_per_s": _round(e.output_tokens / duration_s if duration_s > 0 else 0.0, 1),
        "target_tokens_per_s": _round(e.target_tokens_per_s, 1),
        "gpu_energy_j": round(e.gpu_energy_j, 1),
        "server_energy_j": round(e.server_energy_j, 1),
        "tokens_per_j": _round(e.tokens_per_j, 5),
        "qos_windows": e.qos_windows,
        "qos_violations": e.qos_violations,
        "qos_violation_fraction": _round(e.qos_violation_fraction),
        "slo_attainment": _round(e.slo_attainment),
        "ttft_p90_ms": _round(e.ttft_p90_ms, 1),
        "tpot_p90_ms": _round(e.tpot_p90_ms, 1),
        "requests_finished": e.requests_finished,
    }


def summarize(runs: Mapping[str, PolicyRun]) -> dict[str, Any]:
    """Per policy: node and per-engine figures, gain vs default and % of the oracle on tokens/J."""
    default = runs.get("default")
    oracle = runs.get("tput-oracle")
    out: dict[str, Any] = {"policies": {}}
    for name, run in runs.items():
        node = {
            "output_tokens": run.output_tokens,
            "gpu_energy_j": round(run.gpu_energy_j, 1),
            "server_energy_j": round(run.server_energy_j, 1),
            "tokens_per_j": _round(run.tokens_per_j, 5),
            "server_tokens_per_j": _round(_ratio(run.output_tokens, run.server_energy_j), 5),
            "gain_vs_default": _round(_ratio(run.tokens_per_j, default.tokens_per_j) if default else None),
            "pct_of_oracle": _round(100 * _ratio(run.tokens_per_j, oracle.tokens_per_j) if oracle else None, 2),
            "qos_violation_fraction": _round(
                _ratio(sum(e.qos_violations for e in run.engines), sum(e.qos_windows for e in run.engines)) or 0.0
            ),
            "time_over_budget_s": round(run.time_over_budget_s, 2),
            "longest_excursion_s": round(run.longest_excursion_s, 2),
            "limit_over_budget_ticks": run.limit_over_budget_ticks,
            "max_limit_excess_w": round(run.max_limit_excess_w, 3),
            "duration_s": run.duration_s,
            "wall_s": round(run.wall_s, 3),
            "speed_x_real_time": _round(run.speed_x, 1),
        }
        engines = []
        for i, e in enumerate(run.engines):
            row = _engine_row(e, run.duration_s)
            d = default.engines[i] if default else None
            o = oracle.engines[i] if oracle else None
            row["gain_vs_default"] = _round(_ratio(e.tokens_per_j, d.tokens_per_j) if d else None)
            row["pct_of_oracle"] = _round(100 * _ratio(e.tokens_per_j, o.tokens_per_j) if o else None, 2)
            engines.append(row)
        out["policies"][name] = {"node": node, "engines": engines}
    return out


def format_table(summary: Mapping[str, Any], title: str = "") -> str:
    """A fixed-width table: one row per (policy, engine) and one per (policy, node)."""
    cols = (
        ("policy", 10, "s"),
        ("scope", 26, "s"),
        ("tokens", 10, "d"),
        ("GPU J", 11, ".4g"),
        ("server J", 11, ".4g"),
        ("tok/J", 8, ".4f"),
        ("x default", 9, ".3f"),
        ("% oracle", 8, ".1f"),
        ("QoS viol", 8, ".3f"),
        ("SLO att", 7, ".3f"),
        ("over s", 7, ".1f"),
        ("longest", 7, ".1f"),
    )
    lines = [title] if title else []
    lines.append(" ".join(f"{c:>{w}}" if i > 1 else f"{c:<{w}}" for i, (c, w, _) in enumerate(cols)))

    def fmt(v: Any, w: int, f: str, left: bool) -> str:
        if v is None or v == "":
            return " " * w
        s = format(v, f) if f != "s" else str(v)
        return f"{s:<{w}}" if left else f"{s:>{w}}"

    for name, pol in summary["policies"].items():
        for e in pol["engines"]:
            vals = (
                name,
                f"{e['engine_id']} ({e['model'][:14]})",
                e["output_tokens"],
                e["gpu_energy_j"],
                e["server_energy_j"],
                e["tokens_per_j"],
                e["gain_vs_default"],
                e["pct_of_oracle"],
                e["qos_violation_fraction"],
                e["slo_attainment"],
                None,
                None,
            )
            lines.append(" ".join(fmt(v, w, f, i < 2) for i, (v, (_, w, f)) in enumerate(zip(vals, cols, strict=True))))
        n = pol["node"]
        vals = (
            name,
            "node",
            n["output_tokens"],
            n["gpu_energy_j"],
            n["server_energy_j"],
            n["tokens_per_j"],
            n["gain_vs_default"],
            n["pct_of_oracle"],
            n["qos_violation_fraction"],
            None,
            n["time_over_budget_s"],
            n["longest_excursion_s"],
        )
        lines.append(" ".join(fmt(v, w, f, i < 2) for i, (v, (_, w, f)) in enumerate(zip(vals, cols, strict=True))))
    return "\n".join(lines)


def write_json(data: Mapping[str, Any], path: str | Path) -> None:
    """Write ``data`` as indented JSON (parents created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def plot_runs(runs: Mapping[str, PolicyRun], out_dir: str | Path, prefix: str = "replay") -> list[Path]:
    """Three PNGs: tokens/J per policy; GPU power vs budget over time; caps and batch limits over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    names = list(runs)
    fig, ax = plt.subplots(figsize=(7, 4))
    vals = [runs[n].tokens_per_j for n in names]
    bars = ax.bar(names, vals, color=["#888" if n in ("default", "tput-oracle") else "#3a7" for n in names])
    for b, v in zip(bars, vals, strict=True):
        ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("output tokens / J (GPU energy)")
    ax.set_title(f"{prefix}: tokens per joule by policy")
    fig.tight_layout()
    p = out / f"{prefix}_tokens_per_j.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(9, 4))
    for n in names:
        tl = runs[n].timeline
        ax.plot(tl.t_s, tl.gpu_power_w, lw=0.8, label=n)
    first = runs[names[0]].timeline
    ax.plot(first.t_s, first.budget_w, "k--", lw=1.2, label="budget")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("sum of GPU power, 1 s avg (W)")
    ax.legend(fontsize=7, ncol=4)
    ax.set_title(f"{prefix}: node GPU power vs budget")
    fig.tight_layout()
    p = out / f"{prefix}_power.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for n in names:
        tl = runs[n].timeline
        for eid in tl.cap_w:
            label = f"{n}/{eid}" if len(tl.cap_w) > 1 else n
            ax1.plot(tl.t_s, tl.cap_w[eid], lw=0.8, label=label)
            ax2.plot(tl.t_s, tl.batch[eid], lw=0.8, label=label)
    ax1.set_ylabel("power limit per GPU (W)")
    ax2.set_ylabel("batch limit (max_num_seqs)")
    ax2.set_xlabel("simulated time (s)")
    ax1.legend(fontsize=7, ncol=4)
    ax1.set_title(f"{prefix}: caps and batch limits")
    fig.tight_layout()
    p = out / f"{prefix}_limits.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def plot_slo_case(
    runs: Mapping[str, PolicyRun],
    path: str | Path,
    title: str,
    ttft_slo_ms: float | None,
    tpot_slo_ms: float | None,
    window_s: float = 30.0,
) -> Path:
    """One PNG per SLO case: node GPU power (and budget), engine0's cap and batch limit, and p90 TTFT / TPOT
    per ``window_s`` window against the SLOs, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pals_daemon.replay.latency import window_p90

    fig, axes = plt.subplots(5, 1, figsize=(10, 12), sharex=True)
    ax_p, ax_c, ax_b, ax_t, ax_o = axes
    budget_drawn = False
    for name, run in runs.items():
        tl = run.timeline
        ax_p.plot(tl.t_s, tl.gpu_power_w, lw=0.7, label=name)
        if not budget_drawn and any(math.isfinite(b) for b in tl.budget_w):
            ax_p.plot(tl.t_s, tl.budget_w, "k--", lw=1.2, label="budget")
            budget_drawn = True
        eid = next(iter(tl.cap_w), None)
        if eid is not None:
            ax_c.plot(tl.t_s, tl.cap_w[eid], lw=0.9, label=name)
            ax_b.plot(tl.t_s, tl.batch[eid], lw=0.9, label=name)
        if run.engines:
            w = window_p90(run.engines[0].finished, run.run_s, window_s)
            ax_t.step(w.t_s, w.ttft_p90_ms / 1000.0, where="post", lw=0.9, label=name)
            ax_o.step(w.t_s, w.tpot_p90_ms, where="post", lw=0.9, label=name)
    if ttft_slo_ms is not None:
        ax_t.axhline(ttft_slo_ms / 1000.0, color="r", ls=":", lw=1.2, label="SLO")
    if tpot_slo_ms is not None:
        ax_o.axhline(tpot_slo_ms, color="r", ls=":", lw=1.2, label="SLO")
    ax_t.set_yscale("log")
    ax_o.set_yscale("log")
    ax_p.set_ylabel("node GPU power (W)")
    ax_c.set_ylabel("cap per GPU (W)")
    ax_b.set_ylabel("batch limit")
    ax_t.set_ylabel(f"p90 TTFT (s, {window_s:.0f} s win)")
    ax_o.set_ylabel(f"p90 TPOT (ms, {window_s:.0f} s win)")
    ax_o.set_xlabel("simulated time (s)")
    ax_p.legend(fontsize=7, ncol=5)
    ax_t.legend(fontsize=7, ncol=5)
    ax_p.set_title(title, fontsize=9)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p
