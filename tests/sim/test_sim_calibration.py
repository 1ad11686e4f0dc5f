"""Calibration of the simulated truth against the measured A100 sweep and the ML.ENERGY H100 sweeps."""

from __future__ import annotations

import pytest

from pals_daemon.sim.truth import (
    a100_calibration,
    a100_physics,
    default_mlenergy_csv,
    h100_calibration,
    h100_physics,
    known_h100_models,
    known_models,
)

# Stated bounds (%, MAPE over each model's measured points / largest single-point error) of the physics alone.
# A100: what the fitted physics reaches (bench/sim_calibration.py: throughput 3.7-5.1 / 12-20, power 2.5-3.0 /
# 7-12), with some margin. H100: ITL and power within 10% on average, no single point beyond 20%.
A100_THR_MAPE, A100_THR_MAX = 6.0, 25.0
A100_POWER_MAPE, A100_POWER_MAX = 4.0, 15.0
H100_ITL_MAPE, H100_ITL_MAX = 10.0, 20.0
H100_POWER_MAPE, H100_POWER_MAX = 10.0, 20.0
# The truth (physics times the residual table) reproduces measured points exactly.
EXACT_PCT = 1e-6 * 100


@pytest.mark.parametrize("model", known_models())
def test_a100_physics_within_bounds_and_truth_exact(model: str) -> None:
    assert a100_physics(model) is not None
    r = a100_calibration(model)
    assert r["points"] == 30
    assert r["physics_throughput"]["mape_pct"] <= A100_THR_MAPE
    assert r["physics_throughput"]["max_pct"] <= A100_THR_MAX
    assert r["physics_power"]["mape_pct"] <= A100_POWER_MAPE
    assert r["physics_power"]["max_pct"] <= A100_POWER_MAX
    assert r["truth_throughput"]["max_pct"] <= EXACT_PCT
    assert r["truth_power"]["max_pct"] <= EXACT_PCT


@pytest.mark.skipif(not default_mlenergy_csv().exists(), reason="ML.ENERGY CSV not present")
def test_h100_physics_within_bounds_and_truth_exact() -> None:
    pairs = known_h100_models()
    assert len(pairs) >= 15
    for model_id, n in pairs:
        assert h100_physics(model_id, n) is not None, (model_id, n)
        r = h100_calibration(model_id, n)
        assert r["physics_itl"]["mape_pct"] <= H100_ITL_MAPE, r
        assert r["physics_itl"]["max_pct"] <= H100_ITL_MAX, r
        assert r["physics_power"]["mape_pct"] <= H100_POWER_MAPE, r
        assert r["physics_power"]["max_pct"] <= H100_POWER_MAX, r
        assert r["truth_itl"]["max_pct"] <= EXACT_PCT, r
        assert r["truth_power"]["max_pct"] <= EXACT_PCT, r
