"""Re-run only pals on the cases of a saved SLO-suite JSON, judged against that run's references.

default (under a budget: static-cap), the static grid (best-static) and the SLO-aware oracle do not depend on
the SLO planner, so while the planner changes they need not be replayed: the cases are rebuilt from the saved
run's arguments (same seeds, same inputs, checked against the saved ones), pals is replayed with the current
code, and each case gets
issue 9's verdict, by the suite's own rule (slo_suite.verdict: pals <= best-static where default meets the SLO for
>= 90% of requests, else <= default; SLO attainment within 1 pp of default's; never over the budget). About a
tenth of the full suite's CPU.

    python bench/slo_suite_pals.py --ref bench/results/slo_suite_quick_matrix_2026-12-06.json \\
        --out bench/results/slo_suite_pals_2026-12-06.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from pals_daemon.control.config import ControllerConfig
from pals_daemon.model.profile import load_profiles
from pals_daemon.replay.latency import prediction_error
from pals_daemon.replay.references import BEST_STATIC, Job, default_workers, policy_row, run_jobs
from pals_daemon.server.daemon import default_profiles_dir

# isort: split
# The suite beside this file (python bench/slo_suite_pals.py puts bench/ on sys.path).
import slo_suite


def main(argv: list[str] | None = None) -> int:
    """Replay pals on the saved cases; print one line per case and the summary, write JSON to --out."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="a JSON written by bench/slo_suite.py")
    ap.add_argument("--out", help="where to write the JSON (default: print only)")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    ref = json.loads(Path(args.ref).read_text())
    saved = {c["case"]: c for c in ref["cases"]}
    ns = argparse.Namespace(
        models=sorted({c["inputs"]["model"] for c in ref["cases"]}),
        traces=sorted({c["inputs"]["trace"] for c in ref["cases"]}),
        loads=list(slo_suite.LEVELS),
        budgets=["none", "binding"],
        infeasible=bool(ref.get("infeasible_case")),
    )
    cases = [c for c in slo_suite.build_cases(ns) if c.name in saved]
    missing = set(saved) - {c.name for c in cases}
    if missing:
        sys.exit(f"cases of {args.ref} this suite cannot rebuild: {sorted(missing)}")
    built, inputs = slo_suite.prepare_cases(cases, ref["arrivals_s"])
    for c in cases:
        now, then = inputs[c.name]["mean_rate_req_per_s"], saved[c.name]["inputs"]["mean_rate_req_per_s"]
        if not np.isclose(now, then, rtol=1e-9):
            sys.exit(f"{c.name}: inputs differ from the saved run's (rate {now} vs {then} req/s)")
    config = ControllerConfig(gpu_kind="A100-SXM4", **ref.get("controller_config_overrides", {}))
    t0 = time.perf_counter()
    runs = run_jobs(
        built,
        [Job(c.name, "pals") for c in cases],
        load_profiles(str(default_profiles_dir())),
        config,
        args.workers or default_workers(),
    )
    results = []
    for c in cases:
        pol = saved[c.name]["policies"]
        default, best = pol["default"], pol.get(BEST_STATIC)
        row = policy_row(runs[(c.name, "pals")])
        judged = slo_suite.verdict({**pol, "pals": row}, saved[c.name]["inputs"]["budget_w"])
        feasible = bool(judged["default_meets_90pct"])
        versus = best if feasible and best is not None else default
        ratio = row["j_per_output_token"] / versus["j_per_output_token"]
        dslo_pp = 100.0 * (row["slo_attainment"] - default["slo_attainment"])
        ok = bool(judged["pass"])
        pe = prediction_error(runs[(c.name, "pals")])
        results.append(
            {
                "case": c.name,
                "default_meets_slo": feasible,
                "pals": row,
                "judged_against": BEST_STATIC if versus is best else "default",
                "ratio": ratio,
                "pals_vs_default": row["j_per_output_token"] / default["j_per_output_token"],
                "slo_vs_default_pp": dslo_pp,
                "saved_pals_ratio": pol["pals"]["j_per_output_token"] / versus["j_per_output_token"],
                "passed": ok,
                "prediction_error": None if pe is None else vars(pe),
            }
        )
        r = results[-1]
        print(
            f"{c.name:55s} pals/{r['judged_against']} {ratio:.3f} (saved {r['saved_pals_ratio']:.3f})"
            f" vs default {r['pals_vs_default']:.3f} SLO {dslo_pp:+.2f} pp {'PASS' if ok else 'FAIL'}"
        )
    for label, group in (("default meets the SLO", True), ("SLO not met by default", False)):
        sel = [r for r in results if r["default_meets_slo"] is group]
        if sel:
            ratios = [r["ratio"] for r in sel]
            dslo = [r["slo_vs_default_pp"] for r in sel]
            print(
                f"{label}: {sum(r['passed'] for r in sel)}/{len(sel)} pass; ratio median {np.median(ratios):.3f}"
                f" (max {max(ratios):.3f}); vs default median {np.median([r['pals_vs_default'] for r in sel]):.3f};"
                f" SLO median {np.median(dslo):+.2f} pp (worst {min(dslo):+.2f})"
            )
    errs = [r["prediction_error"] for r in results if r["prediction_error"] is not None]
    for k in ("ttft_mdape_pct", "tpot_mdape_pct"):
        vals = [e[k] for e in errs if e[k] is not None]
        if vals:
            print(f"median over cases of the per-window median abs % error, {k}: {np.median(vals):.1f}")
    print(f"{sum(r['passed'] for r in results)}/{len(results)} pass; wall {time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"ref": args.ref, "cases": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
