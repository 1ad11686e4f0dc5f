"""``pals-simnode``: the main job. A simulated GPU node served under the real daemon, end to end.

Default: 4x A100-SXM4 serving OLMoE-1B-7B (tensor parallel 4) on the full Azure LLM code trace (2023) with
latency SLOs (TTFT 2 s, TPOT 100 ms, sent to the daemon as the engine's targets), no budget for the first
half, then a 1,300 W budget set over PowerAdmin. Runs the same trace three times on the live daemon: pals
(enforce), the default (advise mode: GPUs at their default limit, configured batch), and the best static cap
in hindsight (found by replaying every static cap that respects the budget, sim/hindsight.py; then run live
in advise mode over GPUs held at it). Prints them side by side; writes summary.json and simnode.png.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from collections.abc import Sequence

import uvloop

from pals_daemon.control.types import EngineTargets
from pals_daemon.model.profile import load_profile_tree
from pals_daemon.server.daemon import default_profiles_dir
from pals_daemon.sim.hindsight import best_static_spec
from pals_daemon.sim.node import PoissonLoad, SimNodeSpec, baseline_of, run_sim_node
from pals_daemon.sim.report import format_table, plot, summarize, write_json
from pals_daemon.sim.trace import DEFAULT_TRACE


def build_parser() -> argparse.ArgumentParser:
    """Arguments of pals-simnode."""
    p = argparse.ArgumentParser(prog="pals-simnode", description=__doc__.splitlines()[0])
    d = SimNodeSpec()
    p.add_argument("--model", default="olmoe-1b-7b", help="served model (a profile and a truth must exist)")
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="CSV with arrival time, input and output tokens")
    p.add_argument(
        "--trace-columns",
        default=",".join(d.trace_columns),
        help="the CSV's arrival-time, input-token and output-token columns, comma-separated",
    )
    p.add_argument("--poisson-rate", type=float, default=None, help="Poisson arrivals per second instead of a trace")
    p.add_argument("--poisson-duration-s", type=float, default=600.0)
    p.add_argument("--poisson-tokens", default="512,256", help="prompt,output tokens of each Poisson request")
    p.add_argument(
        "--nodes", type=int, default=1, help="the trace is split round-robin over N nodes; this one serves 1/N"
    )
    p.add_argument("--time-scale", type=float, default=d.time_scale, help="<1 compresses the trace")
    p.add_argument("--duration-s", type=float, default=None, help="replay only the first S simulated seconds")
    p.add_argument("--speed", type=float, default=60.0, help="simulated seconds per wall second")
    p.add_argument("--budget-w", type=float, default=None, help="node GPU budget from the start (W)")
    p.add_argument("--budget-change-w", type=float, default=1300.0, help="budget set halfway (W); <=0: none")
    p.add_argument("--ttft-slo-ms", type=float, default=2000.0, help="TTFT SLO (reported, and sent as target)")
    p.add_argument("--tpot-slo-ms", type=float, default=100.0, help="TPOT SLO (reported, and sent as target)")
    p.add_argument("--no-baseline", action="store_true", help="skip the default-policy and best-static runs")
    p.add_argument(
        "--no-best-static", action="store_true", help="skip the best static cap in hindsight (replays + a live run)"
    )
    p.add_argument("--out", default="out/simnode", help="directory for summary.json and simnode.png")
    p.add_argument("--log-level", default="warning")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of pals-simnode."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    columns = tuple(c.strip() for c in args.trace_columns.split(","))
    if len(columns) != 3:
        print("pals-simnode: --trace-columns needs three names: time,input,output", file=sys.stderr)
        return 2
    poisson = None
    if args.poisson_rate is not None:
        prompt, output = (int(x) for x in args.poisson_tokens.split(","))
        poisson = PoissonLoad(args.poisson_rate, args.poisson_duration_s, prompt, output)
    spec = SimNodeSpec(
        model=args.model,
        trace_path=args.trace,
        trace_columns=columns,
        poisson=poisson,
        time_scale=args.time_scale,
        nodes=args.nodes,
        duration_s=args.duration_s,
        speed=args.speed,
        initial_budget_w=args.budget_w,
        budget_change_w=args.budget_change_w if args.budget_change_w > 0 else None,
        targets=EngineTargets(ttft_ms=args.ttft_slo_ms, tpot_ms=args.tpot_slo_ms),
    )
    specs = [spec] if args.no_baseline else [spec, baseline_of(spec)]
    if not (args.no_baseline or args.no_best_static or spec.poisson is not None):
        print("finding the best static cap in hindsight (replaying every static cap)...", file=sys.stderr, flush=True)
        static = best_static_spec(spec, load_profile_tree(str(default_profiles_dir())))
        if static is None:
            print("no static cap within the budget keeps the default's SLO attainment (within 1 pp)", file=sys.stderr)
        else:
            specs.append(static)
    results = []
    for s in specs:
        label = "pals" if s.mode == "enforce" else "default"
        if s.static_cap_w is not None:
            label = f"static {s.static_cap_w:g} W"
        print(
            f"running {s.model} on {s.num_gpus}x {s.gpu_kind}, policy {label} (speed {s.speed:g}x)...",
            file=sys.stderr,
            flush=True,
        )
        results.append(uvloop.run(run_sim_node(s)))
    rows = [summarize(r, args.ttft_slo_ms, args.tpot_slo_ms) for r in results]
    print(format_table(rows))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"spec": {k: str(v) for k, v in vars(spec).items()}, "runs": rows}
    if len(rows) >= 2 and rows[1]["node"]["output_tokens_per_j"]:
        ratio = rows[0]["node"]["output_tokens_per_j"] / rows[1]["node"]["output_tokens_per_j"]
        payload["tokens_per_j_vs_default"] = round(ratio, 4)
        print(f"\nnode tokens/J, pals vs default: {ratio:.3f}x")
    for row in rows[2:]:
        e_pals, e_static = rows[0]["node"]["energy_per_output_token_j"], row["node"]["energy_per_output_token_j"]
        if e_pals and e_static:
            payload["energy_per_output_token_vs_best_static"] = round(e_pals / e_static, 4)
            payload["best_static"] = row["policy"]
            ratio = e_pals / e_static
            print(f"energy per output token, pals vs the best static in hindsight ({row['policy']}): {ratio:.3f}x")
    for row in rows:
        att = row["engines"]["engine0"]["slo_attainment"]
        if att is not None:
            print(f"SLO attainment (TTFT and TPOT), {row['policy']}: {100 * att:.2f}%")
    write_json(out / "summary.json", payload)
    plot(results, out / "simnode.png")
    print(f"wrote {out / 'summary.json'} and {out / 'simnode.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
