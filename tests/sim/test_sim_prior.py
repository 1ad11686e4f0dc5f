"""The physics prior: what the simulated truth is built on, without its mismatch or residual table."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from pals_daemon.sim.a100 import load_a100_truth
from pals_daemon.sim.hardware import A100_SXM4
from pals_daemon.sim.model_truth import Perturbation
from pals_daemon.sim.prior import PREFILL_DEMAND_FRACTION, LatencyPrior, a100_latency_prior

MODEL = "mixtral-8x7b-instruct"


def test_prefill_is_the_unperturbed_truths_and_ignores_a_mismatch() -> None:
    prior = a100_latency_prior(MODEL)
    truth = load_a100_truth(MODEL)
    perturbed = truth.with_perturbation(Perturbation(0.8, 1.1))
    for cap in (100.0, 200.0, 300.0, 400.0):
        assert prior.prefill_time_s(cap, 2048) == truth.prefill_time_s(cap, 2048)
        assert perturbed.prefill_time_s(cap, 2048) > prior.prefill_time_s(cap, 2048)


def test_prefill_is_linear_in_tokens_and_slows_only_under_a_binding_cap() -> None:
    prior = a100_latency_prior(MODEL)
    demand_w = PREFILL_DEMAND_FRACTION * A100_SXM4.max_limit_w
    per_token = prior.prefill_s_per_token(400.0)
    assert prior.prefill_time_s(400.0, 1000) == pytest.approx(1000 * per_token)
    assert prior.prefill_s_per_token(demand_w) == per_token  # the cap does not bind: full clock
    slowdowns = [prior.prefill_s_per_token(c) / per_token for c in (300.0, 200.0, 150.0, 100.0)]
    assert slowdowns == sorted(slowdowns) and slowdowns[0] > 1.0
    assert slowdowns[-1] > 1.5  # compute-bound: a deep cap costs prefill far more than decode (below)


def test_decode_is_the_fitted_physics_and_weakly_cap_dependent() -> None:
    prior = a100_latency_prior(MODEL)
    truth = load_a100_truth(MODEL)
    assert prior.physics is not None
    for b in (1, 8, 64):
        assert prior.decode_step_s(400.0, b) == float(prior.physics.decode(float(b), 400.0)[0])
        # Without the residual table the prior is the physics alone: within its calibration (A100 max 20%).
        assert prior.decode_step_s(300.0, b) == pytest.approx(truth.decode_step(300.0, b).step_time_s, rel=0.2)
    steps = [prior.decode_step_s(400.0, b) for b in (1, 4, 16, 64)]
    assert steps == sorted(steps)
    decode_slowdown = prior.decode_step_s(200.0, 8) / prior.decode_step_s(400.0, 8)
    prefill_slowdown = prior.prefill_s_per_token(200.0) / prior.prefill_s_per_token(400.0)
    assert 1.0 <= decode_slowdown < prefill_slowdown
    assert prior.decode_power_w(200.0, 64) <= 200.0 + 1e-6


def test_no_fitted_physics_means_no_decode_prior() -> None:
    p = a100_latency_prior(MODEL)
    bare = LatencyPrior(p.spec, p.hardware, p.num_gpus, None)
    assert bare.prefill_s_per_token(400.0) > 0
    with pytest.raises(ValueError, match="no fitted decode physics"):
        bare.decode_step_s(400.0, 8)


def _our_imports(module: str) -> set[str]:
    tree = ast.parse(Path(importlib.import_module(module).__file__ or "").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return {m for m in imported if m.startswith("pals_daemon")}


def test_the_prior_reads_no_simulated_truth() -> None:
    """A controller may read the prior on a real GPU: it must not reach the truth, its mismatch or its loaders."""
    allowed = {
        "pals_daemon.sim.catalogue",
        "pals_daemon.sim.fitted",
        "pals_daemon.sim.hardware",
        "pals_daemon.sim.physics",
    }
    assert _our_imports("pals_daemon.sim.prior") == allowed
    for module in allowed:
        assert _our_imports(module) <= allowed | {"pals_daemon.errors"}, module
