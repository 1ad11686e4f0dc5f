"""S2 of issue 3: the real Azure code trace, open loop, with latency SLOs, on a 4x A100 node (TP4).

Model: OLMoE-1B-7B at the FULL trace rate (8,819 requests over 57 min; 2.57 req/s on average, very bursty,
mean prompt 2,048 tokens, mean output 28). Why this model: it is one of the five measured A100 MoE models
and the trace does not overload it (default policy: ~99.7% of requests meet both SLOs), so that SLO
attainment measures the policies, not an overload. Mixtral-8x7B on a 1-of-2 round-robin share of the trace
(the main job's setting) is overloaded by the trace's bursts: the default policy meets both SLOs for only
~45% of requests (measured, 2026-11-22), which makes "SLO attainment no worse than default" meaningless.

SLOs (stated): TTFT <= 2 s and TPOT <= 100 ms, a request meets the SLO when it meets both (TPOT judged only
with more than one output token). 100 ms TPOT is ~3x OLMoE's batch-64 decode step at the top cap (33 ms)
and the loose end of interactive-chat SLOs (DynamoLLM, HPCA 2025; Splitwise, ISCA 2024 use similar).

Model mismatch (issue 3, item 5): the truth is perturbed with ``Perturbation.for_requests`` of the trace
(mean KV context of this prompt mix vs the profiling mix: throughput x0.87, power x1.05), so the
controller's profile is >= 10% off, workload-dependently.

Budgets: none, and a GPU budget that binds (1,300 W for 4 GPUs = 325 W per GPU: the default policy's 1 s
summed GPU power exceeds it during prefill bursts). Tighter budgets cost every policy SLO attainment
whatever it does: at 1,200 W every budget-respecting policy loses 1.6 pp of SLO attainment vs default
(98.07% vs 99.67%, full trace), at 800 W (200 W/GPU) ~17 pp (83% vs 99%, first 20 min)
(prefill slows with the clock, and prefill chunks interleaved with decode
push TPOT past 100 ms), so no policy can meet "within 1 pp of default" there (measured, 2026-11-22).

Figures per policy: GPU energy per output token and per token (prompt + output), SLO attainment, energy
saving vs default, and for pals the fraction of the SLO-aware references' savings: ``slo-oracle`` (a greedy
windowed hindsight search on forked simulations, pals_daemon/replay/slo_oracle.py) and the best STATIC (cap,
batch 64) in hindsight whose SLO attainment is within 1 percentage point of default's (found by replaying each
static cap). The throughput oracle (``tput-oracle``) is SLO-blind on TTFT (its "saving" came partly from SLO
violations) and is no longer in this table.

    python bench/scenario_s2.py --out out/bench/s2          # full trace (~3-4 min on one core)
    python bench/scenario_s2.py --out out/bench/s2 --quick  # 10 simulated minutes
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.types import EngineTargets
from pals_daemon.model.profile import load_profiles
from pals_daemon.replay.policies import POLICIES, SLO_BLIND_POLICIES
from pals_daemon.replay.report import plot_runs, write_json
from pals_daemon.replay.scenario import Budget, EngineSpec, Scenario, TraceLoad
from pals_daemon.replay.simulate import PolicyRun, prepare, run_policy
from pals_daemon.server.daemon import default_profiles_dir
from pals_daemon.sim.truth import Perturbation

# The SLO table's policies: the SLO-blind throughput oracle out, the SLO-aware oracle in.
S2_POLICIES = (*(p for p in POLICIES if p not in SLO_BLIND_POLICIES), "slo-oracle")
MODEL = "olmoe-1b-7b"
TTFT_SLO_MS = 2000.0
TPOT_SLO_MS = 100.0
# Binding GPU budget (sum of the 4 limits): 325 W per GPU.
BINDING_BUDGET_W = 1300.0
FULL_DURATION_S = 3436.0 + 60.0  # last arrival at 3,436 s; 60 s to drain
QUICK_DURATION_S = 600.0
WARMUP_S = 30.0
# Static caps tried for the SLO-feasible hindsight reference (batch 64, the configured maximum).
STATIC_CAPS_W = (250.0, 275.0, 300.0, 325.0, 350.0)
SLO_TOLERANCE = 0.01  # pals may be at most 1 percentage point below default's SLO attainment


def engine(trace: str | None = None) -> EngineSpec:
    """The S2 engine: OLMoE-1B-7B on 4 A100s, the full Azure code trace, SLOs, workload-dependent mismatch."""
    load = TraceLoad() if trace is None else TraceLoad(path=trace)
    targets = EngineTargets(ttft_ms=TTFT_SLO_MS, tpot_ms=TPOT_SLO_MS)
    base = EngineSpec("engine0", MODEL, load, targets)
    return replace(base, perturbation=Perturbation.for_requests(base.requests(math.inf)))


def _row(run: PolicyRun) -> dict[str, Any]:
    e = run.engines[0]
    out_tok = e.output_tokens
    all_tok = e.output_tokens + e.prompt_tokens
    return {
        "j_per_output_token": run.gpu_energy_j / out_tok if out_tok else None,
        "j_per_token_all": run.gpu_energy_j / all_tok if all_tok else None,
        "server_j_per_output_token": run.server_energy_j / out_tok if out_tok else None,
        "slo_attainment": e.slo_attainment,
        "ttft_p90_ms": e.ttft_p90_ms,
        "tpot_p90_ms": e.tpot_p90_ms,
        "requests_finished": e.requests_finished,
        "output_tokens": out_tok,
        "prompt_tokens": e.prompt_tokens,
        "gpu_energy_j": run.gpu_energy_j,
        "mean_gpu_power_w": run.gpu_energy_j / run.duration_s,
        "time_over_budget_s": run.time_over_budget_s,
        "limit_over_budget_ticks": run.limit_over_budget_ticks,
        "wall_s": run.wall_s,
    }


def run_case(
    sc: Scenario, registry: Any, config: ControllerConfig, static_caps: tuple[float, ...], plots: Path | None
) -> dict[str, Any]:
    """Every policy on ``sc`` plus the static sweep; savings vs default and pals' share of the references'."""
    prep = prepare(sc)
    runs = {p: run_policy(sc, p, registry, prep, config=config) for p in S2_POLICIES}
    rows = {p: _row(r) for p, r in runs.items()}
    d = rows["default"]
    for r in rows.values():
        r["saving_vs_default"] = 1 - r["j_per_output_token"] / d["j_per_output_token"]
        r["slo_delta_pp_vs_default"] = 100 * (r["slo_attainment"] - d["slo_attainment"])
    statics = {}
    for cap in static_caps:
        cfg = replace(config, fixed_cap_w=cap, fixed_batch=64)
        r = _row(run_policy(sc, "pals", registry, prep, config=cfg))
        r["saving_vs_default"] = 1 - r["j_per_output_token"] / d["j_per_output_token"]
        r["slo_delta_pp_vs_default"] = 100 * (r["slo_attainment"] - d["slo_attainment"])
        statics[f"{cap:.0f}W/b64"] = r
    feasible = {k: v for k, v in statics.items() if v["slo_attainment"] >= d["slo_attainment"] - SLO_TOLERANCE}
    best_static = min(feasible.items(), key=lambda kv: kv[1]["j_per_output_token"]) if feasible else None
    pals, oracle = rows["pals"], rows["slo-oracle"]
    others = [p for p in S2_POLICIES if p not in ("pals", "slo-oracle")]
    goals = {
        "pals_lowest_j_per_token_of_non_oracle": all(
            pals["j_per_output_token"] <= rows[p]["j_per_output_token"] for p in others
        ),
        "pals_slo_within_1pp_of_default": pals["slo_attainment"] >= d["slo_attainment"] - SLO_TOLERANCE,
        "pals_fraction_of_slo_oracle_saving": (
            pals["saving_vs_default"] / oracle["saving_vs_default"] if oracle["saving_vs_default"] > 0 else None
        ),
        "pals_fraction_of_best_feasible_static_saving": (
            pals["saving_vs_default"] / best_static[1]["saving_vs_default"]
            if best_static and best_static[1]["saving_vs_default"] > 0
            else None
        ),
    }
    if plots is not None:
        plot_runs(runs, plots, sc.name)
    return {
        "scenario": sc.name,
        "budget_w": sc.budget.at(0.0),
        "policies": rows,
        "static": statics,
        "best_feasible_static": None if best_static is None else best_static[0],
        "goals": goals,
    }


def _f(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def format_case(case: dict[str, Any]) -> str:
    """A fixed-width table of one S2 case."""
    b = case["budget_w"]
    lines = [
        f"\nS2 {MODEL}, Azure code trace, budget {'none' if b is None else f'{b:.0f} W GPU'}; "
        f"SLO TTFT <= {TTFT_SLO_MS:.0f} ms and TPOT <= {TPOT_SLO_MS:.0f} ms",
        f"{'policy':<14}{'J/out tok':>10}{'J/tok all':>10}{'SLO att':>9}{'dSLO pp':>8}{'saving':>8}"
        f"{'TTFT p90':>9}{'TPOT p90':>9}{'mean W':>8}{'over s':>7}",
    ]
    items = list(case["policies"].items()) + [(f"static {k}", v) for k, v in case["static"].items()]
    for name, r in items:
        mark = " *" if name == f"static {case['best_feasible_static']}" else ""
        lines.append(
            f"{name:<14}{_f(r['j_per_output_token'], '.3f'):>10}{_f(r['j_per_token_all'], '.4f'):>10}"
            f"{_f(r['slo_attainment'], '.4f'):>9}{_f(r['slo_delta_pp_vs_default'], '+.2f'):>8}"
            f"{_f(100 * r['saving_vs_default'], '.1f') + '%':>8}{_f(r['ttft_p90_ms'], '.0f'):>9}"
            f"{_f(r['tpot_p90_ms'], '.1f'):>9}{_f(r['mean_gpu_power_w'], '.0f'):>8}"
            f"{_f(r['time_over_budget_s'], '.1f'):>7}{mark}"
        )
    g = case["goals"]
    lines.append(
        f"goals: pals lowest J/token of non-oracle: {g['pals_lowest_j_per_token_of_non_oracle']}; "
        f"SLO within 1 pp of default: {g['pals_slo_within_1pp_of_default']}; "
        f"pals / slo-oracle saving: {_f(g['pals_fraction_of_slo_oracle_saving'], '.2f')}; "
        f"pals / best SLO-feasible static saving (*): {_f(g['pals_fraction_of_best_feasible_static_saving'], '.2f')}"
    )
    return "\n".join(lines)


def run(
    out_dir: str | Path,
    quick: bool = False,
    config: ControllerConfig | None = None,
    plots: bool = True,
    static_caps: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """S2 with no budget and a binding one; writes s2.json (and PNGs) under ``out_dir``; returns the figures."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    registry = load_profiles(str(default_profiles_dir()))
    cfg = config if config is not None else ControllerConfig(gpu_kind="A100-SXM4")
    duration = QUICK_DURATION_S if quick else FULL_DURATION_S
    caps = static_caps if static_caps is not None else (() if quick else STATIC_CAPS_W)
    eng = engine()
    cases = []
    for name, budget in (("s2-nobudget", Budget()), (f"s2-{BINDING_BUDGET_W:.0f}W", Budget.constant(BINDING_BUDGET_W))):
        sc = Scenario(name, (eng,), duration_s=duration, budget=budget, warmup_s=WARMUP_S)
        # The static sweep runs without a budget only (under the budget a static cap above 300 W is clipped).
        case = run_case(sc, registry, cfg, caps if budget.at(0.0) is None else (), out / "plots" if plots else None)
        print(format_case(case))
        cases.append(case)
    if plots:
        _plot_summary(cases, out / "s2_summary.png")
    result = {
        "model": MODEL,
        "trace": "data/azure_llm_code_2023.csv",
        "ttft_slo_ms": TTFT_SLO_MS,
        "tpot_slo_ms": TPOT_SLO_MS,
        "perturbation": {
            "throughput_factor": eng.perturbation.throughput_factor,
            "power_factor": eng.perturbation.power_factor,
        },
        "duration_s": duration,
        "quick": quick,
        "controller_config_overrides": {
            k: v for k, v in vars(cfg).items() if getattr(ControllerConfig(gpu_kind="A100-SXM4"), k) != v
        },
        "cases": cases,
        "wall_s": time.perf_counter() - t0,
    }
    write_json(result, out / "s2.json")
    print(f"S2 wall time {result['wall_s']:.0f} s", file=sys.stderr)
    return result


def _plot_summary(cases: list[dict[str, Any]], path: Path) -> None:
    """J per output token and SLO attainment per policy, one group per budget case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(S2_POLICIES)
    for k, p in enumerate(S2_POLICIES):
        xs = [i + k * width for i in range(len(cases))]
        ax1.bar(xs, [c["policies"][p]["j_per_output_token"] for c in cases], width, label=p)
        ax2.bar(xs, [100 * c["policies"][p]["slo_attainment"] for c in cases], width, label=p)
    labels = ["no budget" if c["budget_w"] is None else f"{c['budget_w']:.0f} W" for c in cases]
    for ax in (ax1, ax2):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], labels)
    ax1.set_ylabel("GPU J per output token")
    ax2.set_ylabel("SLO attainment (%)")
    ax2.set_ylim(80, 100.5)
    ax1.legend(fontsize=7, ncol=2)
    fig.suptitle(f"S2: {MODEL}, Azure code trace, TTFT<={TTFT_SLO_MS / 1000:.0f}s TPOT<={TPOT_SLO_MS:.0f}ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point: table on stdout, s2.json and PNGs under --out."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench/s2")
    ap.add_argument("--quick", action="store_true", help="10 simulated minutes, no static sweep")
    ap.add_argument("--no-plots", dest="plots", action="store_false")
    ap.add_argument(
        "--controller-set", action="append", default=[], metavar="FIELD=VALUE", help="TUNING: override ControllerConfig"
    )
    args = ap.parse_args(argv)
    overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.controller_set)}
    run(args.out, args.quick, ControllerConfig(gpu_kind="A100-SXM4", **overrides), args.plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
