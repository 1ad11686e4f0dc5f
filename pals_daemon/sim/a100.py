"""The 4x A100-SXM4 (TP4) power-cap x batch sweep: read it, fit the physics to it, build a model's truth from it.

Source: data/a100_moe_tp4_power_cap_sweep.csv (mrhankendi/AI_LLM ``moe_summary_tp4.xlsx``, the first PALS author's
repository; see data/README.md). The fitted constants are data (:mod:`pals_daemon.sim.fitted`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pals_daemon.sim.catalogue import canonical_model_name, model_spec
from pals_daemon.sim.fitted import a100_physics
from pals_daemon.sim.fitting import DATA_DIR, best_fit, physics_bounds
from pals_daemon.sim.hardware import A100_SXM4
from pals_daemon.sim.model_truth import ModelTruth, Perturbation
from pals_daemon.sim.physics import DecodePhysics

DEFAULT_SWEEP_CSV = DATA_DIR / "a100_moe_tp4_power_cap_sweep.csv"


def load_a100_truth(
    model_name: str,
    csv_path: str | Path = DEFAULT_SWEEP_CSV,
    *,
    perturbation: Perturbation | None = None,
    kv_capacity_tokens: int | None = None,
    monotone: bool = False,
    physics: bool = True,
) -> ModelTruth:
    """The truth of ``model_name`` (CSV name or alias) from the 4x A100-SXM4 TP4 power-cap sweep.

    ``monotone=True`` replaces each value by the running maximum along cap (and throughput along batch) so
    that more power never gives less; the default keeps the measurements exactly (they have a few
    non-monotone points within measurement noise, e.g. qwen1.5-moe-a2.7b batch 64 at 350 vs. 400 W).
    ``physics=False`` gives the grid-only truth (bilinear interpolation of the measurements).
    """
    name = canonical_model_name(model_name)
    spec = model_spec(name)
    caps, batches, thr, pw, tp = read_a100_sweep(name, csv_path)
    if monotone:
        thr = np.maximum.accumulate(np.maximum.accumulate(thr, axis=0), axis=1)
        pw = np.maximum.accumulate(pw, axis=0)
    ph = a100_physics(name) if physics else None
    return ModelTruth(
        spec,
        caps,
        batches,
        thr,
        pw,
        num_gpus=tp,
        hardware=A100_SXM4,
        kv_capacity_tokens=kv_capacity_tokens,
        perturbation=perturbation,
        physics=ph,
        source=f"{Path(csv_path).name} (A100-SXM4, TP{tp})",
    )


def read_a100_sweep(
    model_name: str, csv_path: str | Path = DEFAULT_SWEEP_CSV
) -> tuple[list[float], list[int], np.ndarray, np.ndarray, int]:
    """(caps, batches, throughput grid, per-GPU power grid, tp) of one model of the A100 sweep CSV."""
    name = canonical_model_name(model_name)
    points: dict[tuple[float, int], tuple[float, float]] = {}
    num_gpus: set[int] = set()
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"model", "tp", "cap_w", "batch", "avg_Tokens_per_s", "avg_gpu_power"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path}: missing columns {sorted(missing)}")
        for row_no, row in enumerate(reader, start=2):
            if row["model"].strip().lower() != name:
                continue
            try:
                key = (float(row["cap_w"]), int(row["batch"]))
                points[key] = (float(row["avg_Tokens_per_s"]), float(row["avg_gpu_power"]))
                num_gpus.add(int(row["tp"]))
            except ValueError as e:
                raise ValueError(f"{csv_path}:{row_no}: {e}") from None
    if not points:
        raise ValueError(f"{csv_path}: no rows for model {name!r}")
    if len(num_gpus) != 1:
        raise ValueError(f"{csv_path}: model {name!r} has rows with several tp values {sorted(num_gpus)}")
    caps = sorted({c for c, _ in points})
    batches = sorted({b for _, b in points})
    thr = np.full((len(caps), len(batches)), np.nan)
    pw = np.full_like(thr, np.nan)
    for (c, b), (t, p) in points.items():
        thr[caps.index(c), batches.index(b)] = t
        pw[caps.index(c), batches.index(b)] = p
    _fill_missing_along_caps(thr, caps, name)
    _fill_missing_along_caps(pw, caps, name)
    return caps, batches, thr, pw, num_gpus.pop()


def fit_a100_physics(model_name: str, csv_path: str | Path = DEFAULT_SWEEP_CSV) -> DecodePhysics:
    """Fit the decode physics of one A100 model to its sweep (multi-start Levenberg-Marquardt; seconds)."""
    name = canonical_model_name(model_name)
    spec = model_spec(name)
    caps, batches, thr, pw, _ = read_a100_sweep(name, csv_path)
    cc, bb = np.meshgrid(np.array(caps), np.array(batches, dtype=float), indexing="ij")
    c, b, t, p = cc.ravel(), bb.ravel(), (bb / thr).ravel(), pw.ravel()
    top = np.argmax(caps)
    t1, tn = t[(c == caps[top]) & (b == b.min())][0], t[(c == caps[top]) & (b == b.max())][0]
    slope = max(tn - t1, 1e-6) / max(1.0, b.max() - b.min())
    base = DecodePhysics(
        A100_SXM4.idle_power_w, spec.num_experts, spec.top_k, 0.5 * t1, 0.2 * t1, 0.3 * slope, 0.2 * t1, 0.5 * slope,
        150.0, 300.0, 2.5, 0.4, 1.0, 0.15,
    )  # fmt: skip
    return best_fit(base, b, c, t, p, _A100_STARTS, free=None, bounds=physics_bounds(A100_SXM4))


# Modelled: starting points of the multi-start fit (alpha, p_mem_w, f_knee, routing_factor).
_A100_STARTS = [
    {"alpha": a, "p_mem_w": pm, "f_knee": fk, "routing_factor": rf}
    for a in (1.6, 2.5)
    for pm in (80.0, 200.0)
    for fk in (0.3, 0.6)
    for rf in (1.0, 0.3)
]


def _fill_missing_along_caps(grid: np.ndarray, caps: list[float], name: str) -> None:
    """Fill grid points the sweep lacks by linear interpolation along cap at the same batch (in place)."""
    for j in range(grid.shape[1]):
        col = grid[:, j]
        have = ~np.isnan(col)
        if not have.any():
            raise ValueError(f"model {name!r}: a batch column has no measurements")
        if not have.all():
            xs = np.array(caps)
            col[~have] = np.interp(xs[~have], xs[have], col[have])
