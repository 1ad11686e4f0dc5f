"""Calibration report: errors of the fitted physics alone, and of the truth, at every measured point.

"physics" is the fitted physical model alone (:mod:`pals_daemon.sim.physics` with :mod:`pals_daemon.sim.fitted`);
"truth" adds the residual-correction table and is exact at measured points. Printed by bench/sim_calibration.py,
whose ``--refit --write`` also stores the physics errors as the residuals of each fitted-data entry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pals_daemon.sim.a100 import DEFAULT_SWEEP_CSV, load_a100_truth, read_a100_sweep
from pals_daemon.sim.catalogue import canonical_model_name
from pals_daemon.sim.fitted import a100_physics, h100_physics
from pals_daemon.sim.h100 import H100Sweep, load_h100_truth, read_h100_sweep
from pals_daemon.sim.hardware import H100_SXM5
from pals_daemon.sim.physics import DecodePhysics


def _errors(model: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """MAPE and max absolute relative error (both in %) of ``model`` against ``measured``."""
    rel = np.abs(np.asarray(model, float) / np.asarray(measured, float) - 1.0) * 100.0
    return {"mape_pct": float(rel.mean()), "max_pct": float(rel.max())}


def a100_physics_errors(
    ph: DecodePhysics, model_name: str, csv_path: str | Path = DEFAULT_SWEEP_CSV
) -> dict[str, object]:
    """Throughput and power errors of the physics ``ph`` alone at every measured A100 point of ``model_name``."""
    caps, batches, thr, pw, _ = read_a100_sweep(model_name, csv_path)
    cc, bb = np.meshgrid(np.array(caps), np.array(batches, dtype=float), indexing="ij")
    t, p, _ = ph.decode(bb.ravel(), cc.ravel())
    return {"physics_throughput": _errors(bb.ravel() / t, thr.ravel()), "physics_power": _errors(p, pw.ravel())}


def h100_physics_errors(ph: DecodePhysics, sw: H100Sweep) -> dict[str, object]:
    """ITL, power and b / ITL vs. output-throughput errors of the physics ``ph`` alone on one H100 sweep."""
    t, p, _ = ph.decode(sw.batch, np.full_like(sw.batch, H100_SXM5.max_limit_w))
    return {
        "physics_itl": _errors(t, sw.itl_s),
        "physics_power": _errors(p, sw.power_w_per_gpu),
        "physics_throughput": _errors(sw.batch / t, sw.throughput_tokens_per_s),
    }


def a100_calibration(model_name: str, csv_path: str | Path = DEFAULT_SWEEP_CSV) -> dict[str, object]:
    """Errors of the physics alone and of the truth (physics + residual table) at every measured A100 point."""
    name = canonical_model_name(model_name)
    caps, batches, thr, pw, tp = read_a100_sweep(name, csv_path)
    ph = a100_physics(name)
    truth = load_a100_truth(name, csv_path)
    cc, bb = np.meshgrid(np.array(caps), np.array(batches, dtype=float), indexing="ij")
    out: dict[str, object] = {"model": name, "gpu": "A100-SXM4", "num_gpus": tp, "points": int(thr.size)}
    if ph is not None:
        out.update(a100_physics_errors(ph, name, csv_path))
    tt = np.array([truth.throughput_tokens_per_s(c, b) for c, b in zip(cc.ravel(), bb.ravel(), strict=True)])
    tp_ = np.array([truth.power_w(c, b) for c, b in zip(cc.ravel(), bb.ravel(), strict=True)])
    out["truth_throughput"] = _errors(tt, thr.ravel())
    out["truth_power"] = _errors(tp_, pw.ravel())
    return out


def h100_calibration(model_id: str, num_gpus: int, csv_path: str | Path | None = None) -> dict[str, object]:
    """Errors of the physics alone (ITL, power, b / ITL vs. output throughput) and of the truth on one H100 sweep."""
    sw = read_h100_sweep(model_id, num_gpus, csv_path)
    ph = h100_physics(sw.model_id, num_gpus)
    out: dict[str, object] = {
        "model": sw.model_id,
        "gpu": "H100-SXM5",
        "num_gpus": num_gpus,
        "task": sw.task,
        "precision": sw.precision,
        "points": int(sw.batch.size),
    }
    if ph is not None:
        out.update(h100_physics_errors(ph, sw))
    truth = load_h100_truth(sw.model_id, num_gpus, csv_path)
    bs = [max(1, round(float(b))) for b in sw.batch]
    cap = H100_SXM5.max_limit_w
    out["truth_itl"] = _errors([truth.decode_step(cap, b).step_time_s for b in bs], sw.itl_s)
    out["truth_power"] = _errors([truth.power_w(cap, b) for b in bs], sw.power_w_per_gpu)
    return out
