"""MoE routing skew (issue 4): routing-aware per-GPU caps against uniform caps, same QoS, in simulated time.

One engine, Mixtral-8x7B on 4 A100s with expert parallelism where GPU 0 hosts the hottest experts: expert load
shares (0.4, 0.2, 0.2, 0.2) by default (modelled; the simulated truth's ``decode_step_skewed``: the most loaded
GPU is the straggler, the others wait at idle power). The engine reports its per-GPU expert load (what the
worker extension sends; the replay builds ``EngineObservation.expert_load_share`` like the daemon). Load is a
saturated Poisson stream (``--load-factor`` x the default configuration's capacity, so demand never falls below
the target); the throughput target is ``--target-fraction`` of the unconstrained (``default`` policy) throughput
on the same skewed truth. No budget.

Policies, on the same requests:
- ``pals``: the controller with ``routing_aware_caps=True`` (the cold GPUs below the straggler's cap);
- ``pals-uniform``: the same controller with ``routing_aware_caps=False`` (one cap for the engine's GPUs);
- ``default`` (for reference: max caps, configured batch).

A QoS violation is a 5 s window below target; figures exclude a 30 s warm-up. Goal: ``pals`` beats
``pals-uniform`` on tokens/J with no more QoS violations.

    python bench/scenario_moe_skew.py --out out/bench/moe_skew            # table + JSON
    python bench/scenario_moe_skew.py --out /tmp/moe --duration 120       # quick
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.types import EngineTargets
from pals_daemon.model.profile import ProfileRegistry, load_profiles
from pals_daemon.replay.scenario import EngineSpec, PoissonLoad, Scenario
from pals_daemon.replay.simulate import PolicyRun, prepare, run_policy
from pals_daemon.server.daemon import default_profiles_dir
from pals_daemon.sim.truth import load_a100_truth

MODEL = "mixtral-8x7b-instruct"
DEFAULT_SHARE = (0.4, 0.2, 0.2, 0.2)
PROMPT_TOKENS = (128, 256, 384, 512, 768, 1024)
OUTPUT_TOKENS = (64, 128, 192, 256, 384, 512)
DEFAULT_TARGET_FRACTION = 0.65
DEFAULT_LOAD_FACTOR = 1.5
DEFAULT_DURATION_S = 600.0
WARMUP_S = 30.0
POLICY_NAMES = ("default", "pals-uniform", "pals")


def engine_spec(share: Sequence[float] | None, load_factor: float, seed: int = 7) -> EngineSpec:
    """The Mixtral engine (no target yet) under a saturated Poisson load."""
    truth = load_a100_truth(MODEL)
    if share is None:
        capacity = truth.throughput_tokens_per_s(400.0, 64)
    else:
        capacity = 64 / truth.decode_step_skewed([400.0] * 4, 64, share).step_time_s
    rate = load_factor * capacity / float(np.mean(OUTPUT_TOKENS))
    load = PoissonLoad(rate, prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS, seed=seed)
    return EngineSpec(
        engine_id="mixtral",
        model=MODEL,
        load=load,
        expert_load_share=None if share is None else tuple(float(s) for s in share),
    )


def run(
    registry: ProfileRegistry,
    duration_s: float = DEFAULT_DURATION_S,
    share: Sequence[float] = DEFAULT_SHARE,
    target_fraction: float = DEFAULT_TARGET_FRACTION,
    load_factor: float = DEFAULT_LOAD_FACTOR,
    policies: Sequence[str] = POLICY_NAMES,
    seed: int = 7,
) -> tuple[dict[str, PolicyRun], float]:
    """Every policy on the skewed engine with its target; returns the runs and the target (tokens/s)."""
    spec = engine_spec(share, load_factor, seed)
    free_sc = Scenario("moe-skew-free", (spec,), duration_s=duration_s, warmup_s=WARMUP_S)
    prep = prepare(free_sc)
    free = run_policy(free_sc, "default", registry, prep)
    target = target_fraction * free.output_tokens / free.duration_s
    spec = replace(spec, targets=EngineTargets(tokens_per_s=target))
    sc = Scenario("moe-skew", (spec,), duration_s=duration_s, warmup_s=WARMUP_S)
    out: dict[str, PolicyRun] = {}
    base_cfg = ControllerConfig(gpu_kind="A100-SXM4")
    for name in policies:
        if name == "default":
            out[name] = free
        elif name == "pals":
            out[name] = run_policy(sc, "pals", registry, prep, config=replace(base_cfg, routing_aware_caps=True))
        elif name == "pals-uniform":
            out[name] = run_policy(sc, "pals", registry, prep, config=replace(base_cfg, routing_aware_caps=False))
        else:
            raise ValueError(f"unknown policy {name!r}")
    return out, target


def row(run: PolicyRun) -> dict[str, Any]:
    """One policy's figures."""
    (e,) = run.engines
    span = run.duration_s
    return {
        "tokens_per_j": round(run.tokens_per_j, 4),
        "tokens_per_s": round(run.output_tokens / span, 1) if span > 0 else 0.0,
        "mean_gpu_power_w": round(run.gpu_energy_j / span, 1) if span > 0 else 0.0,
        "qos_windows": e.qos_windows,
        "qos_violations": e.qos_violations,
        "qos_violation_fraction": round(e.qos_violation_fraction, 4),
        "output_tokens": run.output_tokens,
        "gpu_energy_j": round(run.gpu_energy_j, 1),
        "mean_cap_w_per_gpu": mean_caps(run),
    }


def mean_caps(run: PolicyRun) -> dict[int, float]:
    """Mean requested limit of each GPU over the ticks after the warm-up."""
    tl = run.timeline
    keep = [k for k, t in enumerate(tl.t_s) if t >= WARMUP_S]
    return {idx: round(float(np.mean([v[k] for k in keep])), 1) for idx, v in tl.gpu_cap_w.items() if keep}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench/moe_skew", help="output directory (JSON)")
    ap.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="simulated seconds per run")
    ap.add_argument("--share", type=float, nargs="+", default=list(DEFAULT_SHARE), help="expert load share per GPU")
    ap.add_argument("--target-fraction", type=float, default=DEFAULT_TARGET_FRACTION)
    ap.add_argument("--load-factor", type=float, default=DEFAULT_LOAD_FACTOR)
    ap.add_argument("--seed", type=int, default=7, help="seed of the Poisson arrivals and lengths")
    args = ap.parse_args(argv)
    registry = load_profiles(str(default_profiles_dir()))
    runs, target = run(registry, args.duration, args.share, args.target_fraction, args.load_factor, seed=args.seed)
    rows = {name: row(r) for name, r in runs.items()}
    aware, uniform = rows["pals"], rows["pals-uniform"]
    gain = aware["tokens_per_j"] / uniform["tokens_per_j"] - 1 if uniform["tokens_per_j"] else float("nan")
    print(
        f"MoE skew: {MODEL} on 4 A100, shares {tuple(args.share)}, target {target:.0f} tokens/s "
        f"({args.target_fraction:.0%} of default), load {args.load_factor}x, {args.duration:.0f} s "
        f"({WARMUP_S:.0f} s warm-up excluded)"
    )
    print(f"{'policy':<14}{'tokens/J':>10}{'tokens/s':>10}{'GPU W':>9}{'QoS viol.':>12}  mean cap per GPU (W)")
    for name, r in rows.items():
        viol = f"{r['qos_violations']}/{r['qos_windows']}"
        caps = " ".join(f"{v:.0f}" for v in r["mean_cap_w_per_gpu"].values())
        print(
            f"{name:<14}{r['tokens_per_j']:>10.4f}{r['tokens_per_s']:>10.1f}{r['mean_gpu_power_w']:>9.1f}"
            f"{viol:>12}  {caps}"
        )
    print(f"routing-aware vs uniform caps: tokens/J {gain:+.1%}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "scenario": "moe-skew",
        "model": MODEL,
        "num_gpus": 4,
        "expert_load_share": list(args.share),
        "target_tokens_per_s": round(target, 1),
        "target_fraction": args.target_fraction,
        "load_factor": args.load_factor,
        "duration_s": args.duration,
        "seed": args.seed,
        "warmup_s": WARMUP_S,
        "policies": rows,
        "tokens_per_j_gain_routing_aware_vs_uniform": round(gain, 4),
        "modelled": "routing skew response of the simulated truth (decode_step_skewed) and the controller's "
        "per-GPU cap model (control/core.py _ROUTING_EXPERT_TIME_FRACTION)",
    }
    (out / "moe_skew.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out / 'moe_skew.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
