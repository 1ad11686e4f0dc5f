"""Calibration of the simulated truth: error per model of the physics (and of the truth) against measurements.

A100: the 4x A100-SXM4 TP4 power-cap x batch sweep (data/a100_moe_tp4_power_cap_sweep.csv), throughput and
per-GPU power at every measured point. H100: ML.ENERGY v3 batch sweeps at 700 W (text tasks, MoE models),
median inter-token latency and per-GPU power per batch. "physics" is the fitted physical model alone
(pals_daemon.sim.physics); "truth" adds the residual-correction table and is exact at measured points.

    python bench/sim_calibration.py                      # table + bench/results/sim_calibration.json
    python bench/sim_calibration.py --refit --write      # refit the physics, rewrite pals_daemon/sim/data/fitted/*.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from pals_daemon.sim import a100, calibration, fitted, h100  # noqa: E402
from pals_daemon.sim.catalogue import known_models  # noqa: E402
from pals_daemon.sim.physics import DecodePhysics  # noqa: E402


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _repo_path(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (provenance must not name this machine)."""
    try:
        return str(path.resolve().relative_to(_REPO_ROOT))
    except ValueError:
        return path.name


def _source(csv: Path, origin: str, rows: str) -> dict[str, str]:
    """Where a fit's data came from: the CSV (repository path and SHA-256), its origin, and the rows used."""
    return {"csv": _repo_path(csv), "sha256": _sha256(csv), "origin": origin, "rows": rows}


def fitted_documents(
    a100_fits: dict[str, DecodePhysics], h100_fits: dict[tuple[str, int], DecodePhysics], fitted_on: str
) -> tuple[dict[str, object], dict[str, object]]:
    """The A100 and H100 fitted-physics files for these fits: provenance, constants, residuals of the physics."""
    a100_csv = Path(a100.DEFAULT_SWEEP_CSV)
    a100_doc = fitted.fitted_document(
        source=_source(
            a100_csv,
            "mrhankendi/AI_LLM moe_summary_tp4.xlsx (see data/README.md)",
            "the rows whose model column is the entry's model: every (cap_w, batch) point, 30 per model; "
            "step time = batch / avg_Tokens_per_s, power = avg_gpu_power",
        ),
        fit={
            "function": "pals_daemon.sim.a100.fit_a100_physics",
            "method": "least squares on log step time and log power (pals_daemon.sim.physics.fit_decode_physics, "
            "Levenberg-Marquardt within pals_daemon.sim.fitting.physics_bounds), best of 16 starts; every field free",
            "cited": "idle_w from the hardware profile (A100-SXM4), num_experts and top_k from the model catalogue",
            "command": "python bench/sim_calibration.py --refit --write",
        },
        fitted_on=fitted_on,
        entries=[
            {
                "model": m,
                "physics": fitted.physics_fields(ph, fitted.A100_FITTED_FIELDS),
                "residuals": calibration.a100_physics_errors(ph, m),
            }
            for m, ph in a100_fits.items()
        ],
    )
    h100_csv = h100.default_mlenergy_csv()
    h100_entries = []
    for (m, n), ph in h100_fits.items():
        sw = h100.read_h100_sweep(m, n)
        h100_entries.append(
            {
                "model_id": m,
                "num_gpus": n,
                "physics": fitted.physics_fields(ph, fitted.H100_FITTED_FIELDS),
                "points": int(sw.batch.size),
                "residuals": calibration.h100_physics_errors(ph, sw),
            }
        )
    h100_doc = fitted.fitted_document(
        source=_source(
            h100_csv,
            "ML.ENERGY Benchmark v3, ml-energy/leaderboard, Apache-2.0 (see data/README.md)",
            "gpu_model H100, task in lm-arena-chat / gpqa / sourcegraph-fim, the entry's model_id and num_gpus; "
            "rows with equal max_num_seqs averaged (points); step time = median_itl_ms, power = avg_power_watts / "
            "num_gpus, batch = avg_batch_size, all at the 700 W default limit",
        ),
        fit={
            "function": "pals_daemon.sim.h100.fit_h100_physics",
            "method": "least squares on log ITL and log power (pals_daemon.sim.physics.fit_decode_physics, "
            "Levenberg-Marquardt within pals_daemon.sim.fitting.physics_bounds), best of 4 starts",
            "transferred": "alpha and f_knee: the median of the A100 fits (pals_daemon.sim.fitted.H100_ALPHA, "
            "H100_F_KNEE); f_min and core_mem_share: modelled (H100_F_MIN, H100_CORE_MEM_SHARE); idle_w from the "
            "hardware profile (H100-SXM5)",
            "command": "python bench/sim_calibration.py --refit --write",
        },
        fitted_on=fitted_on,
        entries=h100_entries,
    )
    return a100_doc, h100_doc


def refit(write: bool) -> None:
    """Refit every model; print the constants and, with ``write``, rewrite the fitted-physics data files."""
    t0 = time.time()
    a100_fits = {m: a100.fit_a100_physics(m) for m in known_models()}
    alphas = sorted(p.alpha for p in a100_fits.values())
    knees = sorted(p.f_knee for p in a100_fits.values())
    print(
        f"# A100 fits in {time.time() - t0:.1f} s; median alpha {np.median(alphas):.3g}, f_knee {np.median(knees):.3g}"
    )
    h100_fits = {k: h100.fit_h100_physics(*k) for k in h100.known_h100_models()}
    a100_doc, h100_doc = fitted_documents(a100_fits, h100_fits, datetime.date.today().isoformat())
    for doc in (a100_doc, h100_doc):
        for entry in doc["entries"]:  # type: ignore[attr-defined]
            key = entry.get("model") or f"{entry['model_id']} x{entry['num_gpus']}"
            print(f"{key}: {json.dumps(entry['physics'])}")
    if write:
        fitted.write_fitted(fitted.A100_FITTED_JSON, a100_doc)
        fitted.write_fitted(fitted.H100_FITTED_JSON, h100_doc)
        print(f"# wrote {fitted.A100_FITTED_JSON} and {fitted.H100_FITTED_JSON}")


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
    ap.add_argument("--write", action="store_true", help="with --refit: rewrite the fitted-physics data files")
    args = ap.parse_args(argv)
    if args.refit:
        refit(args.write)
        return 0
    a100_rows = [calibration.a100_calibration(m) for m in known_models()]
    try:
        h100_rows = [calibration.h100_calibration(m, n) for m, n in h100.known_h100_models()]
    except FileNotFoundError:
        h100_rows = []
        print("(ML.ENERGY CSV not found: H100 skipped)")
    print("A100-SXM4 x4 TP4, power cap 100-400 W x batch 1-64 (MAPE % / max %)")
    head = ("physics thr", "physics power", "truth thr", "truth power")
    print(f"{'model':40s} {'pts':>3s}  " + "  ".join(f"{h:>13s}" for h in head))
    for r in a100_rows:
        print(
            f"{r['model']:40s} {r['points']:3d}  {_fmt(r.get('physics_throughput')):>13s}  "
            f"{_fmt(r.get('physics_power')):>13s}  {_fmt(r['truth_throughput']):>13s}  {_fmt(r['truth_power']):>13s}"
        )
    if h100_rows:
        print("\nH100-SXM5 at 700 W, ML.ENERGY v3 batch sweeps (MAPE % / max %)")
        print(
            f"{'model':50s} {'gpus':>4s} {'pts':>3s}  {'physics ITL':>13s}  {'physics power':>13s}  "
            f"{'b/ITL vs thr':>13s}  {'truth ITL':>13s}  {'truth power':>13s}"
        )
        for r in h100_rows:
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
    out.write_text(json.dumps({"a100": a100_rows, "h100": h100_rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
