"""Compatibility re-export of the simulated truth, which now lives in modules with one job each.

- :mod:`pals_daemon.sim.catalogue`: ModelSpec, the known models and their canonical names;
- :mod:`pals_daemon.sim.prior`: the physics prior (prefill and decode time vs. cap and batch; no simulation);
- :mod:`pals_daemon.sim.model_truth`: ModelTruth, Perturbation and the step types (the simulated ground truth);
- :mod:`pals_daemon.sim.fitting`: physics bounds and the multi-start fit shared by the loaders;
- :mod:`pals_daemon.sim.fitted`: the fitted constants, kept as data with provenance (sim/data/fitted/*.json);
- :mod:`pals_daemon.sim.a100`, :mod:`pals_daemon.sim.h100`: the measured sweeps' loaders and fitters;
- :mod:`pals_daemon.sim.calibration`: the calibration report (bench/sim_calibration.py).

Import from those modules in new code; this one stays while other branches still import from it.
"""

from __future__ import annotations

from pals_daemon.sim.a100 import (
    DEFAULT_SWEEP_CSV,
    fit_a100_physics,
    load_a100_truth,
    read_a100_sweep,
)
from pals_daemon.sim.calibration import a100_calibration, h100_calibration
from pals_daemon.sim.catalogue import (
    ModelSpec,
    canonical_model_name,
    known_models,
    model_spec,
    modelled_kv_capacity_tokens,
)
from pals_daemon.sim.fitted import H100_ALPHA, H100_F_KNEE, H100_F_MIN, a100_physics, h100_physics
from pals_daemon.sim.fitting import DATA_DIR, physics_bounds
from pals_daemon.sim.h100 import (
    H100Sweep,
    default_mlenergy_csv,
    fit_h100_physics,
    known_h100_models,
    load_h100_truth,
    read_h100_sweep,
)
from pals_daemon.sim.model_truth import (
    MIX_POWER_EXPONENT,
    MIX_THROUGHPUT_EXPONENT,
    PROFILE_OUTPUT_TOKENS,
    PROFILE_PROMPT_TOKENS,
    DecodeStep,
    ModelTruth,
    Perturbation,
    SkewedDecodeStep,
    with_perturbation,
)
from pals_daemon.sim.prior import (
    CLOCK_POWER_EXPONENT,
    MIN_CLOCK_RATIO,
    PREFILL_DEMAND_FRACTION,
    PREFILL_MFU,
    PrefillStep,
)

__all__ = [
    "CLOCK_POWER_EXPONENT",
    "DATA_DIR",
    "DEFAULT_SWEEP_CSV",
    "H100_ALPHA",
    "H100_F_KNEE",
    "H100_F_MIN",
    "MIN_CLOCK_RATIO",
    "MIX_POWER_EXPONENT",
    "MIX_THROUGHPUT_EXPONENT",
    "PREFILL_DEMAND_FRACTION",
    "PREFILL_MFU",
    "PROFILE_OUTPUT_TOKENS",
    "PROFILE_PROMPT_TOKENS",
    "DecodeStep",
    "H100Sweep",
    "ModelSpec",
    "ModelTruth",
    "Perturbation",
    "PrefillStep",
    "SkewedDecodeStep",
    "a100_calibration",
    "a100_physics",
    "canonical_model_name",
    "default_mlenergy_csv",
    "fit_a100_physics",
    "fit_h100_physics",
    "h100_calibration",
    "h100_physics",
    "known_h100_models",
    "known_models",
    "load_a100_truth",
    "load_h100_truth",
    "model_spec",
    "modelled_kv_capacity_tokens",
    "physics_bounds",
    "read_a100_sweep",
    "read_h100_sweep",
    "with_perturbation",
]
