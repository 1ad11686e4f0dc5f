"""``pals-simnode``: the main job. A simulated GPU node served under the real daemon, end to end.

Default: 4x A100-SXM4 serving Mixtral-8x7B (tensor parallel 4) on the Azure LLM code trace (2023), no
budget for the first half, then a budget set over PowerAdmin. Runs the same trace a second time with the
daemon in advise mode (GPUs at their default limit, configured batch: the "default" policy) and prints
both side by side. Writes summary.json and simnode.png into --out.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from collections.abc import Sequence

import uvloop

from pals_daemon.control.types import EngineTargets
from pals_daemon.sim.node import PoissonLoad, SimNodeSpec, baseline_of, run_sim_node
from pals_daemon.sim.report import format_table, plot, summarize, write_json
from pals_daemon.sim.trace import DEFAULT_TRACE


def build_parser() -> argparse.ArgumentParser:
    """Arguments of pals-simnode."""
    p = argparse.ArgumentParser(prog="pals-simnode", description=__doc__.splitlines()[0])
    d = SimNodeSpec()
    p.add_argument("--model", default=d.model, help="served model (a profile and a truth must exist)")
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
        "--nodes", type=int, default=2, help="the trace is split round-robin over N nodes; this one serves 1/N"
    )
    p.add_argument("--time-scale", type=float, default=d.time_scale, help="<1 compresses the trace")
    p.add_argument("--duration-s", type=float, default=None, help="replay only the first S simulated seconds")
    p.add_argument("--speed", type=float, default=60.0, help="simulated seconds per wall second")
    p.add_argument("--budget-w", type=float, default=None, help="node GPU budget from the start (W)")
    p.add_argument("--budget-change-w", type=float, default=900.0, help="budget set halfway (W); <=0: none")
    p.add_argument("--ttft-slo-ms", type=float, default=2000.0, help="TTFT SLO (reported, and sent as target)")
    p.add_argument("--tpot-slo-ms", type=float, default=200.0, help="TPOT SLO (reported, and sent as target)")
    p.add_argument("--no-baseline", action="store_true", help="skip the default-policy run")
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
    results = []
    for s in specs:
        print(
            f"running {s.model} on {s.num_gpus}x {s.gpu_kind}, policy {'pals' if s.mode == 'enforce' else 'default'}"
            f" (speed {s.speed:g}x)...",
            file=sys.stderr,
            flush=True,
        )
        results.append(uvloop.run(run_sim_node(s)))
    rows = [summarize(r, args.ttft_slo_ms, args.tpot_slo_ms) for r in results]
    print(format_table(rows))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"spec": {k: str(v) for k, v in vars(spec).items()}, "runs": rows}
    if len(rows) == 2 and rows[1]["node"]["output_tokens_per_j"]:
        ratio = rows[0]["node"]["output_tokens_per_j"] / rows[1]["node"]["output_tokens_per_j"]
        payload["tokens_per_j_vs_default"] = round(ratio, 4)
        print(f"\nnode tokens/J, pals vs default: {ratio:.3f}x")
    write_json(out / "summary.json", payload)
    plot(results, out / "simnode.png")
    print(f"wrote {out / 'summary.json'} and {out / 'simnode.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
