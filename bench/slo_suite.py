"""The latency-SLO evaluation suite of issue 9: pals against SLO-respecting references, side by side.

Cases: MoE models (A100-SXM4 profiles, 4 GPUs, tensor parallel 4) x load levels x traces x budgets.

Policies per case: ``default`` (400 W, configured batch 64), ``best-static`` (the static (cap, batch) of least
GPU energy per output token whose SLO attainment is within 1 pp of default's, found by replaying a grid:
caps every 25 W from 100 W to 400 W x batches {64, 32, 16, 8}; with a budget only caps within its uniform
share), ``slo-oracle`` (greedy windowed hindsight search on forked simulations: pals_daemon/replay/slo_oracle.py;
NOT a global optimum) and ``pals`` (whatever the controller in pals_daemon/replay/policies.py is when run).
The throughput oracle (``tput-oracle``) is SLO-blind and is not in this table.

Traces (request sizes and burst structure; the rate is set per load level):
- ``azure-code``: data/azure_llm_code_2023.csv, its first requests with their timeline scaled to the level's
  mean rate (bursts kept; the trace loops where it runs out).
- ``azure-week-shape``: Poisson arrivals whose rate follows the first 24 h of the coding service's
  requests-per-minute shape (data/azure_llm_2024_week_load_shape_digitized.csv, digitized) mapped onto the
  case's duration, at the level's mean rate; request sizes resampled (seeded, with replacement) from the
  Azure code trace (the same service kind).
- ``mooncake``: data/mooncake_synthetic_fast25.csv (long prompts, mean 15,325 input / 149 output tokens),
  timeline scaled to the level's mean rate.

Load levels, from each model's MEASURED capacity, the same rule for every model and trace: capacity is the
requests/s the default configuration completes when saturated with the trace's request mix (a replay with
every request queued, ``traffic.measure_capacity_req_per_s``); a level sets the trace's 95th percentile of the
30 s arrival rate to a fraction of it: light 0.3, near capacity 0.75, overloaded 1.5 (so a bursty trace gets a
lower mean rate than a smooth one at the same level; the Azure code trace's bursts are shorter than 30 s, so
"near" already breaks the SLO for a share of its requests).

SLOs per model (TTFT / TPOT; a request meets the SLO when it meets both, TPOT judged with > 1 output token):
the issue's, from interactive-serving practice: OLMoE-1B-7B 2 s / 100 ms, Qwen1.5-MoE-A2.7B 2 s / 100 ms,
DeepSeek-MoE-16B 3 s / 150 ms, Mixtral-8x7B 3 s / 250 ms (its batch-64 step at 400 W: 147 ms), and, on
purpose, an INFEASIBLE case: Mixtral-8x7B with TPOT 10 ms, below its batch-1 decode step at 400 W (12.1 ms,
sim truth), run on the Azure code trace without a budget.

Budgets: none, and a binding GPU budget of 1,000 W (250 W per GPU; the default policy's sum of limits is
1,600 W). Under the budget the "default" of the table and of the verdict is the default held to the budget
(static-cap: every GPU at the uniform share, configured batch); the unmanaged default, which ignores the
budget, is kept in the JSON as ``default-ignoring-budget``, never as a reference.

Model mismatch: the truth is perturbed by the case's prompt mix (``Perturbation.for_requests``, as S2).

Acceptance of issue 9, per case: where default meets the SLO for >= 90% of requests, pals's J per output
token <= best-static's at SLO attainment within 1 pp of default's (goal beyond: 1.1x best-static's saving);
where it cannot (default < 90%), pals's J per output token <= default's and its SLO attainment within 1 pp
of default's or better; with a budget also: never over it (sum of limits, every tick).

    python bench/slo_suite.py --out out/bench/slo_suite            # full (4 models x 3 loads x 3 traces x 2)
    python bench/slo_suite.py --quick --out out/bench/slo_quick    # 3 models x 3 loads x 1 trace x 5 min
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.types import EngineTargets
from pals_daemon.model.profile import load_profiles
from pals_daemon.replay.latency import prediction_error
from pals_daemon.replay.references import (
    BEST_STATIC,
    SLO_TOLERANCE,
    Job,
    default_workers,
    pick_best_static,
    policy_row,
    run_jobs,
    scenario_inputs,
    static_grid,
)
from pals_daemon.replay.report import plot_slo_case, write_json
from pals_daemon.replay.scenario import Budget, EngineSpec, Scenario, TraceLoad
from pals_daemon.replay.simulate import PolicyRun, Prepared
from pals_daemon.replay.traffic import at_mean_rate, load_shape, measure_capacity_req_per_s, shaped_requests
from pals_daemon.server.daemon import default_profiles_dir
from pals_daemon.sim.engine import Request
from pals_daemon.sim.trace import load_trace_csv
from pals_daemon.sim.truth import Perturbation, load_a100_truth

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"

# Model -> (TTFT SLO ms, TPOT SLO ms): issue 9's table of cases.
SLOS: dict[str, tuple[float, float]] = {
    "olmoe-1b-7b": (2000.0, 100.0),
    "qwen1.5-moe-a2.7b": (2000.0, 100.0),
    "deepseek-moe-16b-base": (3000.0, 150.0),
    "mixtral-8x7b-instruct": (3000.0, 250.0),
}
# The infeasible case: TPOT below Mixtral's batch-1 decode step at 400 W (12.1 ms in the sim truth).
INFEASIBLE = ("mixtral-8x7b-instruct", 3000.0, 10.0)
QUICK_MODELS = ("olmoe-1b-7b", "qwen1.5-moe-a2.7b", "mixtral-8x7b-instruct")
# Level -> p95 of the 30 s arrival rate as a fraction of the measured capacity.
# Measured (2026-12-06, default policy, Azure code trace, 5 min): at 0.3 the default meets the SLO for >= 95%
# of requests with every model; at 0.5 Qwen drops to 61% and Mixtral to 75% (its bursts are sub-30 s).
LEVELS: dict[str, float] = {"light": 0.3, "near": 0.75, "over": 1.5}
RATE_WINDOW_S = 30.0
RATE_PERCENTILE = 95.0
TRACES = ("azure-code", "azure-week-shape", "mooncake")
BINDING_BUDGET_W = 1000.0
NUM_GPUS = 4
GPU_KIND = "A100-SXM4"
MAX_NUM_SEQS = 64
MAX_NUM_BATCHED_TOKENS = 8192
FULL_ARRIVALS_S = 600.0
QUICK_ARRIVALS_S = 300.0
DRAIN_S = 60.0
WARMUP_S = 30.0
DEFAULT_MEETS = 0.90
SEED = 0
# Quick mode's static grid (the full one: references.static_grid's 25 W x {64, 32, 16, 8}).
QUICK_CAP_STEP_W = 50.0
QUICK_BATCHES = (16,)
# Issue 9's goal beyond parity: 1.1x best-static's saving.
GOAL_SAVING_RATIO = 1.1


@dataclass(frozen=True)
class Case:
    """One row of the suite."""

    name: str
    model: str
    trace: str
    level: str
    budget_w: float | None
    ttft_slo_ms: float
    tpot_slo_ms: float
    infeasible: bool = False


def trace_sizes() -> dict[str, list[Request]]:
    """The real traces: Azure code (also the week shape's sizes) and Mooncake."""
    az = load_trace_csv(DATA / "azure_llm_code_2023.csv")
    mc = load_trace_csv(DATA / "mooncake_synthetic_fast25.csv", "timestamp_s", "input_tokens", "output_tokens")
    return {"azure-code": az, "azure-week-shape": az, "mooncake": mc}


def arrivals(trace: str, sizes: Sequence[Request], rate: float, duration_s: float) -> list[Request]:
    """The trace's requests at mean ``rate`` over ``duration_s``."""
    if trace == "azure-week-shape":
        mins, rpm = load_shape(DATA / "azure_llm_2024_week_load_shape_digitized.csv", "coding", hours=24.0)
        return shaped_requests(mins, rpm, sizes, rate, duration_s, seed=SEED)
    return at_mean_rate(sizes, rate, duration_s)


def peak_rate(reqs: Sequence[Request], duration_s: float) -> float:
    """The 95th percentile of the 30 s arrival rate (req/s)."""
    t = np.array([r.arrival_s for r in reqs])
    counts = np.histogram(t, bins=np.arange(0.0, duration_s + RATE_WINDOW_S, RATE_WINDOW_S))[0]
    return float(np.percentile(counts, RATE_PERCENTILE)) / RATE_WINDOW_S


def rate_for_level(trace: str, sizes: Sequence[Request], peak_req_s: float, duration_s: float) -> float:
    """The mean rate whose 30 s p95 rate is ``peak_req_s`` (fixed point: the burst ratio depends a little on
    which stretch of the trace the rate selects)."""
    rate = peak_req_s
    for _ in range(4):
        ratio = peak_rate(arrivals(trace, sizes, rate, duration_s), duration_s) / rate
        rate = peak_req_s / max(ratio, 1e-9)
    return rate


def build_cases(args: argparse.Namespace) -> list[Case]:
    """The case list from the command line."""
    cases = []
    budgets: list[float | None] = [None, BINDING_BUDGET_W] if "binding" in args.budgets else [None]
    if "none" not in args.budgets:
        budgets = [BINDING_BUDGET_W]
    for model in args.models:
        ttft, tpot = SLOS[model]
        for trace in args.traces:
            for level in args.loads:
                for b in budgets:
                    tag = "nobudget" if b is None else f"{b:.0f}W"
                    cases.append(Case(f"{model}-{trace}-{level}-{tag}", model, trace, level, b, ttft, tpot))
    if args.infeasible:
        model, ttft, tpot = INFEASIBLE
        for level in args.loads:
            cases.append(
                Case(
                    f"{model}-tpot{tpot:.0f}ms-azure-code-{level}-nobudget",
                    model,
                    "azure-code",
                    level,
                    None,
                    ttft,
                    tpot,
                    True,
                )
            )
    return cases


def prepare_cases(
    cases: Sequence[Case], arrivals_s: float
) -> tuple[dict[str, tuple[Scenario, Prepared]], dict[str, dict[str, Any]]]:
    """Scenarios, truths and requests per case (built once here, shared with the workers), and their inputs."""
    sizes = trace_sizes()
    capacity: dict[tuple[str, str], tuple[float, Perturbation]] = {}
    built: dict[str, tuple[Scenario, Prepared]] = {}
    inputs: dict[str, dict[str, Any]] = {}
    for c in cases:
        key = (c.model, c.trace)
        if key not in capacity:
            pert = Perturbation.for_requests(sizes[c.trace])
            truth = load_a100_truth(c.model, perturbation=pert)
            cap = measure_capacity_req_per_s(truth, sizes[c.trace], GPU_KIND, MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS)
            capacity[key] = (cap, pert)
        cap, pert = capacity[key]
        peak = LEVELS[c.level] * cap
        rate = rate_for_level(c.trace, sizes[c.trace], peak, arrivals_s)
        reqs = arrivals(c.trace, sizes[c.trace], rate, arrivals_s)
        truth = load_a100_truth(c.model, perturbation=pert)
        eng = EngineSpec(
            "engine0",
            c.model,
            TraceLoad(path=str(DATA / "azure_llm_code_2023.csv")),  # descriptive only: requests are prepared here
            EngineTargets(ttft_ms=c.ttft_slo_ms, tpot_ms=c.tpot_slo_ms),
            num_gpus=NUM_GPUS,
            gpu_kind=GPU_KIND,
            max_num_seqs=MAX_NUM_SEQS,
            max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
            perturbation=pert,
        )
        budget = Budget.constant(c.budget_w) if c.budget_w is not None else Budget()
        sc = Scenario(c.name, (eng,), duration_s=arrivals_s + DRAIN_S, budget=budget, warmup_s=WARMUP_S)
        built[c.name] = (sc, Prepared({"engine0": truth}, {"engine0": reqs}))
        native = len(sizes[c.trace]) / max(1e-9, sizes[c.trace][-1].arrival_s - sizes[c.trace][0].arrival_s)
        inp = scenario_inputs(sc)
        inp["engines"][0]["load"] = {"kind": "prepared", "trace": c.trace, "requests": len(reqs)}
        inputs[c.name] = {
            **inp,
            "model": c.model,
            "trace": c.trace,
            "trace_file": _trace_file(c.trace),
            "load_level": c.level,
            "level_fraction_of_capacity_p95_30s": LEVELS[c.level],
            "capacity_req_per_s": cap,
            "mean_rate_req_per_s": rate,
            "share_of_native_rate": rate / native,
            "ttft_slo_ms": c.ttft_slo_ms,
            "tpot_slo_ms": c.tpot_slo_ms,
            "infeasible_on_purpose": c.infeasible,
            "budget_w": c.budget_w,
            "arrivals_s": arrivals_s,
        }
    return built, inputs


def _trace_file(trace: str) -> str:
    if trace == "mooncake":
        return "data/mooncake_synthetic_fast25.csv"
    if trace == "azure-week-shape":
        return (
            "data/azure_llm_2024_week_load_shape_digitized.csv (coding, first 24 h), "
            "sizes from data/azure_llm_code_2023.csv"
        )
    return "data/azure_llm_code_2023.csv"


# Under a budget the reference "default" is the default held to it: static-cap (every GPU at the budget's uniform
# share, configured batch). The unmanaged default ignores the budget; it is reported under this name only.
UNBUDGETED = "default-ignoring-budget"


def reference_policy(c: Case) -> str:
    """The policy whose SLO attainment and energy are the case's "default" (static-cap under a budget)."""
    return "default" if c.budget_w is None else "static-cap"


def verdict(
    rows: dict[str, dict[str, Any]], budget_w: float | None, errors: dict[str, str] | None = None
) -> dict[str, Any]:
    """Issue 9's acceptance for one case, from the policy rows (ERROR where a policy it needs raised).

    ``rows["default"]`` is the reference: the default policy, or under a budget static-cap (the default held
    to the budget), so "within 1 pp of default's SLO attainment" compares budget-respecting policies."""
    d, p = rows.get("default"), rows.get("pals")
    bs = rows.get(BEST_STATIC)
    if d is None or p is None:
        missing = "default" if d is None else "pals"
        errs = errors or {}
        why = errs.get(missing) or (errs.get("static-cap") if missing == "default" else None) or "not run"
        return {"default_meets_90pct": None, "pass": False, "verdict": f"ERROR ({missing}: {why})"}
    out: dict[str, Any] = {"default_meets_90pct": (d["slo_attainment"] or 0.0) >= DEFAULT_MEETS}
    slo_ok = (p["slo_attainment"] or 0.0) >= (d["slo_attainment"] or 0.0) - SLO_TOLERANCE - 1e-12
    budget_ok = budget_w is None or p["limit_over_budget_ticks"] == 0
    out["pals_slo_within_1pp"] = slo_ok
    out["pals_never_over_budget"] = budget_ok
    out["pals_over_best_static"] = (
        p["j_per_output_token"] / bs["j_per_output_token"] if bs and bs["j_per_output_token"] else None
    )
    sav = lambda r: 1 - r["j_per_output_token"] / d["j_per_output_token"]  # noqa: E731
    out["pals_saving_vs_default"] = sav(p)
    out["best_static_saving_vs_default"] = sav(bs) if bs else None
    out["saving_ratio_vs_best_static"] = sav(p) / sav(bs) if bs and sav(bs) > 0 else None
    if out["default_meets_90pct"]:
        ref = bs if bs is not None else d
        energy_ok = p["j_per_output_token"] <= ref["j_per_output_token"] * (1 + 1e-9)
        out["rule"] = (
            "pals J/out tok <= best-static's, SLO within 1 pp of default"
            if bs is not None
            else "no (budget-respecting) static within 1 pp of default: pals J/out tok <= default's, SLO within 1 pp"
        )
    else:
        energy_ok = p["j_per_output_token"] <= d["j_per_output_token"] * (1 + 1e-9)
        out["rule"] = "SLO infeasible for default: pals J/out tok <= default's, SLO within 1 pp of default or better"
    out["pass"] = bool(energy_ok and slo_ok and budget_ok)
    ratio = out["saving_ratio_vs_best_static"]
    out["goal_1p1x_best_static_saving"] = None if ratio is None else ratio >= GOAL_SAVING_RATIO
    out["verdict"] = "PASS" if out["pass"] else "FAIL"
    return out


_PLOT: dict[str, Any] = {}


def _plot_one(name: str) -> str:
    runs, inp, out = _PLOT["runs"][name], _PLOT["inputs"][name], _PLOT["out"]
    title = (
        f"{name}: TTFT<={inp['ttft_slo_ms'] / 1000:g}s TPOT<={inp['tpot_slo_ms']:g}ms, "
        f"{inp['mean_rate_req_per_s']:.2f} req/s (capacity {inp['capacity_req_per_s']:.2f})"
    )
    return str(plot_slo_case(runs, out / "plots" / f"{name}.png", title, inp["ttft_slo_ms"], inp["tpot_slo_ms"]))


def plot_cases(
    runs: dict[str, dict[str, PolicyRun]], inputs: dict[str, dict[str, Any]], out: Path, workers: int
) -> None:
    """A PNG per case (in worker processes: matplotlib is the slow part)."""
    _PLOT.update(runs=runs, inputs=inputs, out=out)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(_plot_one, list(runs)))
    finally:
        _PLOT.clear()


def _yes_no(v: bool | None) -> str:
    return "-" if v is None else "yes" if v else "no"


def _f(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


POLICY_ORDER = ("default", BEST_STATIC, "slo-oracle", "pals")


def format_table(results: list[dict[str, Any]]) -> str:
    """One line per case (markdown table)."""
    head = (
        "| case | J/out tok default | best-static (spec) | slo-oracle | pals | pals / best-static | "
        "SLO att default / best-static / slo-oracle / pals | default >= 90% | verdict | pred. err TTFT / TPOT p90 |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in results:
        rows, v = r["policies"], r["verdict"]
        j = {p: rows[p]["j_per_output_token"] if p in rows else None for p in POLICY_ORDER}
        slo = {p: rows[p]["slo_attainment"] if p in rows else None for p in POLICY_ORDER}
        bs = f"{_f(j[BEST_STATIC], '.3f')} ({r['best_static_spec'] or 'none within 1 pp'})"
        pe = r.get("prediction_error")
        err = "n/a" if pe is None else f"{_f(pe['ttft_mdape_pct'], '.0f')}% / {_f(pe['tpot_mdape_pct'], '.0f')}%"
        lines.append(
            f"| {r['case']} | {_f(j['default'], '.3f')} | {bs} | {_f(j['slo-oracle'], '.3f')} | "
            f"{_f(j['pals'], '.3f')} | "
            f"{_f(v.get('pals_over_best_static'), '.3f')} | "
            + " / ".join(_f(None if slo[p] is None else 100 * slo[p], ".1f") for p in POLICY_ORDER)
            + f" | {_yes_no(v['default_meets_90pct'])} | {v['verdict']} | {err} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: the table on stdout, slo_suite.json, slo_suite.md and a PNG per case under --out."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench/slo_suite")
    ap.add_argument("--quick", action="store_true", help="3 models x 3 loads x azure-code x 5 min, coarse grids")
    ap.add_argument("--models", nargs="*", choices=sorted(SLOS))
    ap.add_argument("--traces", nargs="*", choices=TRACES)
    ap.add_argument("--loads", nargs="*", choices=tuple(LEVELS))
    ap.add_argument("--budgets", nargs="*", choices=("none", "binding"))
    ap.add_argument("--no-infeasible", dest="infeasible", action="store_false", help="skip the infeasible-TPOT case")
    ap.add_argument("--duration", type=float, help="seconds of arrivals per case (then 60 s to drain)")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: CPUs available)")
    ap.add_argument("--no-plots", dest="plots", action="store_false")
    ap.add_argument(
        "--controller-set", action="append", default=[], metavar="FIELD=VALUE", help="TUNING: override ControllerConfig"
    )
    args = ap.parse_args(argv)
    q = args.quick
    args.models = args.models or list(QUICK_MODELS if q else SLOS)
    args.traces = args.traces or (["azure-code"] if q else list(TRACES))
    args.loads = args.loads or list(LEVELS)
    args.budgets = args.budgets or (["none"] if q else ["none", "binding"])
    if q and "--no-infeasible" not in (argv if argv is not None else sys.argv):
        args.infeasible = False
    arrivals_s = args.duration or (QUICK_ARRIVALS_S if q else FULL_ARRIVALS_S)
    workers = args.workers or default_workers()
    overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.controller_set)}
    config = ControllerConfig(gpu_kind="A100-SXM4", **overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    cases = build_cases(args)
    built, inputs = prepare_cases(cases, arrivals_s)
    t_prep = time.perf_counter() - t0
    registry = load_profiles(str(default_profiles_dir()))
    oracle = "slo-oracle-quick" if q else "slo-oracle"
    grids: dict[str, list[str]] = {}
    jobs: list[Job] = []
    for c in cases:
        sc = built[c.name][0]
        grids[c.name] = static_grid(sc, QUICK_CAP_STEP_W, QUICK_BATCHES) if q else static_grid(sc)
        jobs += [Job(c.name, oracle), Job(c.name, "pals"), Job(c.name, "default")]
        if c.budget_w is not None:
            jobs.append(Job(c.name, "static-cap"))
        jobs += [Job(c.name, s, keep_detail=False) for s in grids[c.name]]
    # Longest first (the oracle, then pals), so the workers finish together.
    rank = {oracle: 0, "pals": 1, "default": 2}
    jobs.sort(key=lambda j: rank.get(j.policy, 3))
    done = [0]

    def tick(job: Job, run: PolicyRun) -> None:
        done[0] += 1
        if done[0] % 25 == 0 or done[0] == len(jobs):
            sys.stderr.write(f"\r{done[0]}/{len(jobs)} replays, {time.perf_counter() - t0:.0f} s")
            sys.stderr.flush()

    cpu_s: dict[tuple[str, str], float] = {}
    errors: dict[tuple[str, str], str] = {}
    runs = run_jobs(built, jobs, registry, config, workers, tick, cpu_s, errors)
    sys.stderr.write("\n")
    best: dict[str, str | None] = {}
    for c in cases:
        statics = {s: runs[(c.name, s)] for s in grids[c.name] if (c.name, s) in runs}
        d = runs.get((c.name, reference_policy(c)))
        best[c.name] = pick_best_static(d, statics) if d is not None else None
    # The chosen statics again, with their timelines for the plots.
    rerun = [Job(n, s) for n, s in best.items() if s is not None]
    again = run_jobs(built, rerun, registry, config, workers, None, cpu_s, errors)

    results = []
    case_runs: dict[str, dict[str, PolicyRun]] = {}
    for c in cases:
        found = {
            "default": runs.get((c.name, reference_policy(c))),
            BEST_STATIC: again.get((c.name, best[c.name])) if best[c.name] is not None else None,
            "slo-oracle": runs.get((c.name, oracle)),
            "pals": runs.get((c.name, "pals")),
        }
        if c.budget_w is not None:
            found[UNBUDGETED] = runs.get((c.name, "default"))
        per = {p: replace(r, policy=p) for p, r in found.items() if r is not None}
        case_runs[c.name] = per
        rows = {p: policy_row(r) for p, r in per.items()}
        case_errors = {p: e for (n, p), e in errors.items() if n == c.name}
        pe = prediction_error(per["pals"]) if "pals" in per else None
        results.append(
            {
                "case": c.name,
                "inputs": inputs[c.name],
                "policies": rows,
                "best_static_spec": best[c.name],
                "static_grid": {
                    s: {
                        "j_per_output_token": policy_row(runs[(c.name, s)])["j_per_output_token"],
                        "slo_attainment": policy_row(runs[(c.name, s)])["slo_attainment"],
                    }
                    for s in grids[c.name]
                    if (c.name, s) in runs
                },
                "errors": case_errors,
                "verdict": verdict(rows, c.budget_w, case_errors),
                "prediction_error": None if pe is None else vars(pe),
            }
        )
    if args.plots:
        plot_cases(case_runs, inputs, out, workers)

    table = format_table(results)
    print(table)
    n_pass = sum(r["verdict"].get("pass", False) for r in results)
    summary = f"\n{n_pass}/{len(results)} cases pass issue 9's acceptance (per-case rule in the verdict column)."
    for (case, pol), err in sorted(errors.items()):
        summary += f"\nERROR: {pol} on {case}: {err}"
    errs = [r["prediction_error"] for r in results if r["prediction_error"] is not None]
    if not errs:
        summary += "\nLatency-model prediction error: n/a (the controller's decisions expose no predicted p90)."
    else:
        for k in ("ttft_mdape_pct", "tpot_mdape_pct"):
            vals = [e[k] for e in errs if e[k] is not None]
            med = float(np.median(vals)) if vals else None
            summary += f"\nmedian over cases of the per-window median abs % error, {k}: {_f(med, '.1f')}"
    wall = time.perf_counter() - t0
    cpu = sum(cpu_s.values())
    summary += (
        f"\nwall {wall:.0f} s ({t_prep:.0f} s preparing), {len(jobs)} replays on {workers} workers, "
        f"{cpu:.0f} CPU s in replays (slo-oracle {sum(v for (_, p), v in cpu_s.items() if p == oracle):.0f} s)"
    )
    print(summary)
    doc = {
        "quick": q,
        "arrivals_s": arrivals_s,
        "levels_fraction_of_capacity_p95_30s": LEVELS,
        "slos": {m: {"ttft_ms": t, "tpot_ms": p} for m, (t, p) in SLOS.items()},
        "infeasible_case": {"model": INFEASIBLE[0], "ttft_ms": INFEASIBLE[1], "tpot_ms": INFEASIBLE[2]},
        "binding_budget_w": BINDING_BUDGET_W,
        "controller_config_overrides": overrides,
        "cases": results,
        "passed": n_pass,
        "errors": [{"case": c, "policy": p, "error": e} for (c, p), e in sorted(errors.items())],
        "wall_s": wall,
        "replay_cpu_s": cpu,
        "workers": workers,
    }
    write_json(doc, out / "slo_suite.json")
    (out / "slo_suite.md").write_text(table + "\n" + summary + "\n")
    print(f"wrote {out / 'slo_suite.json'}, {out / 'slo_suite.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
