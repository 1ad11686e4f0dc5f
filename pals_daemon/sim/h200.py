"""A simulated H200-SXM GPU kind: MODELLED decode physics, truths and profiles with a clock dimension.

No public sweep measures MoE decode on an H200 against the batch, the cap or a locked clock, so everything here is
modelled from the H100 physics fitted to ML.ENERGY v3 (pals_daemon/sim/fitted.py) and calibrated against the
public H200 facts:

- H200 SXM datasheet (NVIDIA): 141 GB HBM3e, 4.8 TB/s, 700 W; data/gpu_power_limits.csv row "H200-SXM-141GB".
  Same GH100 die as the H100 SXM5: max SM clock 1980 MHz and 989 TFLOP/s dense BF16 (H100 datasheet).
- "The illusion of power capping" (arXiv 2605.11999), H200: decode drew 137-300 W of the 700 W limit, so no cap at
  or above the 200 W minimum bound; locking the SM clock recovered up to 32% of decode energy.

The transfer (each a modelled choice):
- memory-bound step time (t_fixed, t_expert, t_token_mem) scales with the bandwidth, x 3.35 / 4.8; clock-bound
  time is the H100's (same SMs, same clock);
- busy power above idle is the H100 fit's x H200_POWER_SCALE, set so the two suite models (Qwen3-30B-A3B
  Instruct and Coder, one GPU) decode at 197-300 W at batch 1-64 at 700 W: inside the study's 137-300 W band;
- core_mem_share (the SMs' share of memory-bound power, which a lock cuts) H200_CORE_MEM_SHARE, set so the best
  lock at <= 10% longer steps saves up to 31% of decode energy over those models at batch 1-64 (study: up to 32%);
- idle power: the H100's 73.5 W (same die; no public H200 idle figure), f_min 0.17 (345 MHz) as the H100.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from pals_daemon.model.import_csv import write_profiles
from pals_daemon.model.profile import Profile, ProfilePoint, profile_from_dict
from pals_daemon.sim.fitted import h100_physics
from pals_daemon.sim.h100 import h100_spec, read_h100_sweep
from pals_daemon.sim.hardware import H100_SXM5, H200_SXM
from pals_daemon.sim.model_truth import ModelTruth, Perturbation
from pals_daemon.sim.physics import DecodePhysics

# Modelled (see the module docstring): calibrated against arXiv 2605.11999's H200 decode power band and savings.
H200_POWER_SCALE = 0.378
H200_CORE_MEM_SHARE = 0.6
H200_BANDWIDTH_RATIO = H100_SXM5.memory_bandwidth_tb_s / H200_SXM.memory_bandwidth_tb_s
# The models with H200 profiles (the H100 suite's) and their GPU count; their architecture and parameters are the
# H100 sweep's (pals_daemon/sim/h100.py h100_spec).
H200_MODELS: dict[str, int] = {
    "Qwen/Qwen3-30B-A3B-Instruct-2507": 1,
    "Qwen/Qwen3-Coder-30B-A3B-Instruct": 1,
}
# Modelled grids: caps over the H200's range in 50 W steps; batches as the H100 profiles of these models; clocks
# as the H100 clock grid (same supported-clock list, 15 MHz steps).
H200_CAPS_W = tuple(range(200, 701, 50))
H200_BATCHES = (8, 16, 32, 64, 96)
H200_CLOCKS_MHZ = (1980, 1830, 1680, 1530, 1380, 1230, 1080, 930, 780, 630)
H200_GPU = "H200"  # NVML's name is "NVIDIA H200"; profiles match it loosely
_DECIMALS = 3


def h200_physics(model_id: str, num_gpus: int = 1) -> DecodePhysics | None:
    """The MODELLED H200 decode physics of ``model_id`` (None without an H100 fit to transfer)."""
    ph = h100_physics(model_id, num_gpus)
    if ph is None:
        return None
    k = H200_BANDWIDTH_RATIO
    return replace(
        ph,
        idle_w=H200_SXM.idle_power_w,
        t_fixed_s=ph.t_fixed_s * k,
        t_expert_s=ph.t_expert_s * k,
        t_token_mem_s=ph.t_token_mem_s * k,
        p_mem_w=ph.p_mem_w * H200_POWER_SCALE,
        p_sm_w=ph.p_sm_w * H200_POWER_SCALE,
        core_mem_share=H200_CORE_MEM_SHARE,
    )


def _physics(model_id: str, num_gpus: int) -> DecodePhysics:
    ph = h200_physics(model_id, num_gpus) if model_id in H200_MODELS else None
    if ph is None:
        raise ValueError(f"no H200 model {model_id!r} on {num_gpus} GPUs; known: {', '.join(H200_MODELS)}")
    return ph


def load_h200_truth(model_id: str, num_gpus: int = 1, *, perturbation: Perturbation | None = None) -> ModelTruth:
    """The MODELLED truth of ``model_id`` on H200s: the physics at 700 W over H200_BATCHES (no residual table)."""
    ph = _physics(model_id, num_gpus)
    b = np.array(H200_BATCHES, dtype=float)
    t, p, _ = ph.decode(b, H200_SXM.max_limit_w)
    return ModelTruth(
        h100_spec(read_h100_sweep(model_id, num_gpus)),
        [H200_SXM.max_limit_w],
        list(H200_BATCHES),
        (b / t)[None, :],
        np.asarray(p, dtype=float)[None, :],
        num_gpus=num_gpus,
        hardware=H200_SXM,
        perturbation=perturbation,
        physics=ph,
        source=f"MODELLED H200 (H100 physics of {model_id} transferred; pals_daemon/sim/h200.py)",
    )


def _point(ph: DecodePhysics, cap_w: float, batch: int, clock_mhz: int | None = None) -> ProfilePoint:
    f = None if clock_mhz is None else clock_mhz / H200_SXM.max_sm_clock_mhz
    t, p, _ = ph.decode(float(batch), cap_w, f)
    return ProfilePoint(
        cap_w=cap_w,
        batch=batch,
        tokens_per_s=round(float(batch / t), _DECIMALS),
        gpu_power_w=round(min(float(p), cap_w), _DECIMALS),
        tpot_ms=round(float(t) * 1000.0, _DECIMALS),
        modelled=True,
        clock_mhz=clock_mhz,
    )


def h200_profile(model_id: str, num_gpus: int = 1) -> Profile:
    """The MODELLED H200 profile of ``model_id``: caps x batches, and clock points at 700 W, every point modelled."""
    ph = _physics(model_id, num_gpus)
    points = [_point(ph, float(c), b) for c in H200_CAPS_W for b in H200_BATCHES]
    clocks = [_point(ph, H200_SXM.max_limit_w, b, c) for c in H200_CLOCKS_MHZ for b in H200_BATCHES]
    data = {
        "schema": "pals.profile/v1",
        "model": model_id.rsplit("/", 1)[-1].lower(),
        "aliases": [model_id],
        "gpu": H200_GPU,
        "num_gpus": num_gpus,
        "parallelism": f"tp{num_gpus}",
        "source": "MODELLED: pals_daemon/sim/h200.py (H100 physics fitted to ML.ENERGY v3 transferred to H200; "
        "calibrated against arXiv 2605.11999 and the H200 SXM datasheet)",
        "method": "modelled",
        "notes": (
            "Every point MODELLED (no public H200 sweep): the H100 decode physics of this model (fitted to ML.ENERGY "
            f"v3) with memory-bound time x {H200_BANDWIDTH_RATIO:.4f} (3.35 / 4.8 TB/s, H100 / H200 datasheets), "
            f"busy power above idle x {H200_POWER_SCALE} (decode at 197-300 W at batch 1-64 for the Qwen3-30B-A3B "
            "models, inside the 137-300 W arXiv 2605.11999 measured on H200), core_mem_share "
            f"{H200_CORE_MEM_SHARE} (best lock at <= 10% longer steps saves up to 31%; the study: up to 32%), idle "
            "73.5 W (the H100's; same die). tpot_ms is the decode step time. clock_points at 700 W: the same "
            "physics with the SM clock locked (clock in force = min(lock, the cap's clock))."
        ),
        "points": [p.to_dict() for p in points],
        "clock_points": [p.to_dict() for p in clocks],
    }
    return profile_from_dict(data, origin=f"h200 model {model_id}")


def write_h200_profiles(out_dir: str | Path, models: Sequence[str] = tuple(H200_MODELS)) -> list[Path]:
    """Write the H200 profiles of ``models`` to ``out_dir``."""
    return write_profiles([h200_profile(m, H200_MODELS[m]) for m in models], out_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m pals_daemon.sim.h200 profiles/h200``: (re)generate the modelled H200 profiles."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out_dir")
    args = ap.parse_args(argv)
    for path in write_h200_profiles(args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
