"""S4 of issue 3: demand response. The node's power budget follows a signal; the policies must stay under it.

Node: Mixtral-8x7B-Instruct on 4x A100-SXM4 (TP4), configured batch 64, saturating open-loop Poisson load
(2x the default configuration's capacity, S1's modelled prompt/output mix), the truth perturbed with
``Perturbation.for_requests`` of that mix (workload-dependent model mismatch).

Two budget signals, in GPU watts (sum of the four limits; the server budget is the paper's fit,
1.05 x GPU + 345 W, printed beside it):
- steps: 1,600 -> 1,000 -> 1,400 -> 800 W, 120 s each;
- day: the first day (00:00-24:00, 2024-05-10) of the Azure 2024 coding service's requests-per-minute
  shape (data/azure_llm_2024_week_load_shape_digitized.csv, column req_per_min_mid, DIGITIZED), mapped
  linearly from [day min, day max] requests/min onto [800, 1,600] W and compressed 60x in time (one
  hour of the day = 60 simulated s; 24 min in all), linear between the ~7-minute bins. The mapping is a
  modelled demand-response signal: the grid (or the fleet's power manager) grants the node power in
  proportion to the fleet's load.

Power reading judged: the sum over the four GPUs of the 1 s averaged NVML power (``power.draw.average``,
what SimGpu.read().power_avg_mw models), sampled every 0.5 s control tick: this is what an operator's meter
or a BMC sees (not the instantaneous draw, which spikes within a 1 s window below any meter's resolution).
Server power above the server budget is the same event as summed GPU power above the GPU budget (the fit is
increasing and linear), so the fraction of time is the same in either unit. An excursion is a run of
consecutive ticks above the budget; with 0.5 s ticks it is resolved to 0.5 s.

Each signal is run twice: reactive (the controller learns of a change at the tick it happens) and with 2 s
notice of decreases (``with_notice``; demand-response programmes announce curtailments ahead). Reactively,
no policy can avoid an excursion at a step down: the tick of the change reads the old power, and the 1 s
meter average plus the 0.2 s cap settling keep the reading above the new budget for ~1.2 s after it.
Judged in both cases against the signal itself (not the earlier budget the controller was given).

Figures per policy: fraction of time above budget and the longest excursion (goal: < 1% and no excursion
longer than 1 s), output throughput at each budget level as % of the oracle's (goal >= 97%), and the
tokens/s and tokens/J gain over cap-only, and tokens/s as % of static-cap's per level (the most tokens/s within
the budget on this data) (the paper: up to 1.22x; on the measured A100 data batch 64 is the
most efficient at every cap, so expect about 1.0x here). Note: without a throughput target the replay oracle
picks, among configurations within the budget, the best tokens/J (not the most tokens/s), so "% of oracle
throughput" can exceed 100%.

    python bench/scenario_s4.py --out out/bench/s4
    python bench/scenario_s4.py --out out/bench/s4 --quick
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pals_daemon.control.config import ControllerConfig
from pals_daemon.model.profile import load_profiles
from pals_daemon.replay.policies import POLICIES
from pals_daemon.replay.report import plot_runs, write_json
from pals_daemon.replay.scenario import Budget, EngineSpec, PoissonLoad, Scenario, gpu_to_server_w
from pals_daemon.replay.simulate import PolicyRun, prepare, run_policy
from pals_daemon.server.daemon import default_profiles_dir
from pals_daemon.sim.truth import Perturbation, load_a100_truth

MODEL = "mixtral-8x7b-instruct"
NUM_GPUS = 4
# Modelled request mix of S1 (bench/run_scenarios.py), and its 2x overload.
PROMPT_TOKENS = (128, 256, 384, 512, 768, 1024)
OUTPUT_TOKENS = (64, 128, 192, 256, 384, 512)
OVERLOAD = 2.0
STEP_LEVELS_W = (1600.0, 1000.0, 1400.0, 800.0)
STEP_HOLD_S = 120.0
QUICK_STEP_HOLD_S = 30.0
DAY_RANGE_W = (800.0, 1600.0)
DAY_TIME_COMPRESSION = 60.0
# Ticks right after a budget change excluded from the per-level throughput (the settling transient).
SETTLE_S = 5.0
DAY_BANDS_W = ((800.0, 1000.0), (1000.0, 1200.0), (1200.0, 1400.0), (1400.0, 1600.0 + 1e-9))
WEEK_SHAPE = Path(__file__).resolve().parent.parent / "data" / "azure_llm_2024_week_load_shape_digitized.csv"
# Advance notice of a budget decrease given to the controller (modelled: demand-response programmes announce
# curtailments minutes ahead; 2 s covers the 1 s meter average plus the 0.2 s cap settling of SimGpu).
NOTICE_S = 2.0
GOAL_OVER_FRACTION = 0.01
GOAL_LONGEST_S = 1.0
GOAL_PCT_OF_ORACLE = 97.0
# The best budget-respecting static (issue 9): the most tokens/s over these (every cap at the GPUs' maximum,
# clamped to the budget's uniform share each tick, so never over the budget) x batch limits; batch 64 is
# static-cap itself.
S4_STATIC_BATCHES = (64, 32, 16, 8)


def engine(seed: int = 4) -> EngineSpec:
    """Saturated Mixtral engine with the workload-dependent mismatch of its prompt mix."""
    truth = load_a100_truth(MODEL)
    rate = OVERLOAD * truth.throughput_tokens_per_s(400.0, 64) / float(np.mean(OUTPUT_TOKENS))
    pert = Perturbation.for_prompt_mix(float(np.mean(PROMPT_TOKENS)), float(np.mean(OUTPUT_TOKENS)))
    return EngineSpec("engine0", MODEL, PoissonLoad(rate, PROMPT_TOKENS, OUTPUT_TOKENS, seed=seed), perturbation=pert)


def step_budget(hold_s: float) -> Budget:
    """1,600 -> 1,000 -> 1,400 -> 800 W (GPU), ``hold_s`` each."""
    return Budget(tuple((i * hold_s, w) for i, w in enumerate(STEP_LEVELS_W)))


def day_budget(path: Path = WEEK_SHAPE, hours: float = 24.0) -> tuple[Budget, float]:
    """The first ``hours`` of the coding service's load shape mapped onto DAY_RANGE_W; (budget, duration s)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["service"] == "coding" and float(r["minutes_from_start"]) <= hours * 60:
                rows.append((float(r["minutes_from_start"]), float(r["req_per_min_mid"])))
    lo_rpm = min(v for _, v in rows)
    hi_rpm = max(v for _, v in rows)
    lo_w, hi_w = DAY_RANGE_W
    pts = tuple(
        (
            m * 60.0 / DAY_TIME_COMPRESSION - rows[0][0] * 60.0 / DAY_TIME_COMPRESSION,
            lo_w + (hi_w - lo_w) * (v - lo_rpm) / (hi_rpm - lo_rpm),
        )
        for m, v in rows
    )
    return Budget(pts, interpolate=True), pts[-1][0]


def with_notice(budget: Budget, duration_s: float, notice_s: float, period_s: float = 0.5) -> Budget:
    """The budget the controller is given: min of the signal over [t, t + notice_s], sampled per tick.

    Decreases are seen ``notice_s`` early, increases on time; the judging uses the signal itself.
    """
    n = int(math.ceil(duration_s / period_s))
    look = int(round(notice_s / period_s))
    vals = [budget.gpu_w(k * period_s, NUM_GPUS) for k in range(n + look + 1)]
    pts = []
    for k in range(n):
        window = [v for v in vals[k : k + look + 1] if v is not None]
        pts.append((k * period_s, min(window) if window else None))
    return Budget(tuple(pts))


def judge(run: PolicyRun, signal: Budget) -> tuple[float, float]:
    """(seconds above, longest excursion s) of summed 1 s avg GPU power vs the true signal, per 0.5 s tick."""
    tl = run.timeline
    over = longest = cur = 0.0
    dt = tl.t_s[1] - tl.t_s[0] if len(tl.t_s) > 1 else 0.5
    for k, (t, p) in enumerate(zip(tl.t_s, tl.gpu_power_w, strict=True)):
        b = signal.gpu_w(t, NUM_GPUS)
        if k > 0 and b is not None and p > b + 1e-6:
            over += dt
            cur += dt
            longest = max(longest, cur)
        else:
            cur = 0.0
    return over, longest


def _levels(run: PolicyRun, sc: Scenario, kind: str) -> dict[str, list[float]]:
    """Decode tokens/s per tick grouped by budget level (steps) or band (day), transients excluded."""
    tl = run.timeline
    tps = tl.tokens_per_s["engine0"]
    changes = [t for t, _ in sc.budget.points]
    out: dict[str, list[float]] = defaultdict(list)
    for t, b, v in zip(tl.t_s, tl.budget_w, tps, strict=True):
        if t < sc.warmup_s or not math.isfinite(b):
            continue
        if kind == "steps":
            if any(0 <= t - c < SETTLE_S for c in changes):
                continue
            out[f"{b:.0f}"].append(v)
        else:
            for lo, hi in DAY_BANDS_W:
                if lo <= b < hi:
                    out[f"{lo:.0f}-{min(hi, DAY_RANGE_W[1]):.0f}"].append(v)
    return out


def run_case(
    sc: Scenario, kind: str, registry: Any, cfg: ControllerConfig, plots: Path | None, notice_s: float = 0.0
) -> dict[str, Any]:
    """Every policy on one budget signal; over-budget figures, per-level throughput vs the oracle and cap-only."""
    signal = sc.budget
    if notice_s > 0:
        sc = replace(sc, name=f"{sc.name}-notice{notice_s:g}s", budget=with_notice(signal, sc.duration_s, notice_s))
    prep = prepare(sc)
    runs = {p: run_policy(sc, p, registry, prep, config=cfg) for p in POLICIES}
    statics = {f"static:400:{b}": run_policy(sc, f"static:400:{b}", registry, prep) for b in S4_STATIC_BATCHES}
    best_static = max(statics, key=lambda k: statics[k].output_tokens)
    judged = {p: judge(r, signal) for p, r in runs.items()}
    span = sc.duration_s
    levels = {p: _levels(r, replace(sc, budget=signal), kind) for p, r in runs.items()}
    bl = {k: float(np.mean(v)) for k, v in _levels(statics[best_static], replace(sc, budget=signal), kind).items() if v}
    rows: dict[str, Any] = {}
    for p, r in runs.items():
        lv = {k: float(np.mean(v)) for k, v in levels[p].items() if v}
        ol = {k: float(np.mean(v)) for k, v in levels["tput-oracle"].items() if v}
        cl = {k: float(np.mean(v)) for k, v in levels["cap-only"].items() if v}
        sl = {k: float(np.mean(v)) for k, v in levels["static-cap"].items() if v}
        rows[p] = {
            "tokens_per_s": r.output_tokens / r.duration_s,
            "tokens_per_j": r.tokens_per_j,
            "over_budget_fraction": judged[p][0] / span,
            "time_over_budget_s": judged[p][0],
            "longest_excursion_s": judged[p][1],
            "limit_over_budget_ticks": r.limit_over_budget_ticks,
            "max_limit_excess_w": r.max_limit_excess_w,
            "level_tokens_per_s": lv,
            "level_pct_of_oracle": {k: 100 * lv[k] / ol[k] for k in lv if ol.get(k)},
            "level_x_cap_only": {k: lv[k] / cl[k] for k in lv if cl.get(k)},
            # static-cap (uniform cap = budget / 4, batch 64) is the most tokens/s within the budget on the
            # measured A100 data (batch 64 fastest at every cap): the throughput reference a replay oracle
            # that optimises tokens/J does not give.
            "level_pct_of_static_cap": {k: 100 * lv[k] / sl[k] for k in lv if sl.get(k)},
            "level_pct_of_best_static": {k: 100 * lv[k] / bl[k] for k in lv if bl.get(k)},
            "x_cap_only_tokens_per_s": (r.output_tokens / runs["cap-only"].output_tokens)
            if runs["cap-only"].output_tokens
            else None,
            "x_cap_only_tokens_per_j": r.tokens_per_j / runs["cap-only"].tokens_per_j
            if runs["cap-only"].tokens_per_j
            else None,
            "wall_s": r.wall_s,
        }
    pals = rows["pals"]
    goals = {
        "pals_over_budget_fraction_lt_1pct": pals["over_budget_fraction"] < GOAL_OVER_FRACTION,
        "pals_no_excursion_gt_1s": pals["longest_excursion_s"] <= GOAL_LONGEST_S,
        "pals_min_level_pct_of_oracle": min(pals["level_pct_of_oracle"].values(), default=None),
        "pals_ge_97pct_of_oracle_every_level": all(
            v >= GOAL_PCT_OF_ORACLE for v in pals["level_pct_of_oracle"].values()
        ),
        "pals_min_level_pct_of_static_cap": min(pals["level_pct_of_static_cap"].values(), default=None),
        "best_budget_respecting_static": best_static,
        "pals_min_level_pct_of_best_static": min(pals["level_pct_of_best_static"].values(), default=None),
        "pals_x_best_static_tokens_per_s": runs["pals"].output_tokens / statics[best_static].output_tokens
        if statics[best_static].output_tokens
        else None,
        "pals_x_cap_only_tokens_per_s": pals["x_cap_only_tokens_per_s"],
        "pals_x_cap_only_tokens_per_j": pals["x_cap_only_tokens_per_j"],
    }
    if plots is not None:
        plot_runs(runs, plots, sc.name)
    return {
        "scenario": sc.name,
        "signal": kind,
        "notice_s": notice_s,
        "duration_s": sc.duration_s,
        "policies": rows,
        "goals": goals,
    }


def _f(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def format_case(case: dict[str, Any]) -> str:
    """Fixed-width tables of one S4 case."""
    levels = sorted(
        {k for r in case["policies"].values() for k in r["level_pct_of_oracle"]}, key=lambda s: float(s.split("-")[0])
    )
    lines = [
        f"\nS4 {case['scenario']}, notice {case['notice_s']:g} s ({MODEL}, 4x A100, saturated; "
        "budget = sum of GPU limits; "
        f"judged on summed 1 s avg GPU power every 0.5 s)",
        f"{'policy':<11}{'tok/s':>8}{'tok/J':>8}{'over %':>8}{'longest s':>10}{'lim>bud':>8}{'x cap-only':>11}"
        + "".join(f"{('%or ' + k):>14}" for k in levels)
        + "".join(f"{('%sc ' + k):>14}" for k in levels),
    ]
    for p, r in case["policies"].items():
        lines.append(
            f"{p:<11}{r['tokens_per_s']:>8.1f}{r['tokens_per_j']:>8.4f}{100 * r['over_budget_fraction']:>8.2f}"
            f"{r['longest_excursion_s']:>10.1f}{r['limit_over_budget_ticks']:>8d}"
            f"{_f(r['x_cap_only_tokens_per_s'], '.3f'):>11}"
            + "".join(f"{_f(r['level_pct_of_oracle'].get(k), '.1f'):>14}" for k in levels)
            + "".join(f"{_f(r['level_pct_of_static_cap'].get(k), '.1f'):>14}" for k in levels)
        )
    lines.append(
        "levels (GPU W -> server W, paper fit): "
        + ", ".join(
            f"{k} -> " + "-".join(f"{gpu_to_server_w(float(x), NUM_GPUS):.0f}" for x in k.split("-")) for k in levels
        )
    )
    g = case["goals"]
    lines.append(
        f"goals (pals): over budget < 1% of time: {g['pals_over_budget_fraction_lt_1pct']}; no excursion > 1 s: "
        f"{g['pals_no_excursion_gt_1s']}; >= 97% of oracle tok/s at every level: "
        f"{g['pals_ge_97pct_of_oracle_every_level']} (min {_f(g['pals_min_level_pct_of_oracle'], '.1f')}%); "
        f"x cap-only tok/s {_f(g['pals_x_cap_only_tokens_per_s'], '.3f')}, "
        f"tok/J {_f(g['pals_x_cap_only_tokens_per_j'], '.3f')} "
        f"(paper: up to 1.22x); min % of static-cap tok/s per level (max tok/s within budget): "
        f"{_f(g['pals_min_level_pct_of_static_cap'], '.1f')}%; vs the best budget-respecting static "
        f"({g['best_budget_respecting_static']}): x{_f(g['pals_x_best_static_tokens_per_s'], '.3f')} tok/s, "
        f"min {_f(g['pals_min_level_pct_of_best_static'], '.1f')}% per level"
    )
    lines.append("columns: %or = tok/s as % of the oracle's at that budget level; %sc = as % of static-cap's")
    return "\n".join(lines)


def run(
    out_dir: str | Path, quick: bool = False, config: ControllerConfig | None = None, plots: bool = True
) -> dict[str, Any]:
    """S4 with the step and the day signals; writes s4.json (and PNGs) under ``out_dir``."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    registry = load_profiles(str(default_profiles_dir()))
    cfg = config if config is not None else ControllerConfig(gpu_kind="A100-SXM4")
    eng = engine()
    hold = QUICK_STEP_HOLD_S if quick else STEP_HOLD_S
    scenarios = [("steps", Scenario("s4-steps", (eng,), len(STEP_LEVELS_W) * hold, step_budget(hold), warmup_s=5.0))]
    if not quick:
        day, dur = day_budget()
        scenarios.append(("day", Scenario("s4-day", (eng,), dur, day, warmup_s=5.0)))
    cases = []
    for kind, sc in scenarios:
        for notice in (0.0, NOTICE_S):
            case = run_case(sc, kind, registry, cfg, out / "plots" if plots else None, notice)
            print(format_case(case))
            cases.append(case)
    result = {
        "model": MODEL,
        "perturbation": {
            "throughput_factor": eng.perturbation.throughput_factor,
            "power_factor": eng.perturbation.power_factor,
        },
        "quick": quick,
        "day_signal": {
            "source": "data/azure_llm_2024_week_load_shape_digitized.csv "
            "(coding, req_per_min_mid, first 24 h; DIGITIZED)",
            "mapping": f"linear [day min, day max] req/min -> {DAY_RANGE_W} W GPU budget, "
            f"time / {DAY_TIME_COMPRESSION:g}",
        },
        "power_reading": "sum of the 4 GPUs' 1 s averaged power, sampled each 0.5 s tick",
        "controller_config_overrides": {
            k: v for k, v in vars(cfg).items() if getattr(ControllerConfig(gpu_kind="A100-SXM4"), k) != v
        },
        "cases": cases,
        "wall_s": time.perf_counter() - t0,
    }
    write_json(result, out / "s4.json")
    print(f"S4 wall time {result['wall_s']:.0f} s", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: tables on stdout, s4.json and PNGs under --out."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench/s4")
    ap.add_argument("--quick", action="store_true", help="30 s per step, no day signal")
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
