"""Calibration of the simulated truth: error per model of the physics (and of the truth) against measurements.

A100: the 4x A100-SXM4 TP4 power-cap x batch sweep (data/a100_moe_tp4_power_cap_sweep.csv), throughput and
per-GPU power at every measured point. H100: ML.ENERGY v3 batch sweeps at 700 W (text tasks, MoE models),
median inter-token latency and per-GPU power per batch. "physics" is the fitted physical model alone
(pals_daemon.sim.physics); "truth" adds the residual-correction table and is exact at measured points.

    python bench/sim_calibration.py                      # table + bench/results/sim_calibration.json
    python bench/sim_calibration.py --refit --write      # refit the physics, rewrite the constants in truth.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from pals_daemon.sim import truth as tr  # noqa: E402
from pals_daemon.sim.physics import DecodePhysics  # noqa: E402

_A100_FIELDS = (
    "t_fixed_s",
    "t_expert_s",
    "t_token_mem_s",
    "t_clk0_s",
    "t_clk_token_s",
    "p_mem_w",
    "p_sm_w",
    "alpha",
    "f_knee",
    "routing_factor",
    "f_min",
)
_H100_FIELDS = tr._H100_FREE


def _literal(ph: DecodePhysics, names: tuple[str, ...]) -> str:
    """A dict literal of the fitted fields of ``ph`` (6 significant digits)."""
    return "{" + ", ".join(f'"{n}": {float(getattr(ph, n)):.6g}' for n in names) + "}"


def refit(write: bool) -> None:
    """Refit every model; print the constants and, with ``write``, replace them in truth.py."""
    t0 = time.time()
    a100 = {m: tr.fit_a100_physics(m) for m in tr.known_models()}
    alphas = sorted(p.alpha for p in a100.values())
    knees = sorted(p.f_knee for p in a100.values())
    print(
        f"# A100 fits in {time.time() - t0:.1f} s; median alpha {np.median(alphas):.3g}, f_knee {np.median(knees):.3g}"
    )
    lines_a = ["_A100_PHYSICS: dict[str, dict[str, float]] = {"]
    lines_a += [f'    "{m}": {_literal(p, _A100_FIELDS)},' for m, p in a100.items()]
    lines_a.append("}")
    h100 = {k: tr.fit_h100_physics(*k) for k in tr.known_h100_models()}
    lines_h = ["_H100_PHYSICS: dict[tuple[str, int], dict[str, float]] = {"]
    lines_h += [f'    ("{m}", {n}): {_literal(p, _H100_FIELDS)},' for (m, n), p in h100.items()]
    lines_h.append("}")
    block_a, block_h = "\n".join(lines_a), "\n".join(lines_h)
    print(block_a)
    print(block_h)
    if write:
        path = Path(tr.__file__)
        src = path.read_text()
        src = re.sub(
            r"(# BEGIN FITTED A100\n).*?(\n# END FITTED A100)",
            lambda m: m.group(1) + block_a + m.group(2),
            src,
            flags=re.S,
        )
        src = re.sub(
            r"(# BEGIN FITTED H100\n).*?(\n# END FITTED H100)",
            lambda m: m.group(1) + block_h + m.group(2),
            src,
            flags=re.S,
        )
        path.write_text(src)
        print(f"# wrote {path}")


def _fmt(e: object) -> str:
    """'MAPE / max' of an error dict, in %."""
    if not isinstance(e, dict):
        return "-"
    return f"{e['mape_pct']:5.2f} / {e['max_pct']:5.1f}"


def main(argv: list[str] | None = None) -> int:
    """Print the calibration table and write it as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(_REPO_ROOT / "bench" / "results" / "sim_calibration.json"))
    ap.add_argument("--refit", action="store_true", help="refit the physics constants (about a minute)")
    ap.add_argument("--write", action="store_true", help="with --refit: rewrite the constants in truth.py")
    args = ap.parse_args(argv)
    if args.refit:
        refit(args.write)
        return 0
    a100 = [tr.a100_calibration(m) for m in tr.known_models()]
    try:
        h100 = [tr.h100_calibration(m, n) for m, n in tr.known_h100_models()]
    except FileNotFoundError:
        h100 = []
        print("(ML.ENERGY CSV not found: H100 skipped)")
    print("A100-SXM4 x4 TP4, power cap 100-400 W x batch 1-64 (MAPE % / max %)")
    head = ("physics thr", "physics power", "truth thr", "truth power")
    print(f"{'model':40s} {'pts':>3s}  " + "  ".join(f"{h:>13s}" for h in head))
    for r in a100:
        print(
            f"{r['model']:40s} {r['points']:3d}  {_fmt(r.get('physics_throughput')):>13s}  "
            f"{_fmt(r.get('physics_power')):>13s}  {_fmt(r['truth_throughput']):>13s}  {_fmt(r['truth_power']):>13s}"
        )
    if h100:
        print("\nH100-SXM5 at 700 W, ML.ENERGY v3 batch sweeps (MAPE % / max %)")
        print(
            f"{'model':50s} {'gpus':>4s} {'pts':>3s}  {'physics ITL':>13s}  {'physics power':>13s}  "
            f"{'b/ITL vs thr':>13s}  {'truth ITL':>13s}  {'truth power':>13s}"
        )
        for r in h100:
            print(
                f"{r['model']:50s} {r['num_gpus']:4d} {r['points']:3d}  {_fmt(r.get('physics_itl')):>13s}  "
                f"{_fmt(r.get('physics_power')):>13s}  {_fmt(r.get('physics_throughput')):>13s}  "
                f"{_fmt(r['truth_itl']):>13s}  {_fmt(r['truth_power']):>13s}"
            )
    print(
        "\nphysics: the fitted model alone; truth: with the residual table (exact at measured points). "
        "b/ITL vs thr: batch / modelled ITL against the measured output throughput (informative: it includes "
        "prefill and scheduling gaps the decode step does not)."
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"a100": a100, "h100": h100}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
