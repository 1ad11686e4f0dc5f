"""ML.ENERGY Benchmark v3 H100 batch sweeps at 700 W: read them, fit the physics, build a model's truth.

Source: mlenergy_v3_vllm_batch_sweep.csv (ml-energy/leaderboard, Apache-2.0; see data/README.md): median
inter-token latency and power per GPU against the running batch, text tasks, MoE models. The sweeps hold no cap
dimension: the cap response is MODELLED by the physics (alpha and f_knee transferred from the A100 fits).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pals_daemon.sim.catalogue import BYTES_PER_PARAM, ModelSpec, h100_arch
from pals_daemon.sim.fitted import (
    H100_ALPHA,
    H100_CORE_MEM_SHARE,
    H100_F_KNEE,
    H100_F_MIN,
    H100_FITTED_FIELDS,
    h100_physics,
)
from pals_daemon.sim.fitting import DATA_DIR, best_fit, physics_bounds
from pals_daemon.sim.hardware import H100_SXM5
from pals_daemon.sim.model_truth import ModelTruth, Perturbation
from pals_daemon.sim.physics import DecodePhysics

_MLENERGY_NAME = "mlenergy_v3_vllm_batch_sweep.csv"
_SHARED_CALIBRATION_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "calibration"
# The ML.ENERGY tasks that are text-only (the image/video tasks add vision encoders we do not model).
_H100_TEXT_TASKS = ("lm-arena-chat", "gpqa", "sourcegraph-fim")
# The fields the H100 fit frees (the others are cited, or transferred from the A100 fits).
_H100_FREE = H100_FITTED_FIELDS
_H100_STARTS = [{"p_mem_w": pm, "routing_factor": rf} for pm in (100.0, 300.0) for rf in (1.0, 0.3)]


def default_mlenergy_csv() -> Path:
    """data/mlenergy_v3_vllm_batch_sweep.csv if present, else the shared calibration copy."""
    for cand in (
        DATA_DIR / _MLENERGY_NAME,
        DATA_DIR.parent / "shared" / "data" / "calibration" / _MLENERGY_NAME,
        _SHARED_CALIBRATION_DIR / _MLENERGY_NAME,
    ):
        if cand.exists():
            return cand
    return DATA_DIR / _MLENERGY_NAME


@dataclass(frozen=True)
class H100Sweep:
    """One (model, GPU count) batch sweep of ML.ENERGY v3 on H100 at 700 W, duplicates averaged."""

    model_id: str
    num_gpus: int
    task: str
    precision: str
    tp: int
    ep: int
    total_params: float
    active_params: float
    max_num_seqs: tuple[int, ...]
    batch: np.ndarray  # mean running batch (avg_batch_size)
    itl_s: np.ndarray  # median inter-token latency
    power_w_per_gpu: np.ndarray  # avg_power_watts / num_gpus
    throughput_tokens_per_s: np.ndarray  # output_throughput_tok_s


def known_h100_models(csv_path: str | Path | None = None) -> list[tuple[str, int]]:
    """(model id, GPU count) of the text-task H100 MoE sweeps :func:`load_h100_truth` accepts."""
    path = Path(csv_path) if csv_path is not None else default_mlenergy_csv()
    out: set[tuple[str, int]] = set()
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["gpu_model"] == "H100" and r["task"] in _H100_TEXT_TASKS and h100_arch(r["model_id"]):
                out.add((r["model_id"], int(r["num_gpus"])))
    return sorted(out)


def read_h100_sweep(model_id: str, num_gpus: int, csv_path: str | Path | None = None) -> H100Sweep:
    """The H100 sweep of ``model_id`` on ``num_gpus`` GPUs (text tasks), rows with equal max_num_seqs averaged."""
    path = Path(csv_path) if csv_path is not None else default_mlenergy_csv()
    groups: dict[int, list[dict[str, str]]] = defaultdict(list)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if (
                r["gpu_model"] == "H100"
                and r["model_id"].lower() == model_id.lower()
                and int(r["num_gpus"]) == num_gpus
                and r["task"] in _H100_TEXT_TASKS
            ):
                groups[int(r["max_num_seqs"])].append(r)
    if not groups:
        raise ValueError(f"{path}: no H100 text-task rows for {model_id!r} on {num_gpus} GPUs")
    first = next(iter(groups.values()))[0]
    seqs = tuple(sorted(groups))

    def mean(col: str, scale: float = 1.0) -> np.ndarray:
        return np.array([np.mean([float(r[col]) for r in groups[s]]) * scale for s in seqs])

    return H100Sweep(
        model_id=first["model_id"],
        num_gpus=num_gpus,
        task=first["task"],
        precision=first["precision"],
        tp=int(first["tp"]),
        ep=int(first["ep"]),
        total_params=float(first["total_params_b"]) * 1e9,
        active_params=float(first["active_params_b"]) * 1e9,
        max_num_seqs=seqs,
        batch=mean("avg_batch_size"),
        itl_s=mean("median_itl_ms", 1e-3),
        power_w_per_gpu=mean("avg_power_watts", 1.0 / num_gpus),
        throughput_tokens_per_s=mean("output_throughput_tok_s"),
    )


def h100_spec(sweep: H100Sweep) -> ModelSpec:
    """ModelSpec of an H100 sweep's model (architecture from config.json, parameters from the CSV)."""
    arch = h100_arch(sweep.model_id)
    if arch is None:
        raise ValueError(f"no architecture facts for {sweep.model_id!r}")
    layers, kv_heads, head_dim, experts, top_k = arch
    return ModelSpec(
        sweep.model_id,
        sweep.model_id,
        sweep.active_params,
        sweep.total_params,
        2 * layers * kv_heads * head_dim * 2,
        experts,
        top_k,
        BYTES_PER_PARAM.get(sweep.precision, 2.0),
    )


def fit_h100_physics(model_id: str, num_gpus: int, csv_path: str | Path | None = None) -> DecodePhysics:
    """Fit the decode physics of one H100 sweep (power and median ITL vs. batch at 700 W)."""
    sw = read_h100_sweep(model_id, num_gpus, csv_path)
    spec = h100_spec(sw)
    b, t, p = sw.batch, sw.itl_s, sw.power_w_per_gpu
    c = np.full_like(b, H100_SXM5.max_limit_w)
    slope = max(t[-1] - t[0], 1e-6) / max(1.0, b[-1] - b[0])
    base = DecodePhysics(
        H100_SXM5.idle_power_w, spec.num_experts, spec.top_k, 0.5 * t[0], 0.3 * t[0], 0.3 * slope, 0.1 * t[0],
        0.3 * slope, 200.0, 300.0, H100_ALPHA, H100_F_KNEE, 1.0, H100_F_MIN, H100_CORE_MEM_SHARE,
    )  # fmt: skip
    return best_fit(base, b, c, t, p, _H100_STARTS, free=_H100_FREE, bounds=physics_bounds(H100_SXM5))


def load_h100_truth(
    model_id: str,
    num_gpus: int,
    csv_path: str | Path | None = None,
    *,
    perturbation: Perturbation | None = None,
    kv_capacity_tokens: int | None = None,
    physics: bool = True,
) -> ModelTruth:
    """The truth of an H100 MoE model from ML.ENERGY v3 (decode step = median ITL, power per GPU, at 700 W).

    The measured batch dimension is at the 700 W default limit; the cap dimension is MODELLED by the physics
    (DVFS with alpha transferred from the A100 fits). Batches are the mean running batch sizes, rounded.
    """
    sw = read_h100_sweep(model_id, num_gpus, csv_path)
    spec = h100_spec(sw)
    merged: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for b, t, p in zip(sw.batch, sw.itl_s, sw.power_w_per_gpu, strict=True):
        merged[max(1, round(float(b)))].append((float(t), float(p)))
    batches = sorted(merged)
    itl = np.array([np.mean([t for t, _ in merged[b]]) for b in batches])
    pw = np.array([np.mean([p for _, p in merged[b]]) for b in batches])
    thr = np.array(batches, dtype=float) / itl
    ph = h100_physics(sw.model_id, num_gpus) if physics else None
    return ModelTruth(
        spec,
        [H100_SXM5.max_limit_w],
        batches,
        thr[None, :],
        pw[None, :],
        num_gpus=num_gpus,
        hardware=H100_SXM5,
        kv_capacity_tokens=kv_capacity_tokens,
        perturbation=perturbation,
        physics=ph,
        source=f"ML.ENERGY v3 {sw.task} (H100, {num_gpus} GPUs, tp {sw.tp}, ep {sw.ep}, {sw.precision})",
    )
