"""``pals-replay``: replay a scenario in simulated time under several policies and compare them side by side.

Either a scenario JSON (``--scenario``) or one engine described by flags. Scenario JSON layout::

    {"name": "demo", "duration_s": 600, "warmup_s": 30,
     "budget": {"unit": "server", "points": [[0, null], [300, 2000]], "interpolate": false},
     "engines": [{"engine_id": "engine0", "model": "mixtral-8x7b-instruct",
                  "load": {"kind": "trace", "path": "data/azure_llm_code_2023.csv", "every": 2,
                           "time_column": "TIMESTAMP", "input_column": "ContextTokens",
                           "output_column": "GeneratedTokens"},
                  "targets": {"tokens_per_s": null, "ttft_ms": 2000, "tpot_ms": 200},
                  "max_num_seqs": 64, "max_num_batched_tokens": 8192,
                  "perturbation": {"throughput_factor": 0.9, "power_factor": 1.05}}]}

A Poisson load is ``{"kind": "poisson", "rate_per_s": 5, "prompt_tokens": 512, "output_tokens": 256}``.

Policies (``--policies``): default, static-cap, cap-only, batch-only, pals, tput-oracle (a throughput oracle,
SLO-blind on TTFT), ``static:CAP[:BATCH]`` (a fixed per-GPU cap in W, clamped to the GPUs' range and the
budget's uniform share; batch defaults to the configured one), ``best-static`` (the static of least energy per
output token whose SLO attainment is within 1 pp of default's, found by replaying a grid in parallel;
``--workers``), ``slo-oracle`` / ``slo-oracle-quick`` (an SLO-aware greedy windowed search in hindsight, see
pals_daemon/replay/slo_oracle.py). summary.json holds, per policy, the SLO figures (``slo``: J per output token
and per token, SLO attainment, TTFT/TPOT p50/p90/p99, time and ticks over budget; not for tput-oracle, which is
SLO-blind) and the inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pals_daemon.control.types import EngineTargets
from pals_daemon.model.profile import ProfileRegistry, load_profiles
from pals_daemon.replay.policies import POLICIES, SLO_BLIND_POLICIES, validate_policy_spec
from pals_daemon.replay.references import BEST_STATIC, find_best_static, policy_row, scenario_inputs
from pals_daemon.replay.report import format_table, plot_runs, summarize, write_json
from pals_daemon.replay.scenario import Budget, EngineSpec, PoissonLoad, Scenario, TraceLoad, load_scenario
from pals_daemon.replay.simulate import PolicyRun, prepare, progress_bar, run_policy
from pals_daemon.sim.truth import Perturbation


def _budget(args: argparse.Namespace) -> Budget:
    unit = "server" if args.budget_unit == "server" else "gpu"
    if args.budget_steps:
        points = []
        for part in args.budget_steps.split(","):
            t, w = part.split(":")
            points.append((float(t), None if w.strip().lower() in ("", "none") else float(w)))
        return Budget(tuple(points), unit)
    return Budget.constant(args.budget_w, unit) if args.budget_w is not None else Budget()


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """The scenario named by ``--scenario``, or one engine built from the flags."""
    if args.scenario:
        sc = load_scenario(args.scenario)
        if args.duration is not None:
            from dataclasses import replace

            sc = replace(sc, duration_s=args.duration)
        return sc
    if args.trace:
        cols = args.trace_columns.split(",")
        if len(cols) != 3:
            raise SystemExit("--trace-columns needs three names: time,input,output")
        load: PoissonLoad | TraceLoad = TraceLoad(
            args.trace, cols[0], cols[1], cols[2], time_scale=args.time_scale, every=args.every
        )
    else:
        load = PoissonLoad(args.rate, args.prompt_tokens, args.output_tokens, seed=args.seed)
    eng = EngineSpec(
        engine_id="engine0",
        model=args.model,
        load=load,
        targets=EngineTargets(args.target_tps, args.ttft_ms, args.tpot_ms),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        perturbation=Perturbation(args.throughput_factor, args.power_factor),
    )
    return Scenario("replay", (eng,), duration_s=args.duration or 600.0, budget=_budget(args), warmup_s=args.warmup)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    ap = argparse.ArgumentParser(
        prog="pals-replay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scenario", help="scenario JSON (overrides the single-engine flags)")
    ap.add_argument("--model", default="mixtral-8x7b-instruct")
    ap.add_argument("--trace", help="request CSV (arrival time, input tokens, output tokens)")
    ap.add_argument("--trace-columns", default="TIMESTAMP,ContextTokens,GeneratedTokens")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--every", type=int, default=1, help="serve every N-th trace request")
    ap.add_argument("--rate", type=float, default=5.0, help="Poisson arrivals per second (without --trace)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-tps", type=float, help="throughput target, output tokens/s")
    ap.add_argument("--ttft-ms", type=float)
    ap.add_argument("--tpot-ms", type=float)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--throughput-factor", type=float, default=1.0, help="truth vs profile (mismatch)")
    ap.add_argument("--power-factor", type=float, default=1.0, help="truth vs profile (mismatch)")
    ap.add_argument("--budget-w", type=float, help="constant budget")
    ap.add_argument("--budget-steps", help="steps 't:W,t:W' (W 'none' for no budget)")
    ap.add_argument("--budget-unit", choices=("gpu", "server"), default="gpu")
    ap.add_argument("--duration", type=float, help="simulated seconds (default 600, or the scenario's)")
    ap.add_argument("--warmup", type=float, default=0.0, help="seconds excluded from the figures")
    ap.add_argument(
        "--policies",
        nargs="*",
        default=list(POLICIES),
        type=_policy_arg,
        help="policy names or specs (see above), e.g. default pals static:225:32 best-static slo-oracle",
    )
    ap.add_argument("--workers", type=int, help="processes for the best-static grid (default: CPUs available)")
    ap.add_argument("--profiles", help="profiles directory (default: the shipped ones)")
    ap.add_argument("--out", default="out/replay", help="directory for summary.json and PNG plots")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def _policy_arg(spec: str) -> str:
    if spec == BEST_STATIC:
        return spec
    try:
        return validate_policy_spec(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_policies(
    scenario: Scenario, registry: ProfileRegistry, policies: list[str], show_progress: bool, workers: int | None
) -> dict[str, PolicyRun]:
    """Every policy on the same prepared scenario; ``best-static`` runs the static grid against default."""
    prep = prepare(scenario)
    runs: dict[str, PolicyRun] = {}
    for name in policies:
        if name == BEST_STATIC:
            if "default" not in runs:
                runs["default"] = run_policy(scenario, "default", registry, prep)
            spec, best, _ = find_best_static(scenario, registry, prep, runs["default"], workers=workers)
            if best is None:
                print("pals-replay: best-static: no static of the grid is within 1 pp of default", file=sys.stderr)
                continue
            print(f"best-static: {spec}", file=sys.stderr)
            runs[BEST_STATIC] = best
            continue
        bar = progress_bar(f"{scenario.name}: {name:<10}") if show_progress else None
        runs[name] = run_policy(scenario, name, registry, prep, bar)
    return {n: runs[n] for n in [*policies, "default"] if n in runs}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pals-replay``."""
    args = build_parser().parse_args(argv)
    try:
        scenario = scenario_from_args(args)
    except (ValueError, OSError, KeyError) as e:
        print(f"pals-replay: {e}", file=sys.stderr)
        return 2
    if args.profiles:
        profiles_dir = args.profiles
    else:
        from pals_daemon.server.daemon import default_profiles_dir

        profiles_dir = str(default_profiles_dir())
    registry = load_profiles(profiles_dir)
    runs = run_policies(scenario, registry, list(dict.fromkeys(args.policies)), not args.quiet, args.workers)
    summary = summarize(runs)
    summary["scenario"] = scenario.name
    summary["inputs"] = scenario_inputs(scenario)
    for name, run in runs.items():
        if name in SLO_BLIND_POLICIES:  # kept out of SLO tables: its "saving" there comes from missed TTFTs
            summary["policies"][name]["slo_blind"] = True
            continue
        summary["policies"][name]["slo"] = policy_row(run)
        if name == BEST_STATIC:
            summary["policies"][name]["spec"] = run.policy
    print(format_table(summary, f"{scenario.name}: {scenario.duration_s:.0f} simulated s"))
    for name, run in runs.items():
        print(f"{name}: {run.speed_x:.0f}x real time", file=sys.stderr)
    out = Path(args.out)
    write_json(summary, out / "summary.json")
    if not args.no_plots:
        for p in plot_runs(runs, out, scenario.name):
            print(f"wrote {p}", file=sys.stderr)
    print(f"wrote {out / 'summary.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
