"""Routing-aware per-GPU caps (MoE expert-load skew): only lowers, hot GPU keeps the cap, budget holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.core import _ROUTING_EXPERT_TIME_FRACTION, Controller
from pals_daemon.control.types import ControllerInput, Decision, EngineObservation, EngineTargets, GpuObservation
from pals_daemon.errors import ConfigError
from pals_daemon.model.perf_model import PerfModel
from pals_daemon.model.profile import load_profiles

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
REG = load_profiles(PROFILES)
MODEL = "mixtral-8x7b-instruct"
SKEW = {0: 0.4, 1: 0.2, 2: 0.2, 3: 0.2}


def gpu(i: int, lo: float = 100.0, limit: float = 400.0) -> GpuObservation:
    return GpuObservation(
        index=i,
        uuid=f"GPU-{i}",
        min_limit_w=lo,
        max_limit_w=400.0,
        default_limit_w=400.0,
        requested_limit_w=limit,
        enforced_limit_w=limit,
        power_avg_w=200.0,
        power_instant_w=None,
        energy_j=0.0,
        sm_clock_mhz=1410,
        power_capped=False,
    )


def engine(share: Mapping[int, float] | None = None, tput: float = 200.0) -> EngineObservation:
    return EngineObservation(
        engine_id="e",
        model=MODEL,
        gpu_indices=(0, 1, 2, 3),
        configured_max_num_seqs=64,
        configured_max_num_batched_tokens=8192,
        window_s=0.5,
        throughput_tokens_per_s=tput,
        prefill_tokens=0,
        decode_tokens=int(tput / 2),
        num_running=64,
        num_waiting=10,
        kv_cache_usage=0.5,
        busy_fraction=1.0,
        current_max_num_seqs=64,
        expert_load_share=dict(share or {}),
    )


def decide(
    share: Mapping[int, float] | None,
    aware: bool = True,
    target: float = 200.0,
    budget: float | None = None,
    gpus: Sequence[GpuObservation] | None = None,
) -> Decision:
    ctrl = Controller(REG, ControllerConfig(gpu_kind="A100-SXM4", routing_aware_caps=aware))
    g = tuple(gpus) if gpus is not None else tuple(gpu(i) for i in range(4))
    inp = ControllerInput(
        now_s=0.0,
        budget_w=budget,
        gpus=g,
        engines=(engine(share),),
        targets={"e": EngineTargets(tokens_per_s=target)},
    )
    return ctrl.step(inp)


def test_skew_lowers_cold_gpus_and_keeps_the_hot_one() -> None:
    uni = decide(SKEW, aware=False)
    aware = decide(SKEW, aware=True)
    u, a = uni.gpu_limits_w, aware.gpu_limits_w
    assert len(set(u.values())) == 1  # uniform choice
    assert a[0] == u[0]  # the straggler keeps the engine's cap
    for i in (1, 2, 3):
        assert 100.0 <= a[i] < u[i]
    assert a[1] == a[2] == a[3]
    # Same batch choice: only the caps of the cold GPUs move.
    assert aware.engines["e"].max_num_seqs == uni.engines["e"].max_num_seqs


def test_lowered_cap_keeps_predicted_time_within_the_stragglers() -> None:
    d = decide(SKEW)
    lim = d.gpu_limits_w
    b = d.engines["e"].max_num_seqs
    profile = REG.find(MODEL, "A100-SXM4")
    assert profile is not None
    model = PerfModel(profile)
    phi, n = _ROUTING_EXPERT_TIME_FRACTION, 4
    t_hot = float(model.tokens_per_s(lim[0], b))
    t_cold = float(model.tokens_per_s(lim[1], b))
    rel_hot, rel_cold = 1 - phi + phi * n * 0.4, 1 - phi + phi * n * 0.2
    # Predicted step time (batch / tput x rel) of the cold GPU is no longer than the hot GPU's.
    assert rel_cold / t_cold <= rel_hot / t_hot * (1 + 1e-9)
    # And 5 W lower would not be (the lowest such cap, to the search's resolution), unless at the minimum.
    if lim[1] - 5 >= 100:
        assert rel_cold / float(model.tokens_per_s(lim[1] - 5, b)) > rel_hot / t_hot / 1.03 - 1e-9


@pytest.mark.parametrize(
    "share",
    [None, {}, {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}, {0: 0.4, 1: 0.2, 2: 0.4}, {0: 0.26, 1: 0.25, 2: 0.25, 3: 0.24}],
)
def test_unknown_partial_or_uniform_share_leaves_uniform_caps(share: Mapping[int, float] | None) -> None:
    assert decide(share).gpu_limits_w == decide(share, aware=False).gpu_limits_w


def test_flag_off_ignores_skew() -> None:
    assert decide(SKEW, aware=False).gpu_limits_w == decide(None, aware=False).gpu_limits_w


@pytest.mark.parametrize("budget", [600.0, 900.0, 1200.0])
def test_budget_holds_and_never_raised(budget: float) -> None:
    uni = decide(SKEW, aware=False, target=400.0, budget=budget).gpu_limits_w
    aware = decide(SKEW, aware=True, target=400.0, budget=budget).gpu_limits_w
    assert sum(aware.values()) <= budget + 1e-6
    for i in range(4):
        assert aware[i] <= uni[i]


def test_respects_each_gpus_minimum() -> None:
    gpus = [gpu(0), gpu(1, lo=250.0), gpu(2), gpu(3)]
    d = decide(SKEW, gpus=gpus, target=150.0)
    assert d.gpu_limits_w[1] >= 250.0
    assert all(d.gpu_limits_w[i] >= 100.0 for i in range(4))


def test_feedback_uses_the_hot_gpus_cap() -> None:
    # Routing-aware limits in force: hot GPU at 300 W, cold ones at 180 W; the throughput ratio must be learnt
    # against the hot GPU's cap (what sets the pace), not the lowest limit.
    gpus = [gpu(0, limit=300.0)] + [gpu(i, limit=180.0) for i in (1, 2, 3)]
    cfg = ControllerConfig(gpu_kind="A100-SXM4")
    profile = REG.find(MODEL, "A100-SXM4")
    assert profile is not None
    t300 = float(PerfModel(profile).tokens_per_s(300.0, 64))
    obs = replace(engine(SKEW), throughput_tokens_per_s=t300)
    inp = ControllerInput(0.0, None, tuple(gpus), (obs,), {"e": EngineTargets(tokens_per_s=100.0)})
    aware = Controller(REG, cfg)
    aware.step(inp)
    assert aware.feedback()["e"].tput_ratio == pytest.approx(1.0, abs=1e-9)
    plain = Controller(REG, replace(cfg, routing_aware_caps=False))
    plain.step(inp)
    assert plain.feedback()["e"].tput_ratio > 1.0


def test_config_flag_validated() -> None:
    assert ControllerConfig().routing_aware_caps is True
    with pytest.raises(ConfigError, match="routing_aware_caps"):
        ControllerConfig(routing_aware_caps="yes")  # type: ignore[arg-type]


def test_decision_is_deterministic() -> None:
    a = decide(SKEW).gpu_limits_w
    b = decide(SKEW).gpu_limits_w
    assert a == b
    assert np.isfinite(list(a.values())).all()
