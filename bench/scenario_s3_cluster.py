"""S3 as the PALS paper ran it: three servers, each its own node daemon, one cluster budget split among them.

The same engines, loads, targets (90/60/75% of unconstrained throughput), model mismatch and server-budget sweep
(4,800 W down until the oracle misses a target) as ``bench/scenario_s3.py``, whose pieces this reuses. Per
budget, in simulated time on the same requests:
- ``cluster-split``: three nodes, each with its own Controller over its 4 GPUs, node budgets from the cluster
  allocator (``pals_daemon.cluster.plan.plan_grants`` over ``offer_curve`` offers) every second, a decrease's
  watts free for another node only after the node applied it (``pals_daemon.cluster.replay.ClusterPolicy``);
- ``static-split``: the same three node controllers, each with an equal third of the budget;
- ``pals`` (single daemon: one controller over all 12 GPUs, bench/scenario_s3.py's figure) and ``oracle``.

    python bench/scenario_s3_cluster.py --out out/bench/s3_cluster            # 600 s runs, 100 W steps
    python bench/scenario_s3_cluster.py --out /tmp/s3c --quick                # 150 s runs, 400 W steps

Prints the table and writes ``s3_cluster.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenario_s3 import (  # noqa: E402
    DEFAULT_DURATION_S,
    FLOOR_BUDGET_W,
    ORACLE_MEETS,
    QOS_GOAL,
    QUICK_DURATION_S,
    RATIO_GOAL,
    START_BUDGET_W,
    STEP_W,
    _policy_row,
    run_budget,
    scenario,
    targeted_engines,
)

from pals_daemon.cluster.replay import ClusterPolicy  # noqa: E402
from pals_daemon.control.config import ControllerConfig  # noqa: E402
from pals_daemon.model.profile import load_profiles  # noqa: E402
from pals_daemon.replay.report import write_json  # noqa: E402
from pals_daemon.replay.scenario import server_to_gpu_w  # noqa: E402
from pals_daemon.replay.simulate import prepare, run_policy  # noqa: E402
from pals_daemon.server.daemon import default_profiles_dir  # noqa: E402

POLICIES = ("cluster-split", "static-split", "pals", "oracle")
# Allocator round every 2 ticks of 0.5 s: the agent's period in a fleet (cluster_period_s 0.5 s plus the
# node's round to apply and confirm; README "Running a fleet"); offers refreshed every 2 s.
ALLOC_EVERY_TICKS = 2
OFFER_EVERY_TICKS = 4


def run(
    out_dir: Path, quick: bool, duration_s: float | None, step_w: float | None, start_w: float = START_BUDGET_W
) -> dict[str, Any]:
    """The sweep; returns (and writes) the figures."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    reg = load_profiles(str(default_profiles_dir()))
    cfg = ControllerConfig(gpu_kind="A100-SXM4")
    dur = duration_s or (QUICK_DURATION_S if quick else DEFAULT_DURATION_S)
    step = step_w or (400.0 if quick else STEP_W)
    specs, _ = targeted_engines(reg, dur)
    num_gpus = sum(e.num_gpus for e in specs)
    nodes, first = {}, 0
    for i, e in enumerate(specs):
        nodes[f"server{i}"] = tuple(range(first, first + e.num_gpus))
        first += e.num_gpus
    sweep = []
    budget = start_w
    while budget >= FLOOR_BUDGET_W - 1e-9:
        runs = dict(run_budget(specs, budget, dur, reg, ("pals", "oracle"), cfg))
        sc = scenario(specs, budget, dur)
        prep = prepare(sc)
        reserved_over = {}
        for mode in ("cluster", "static"):
            policy = ClusterPolicy(reg, cfg, nodes, mode, ALLOC_EVERY_TICKS, OFFER_EVERY_TICKS)
            runs[f"{mode}-split"] = run_policy(sc, f"{mode}-split", reg, prep, policy=policy)
            reserved_over[mode] = policy.max_reserved_over_w
        row = {
            "server_budget_w": budget,
            "gpu_budget_w": round(server_to_gpu_w(budget, num_gpus), 1),
            "policies": {p: _policy_row(runs[p], num_gpus, budget) for p in POLICIES},
            "cluster_max_reserved_over_budget_w": round(reserved_over["cluster"], 3),
        }
        row["oracle_meets_all"] = row["policies"]["oracle"]["max_qos_violation_fraction"] <= ORACLE_MEETS
        sweep.append(row)
        print(f"  {budget:.0f} W done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        if not row["oracle_meets_all"]:
            break
        budget -= step
    feasible = [r for r in sweep if r["oracle_meets_all"]]

    def viol(rows: list[dict[str, Any]], p: str) -> int:
        return sum(r["policies"][p]["qos_violations"] for r in rows)

    def ratio(rows: list[dict[str, Any]]) -> float | None:
        s, c = viol(rows, "static-split"), viol(rows, "cluster-split")
        return (s / c) if c else (math.inf if s else None)

    worst = max((r["policies"]["cluster-split"]["max_qos_violation_fraction"] for r in feasible), default=None)
    goals = {
        "cluster_max_engine_qos_where_oracle_meets": worst,
        "cluster_qos_under_3pct_where_oracle_meets": worst is not None and worst < QOS_GOAL,
        "static_over_cluster_violations_sweep": ratio(sweep),
        "static_over_cluster_violations_feasible": ratio(feasible),
        "ratio_goal_met": (ratio(sweep) or 0.0) >= RATIO_GOAL,
        "cluster_limit_over_budget_ticks": sum(
            r["policies"]["cluster-split"]["limit_over_budget_ticks"] for r in sweep
        ),
        "cluster_max_reserved_over_budget_w": max(r["cluster_max_reserved_over_budget_w"] for r in sweep),
        "violations_sweep": {p: viol(sweep, p) for p in POLICIES},
    }
    result = {
        "scenario": "S3 as three node daemons: a cluster budget split by the allocator vs a static equal split",
        "duration_s": dur,
        "quick": quick,
        "alloc_every_ticks": ALLOC_EVERY_TICKS,
        "nodes": {n: list(g) for n, g in nodes.items()},
        "sweep": sweep,
        "goals": goals,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_json(result, out_dir / "s3_cluster.json")
    return result


def format_result(result: dict[str, Any]) -> str:
    """The table."""
    lines = [
        f"S3 across three node daemons ({result['duration_s']:.0f} s runs): worst engine's QoS violation fraction, "
        "tokens/J",
        f"{'server W':>8} " + " ".join(f"{p:>22}" for p in POLICIES),
    ]
    for r in result["sweep"]:
        cells = []
        for p in POLICIES:
            pr = r["policies"][p]
            cells.append(f"{pr['max_qos_violation_fraction']:>12.3f} {pr['tokens_per_j']:>9.4f}")
        flag = "" if r["oracle_meets_all"] else "  <- oracle misses a target"
        lines.append(f"{r['server_budget_w']:>8.0f} " + " ".join(f"{c:>22}" for c in cells) + flag)
    g = result["goals"]
    lines.append(
        "cluster-split worst engine where the oracle meets every target: "
        f"{g['cluster_max_engine_qos_where_oracle_meets']} (goal < {QOS_GOAL}); "
        "static-split / cluster-split violations over the sweep: "
        f"{g['static_over_cluster_violations_sweep']} (goal >= {RATIO_GOAL}); "
        f"ticks with node limits above the cluster budget: {g['cluster_limit_over_budget_ticks']}; "
        f"violations {g['violations_sweep']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench/s3_cluster")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--duration", type=float)
    ap.add_argument("--step", type=float)
    ap.add_argument("--start", type=float, default=START_BUDGET_W, help="first server budget, W")
    args = ap.parse_args(argv)
    result = run(Path(args.out), args.quick, args.duration, args.step, args.start)
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
