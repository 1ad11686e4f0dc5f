"""Quick directions of bench/scenario_s2.py (S2: Azure trace, SLOs) and bench/scenario_s4.py (S4: demand response).

Small cases of the same scenario builders; the full figures come from the bench scripts.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pals_daemon.control.config import ControllerConfig
from pals_daemon.model.profile import load_profiles
from pals_daemon.replay.scenario import Budget, Scenario
from pals_daemon.replay.simulate import prepare, run_policy
from pals_daemon.server.daemon import default_profiles_dir

BENCH = Path(__file__).resolve().parents[2] / "bench"
REGISTRY = load_profiles(str(default_profiles_dir()))


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


S2 = _load("scenario_s2")
S4 = _load("scenario_s4")


def test_s2_quick_pals_energy_per_token_not_above_default() -> None:
    eng = S2.engine()
    assert eng.perturbation.magnitude >= 0.1  # the truth differs from the profile (issue 3, item 5)
    sc = Scenario("s2-quick", (eng,), duration_s=300.0, warmup_s=S2.WARMUP_S)
    prep = prepare(sc)
    d = run_policy(sc, "default", REGISTRY, prep)
    p = run_policy(sc, "pals", REGISTRY, prep)
    j_default = d.gpu_energy_j / d.engines[0].output_tokens
    j_pals = p.gpu_energy_j / p.engines[0].output_tokens
    assert j_pals <= j_default
    # SLO attainment no worse than default's by more than 1 percentage point.
    assert p.engines[0].slo_attainment >= d.engines[0].slo_attainment - 0.01


@pytest.mark.parametrize("notice_s", [0.0, S4.NOTICE_S])
def test_s4_quick_budget_respected(notice_s: float) -> None:
    hold = 30.0
    signal = S4.step_budget(hold)
    duration = len(S4.STEP_LEVELS_W) * hold
    given = signal if notice_s == 0 else S4.with_notice(signal, duration, notice_s)
    sc = Scenario("s4-quick", (S4.engine(),), duration, given, warmup_s=5.0)
    run = run_policy(sc, "pals", REGISTRY, prepare(sc))
    # The sum of the requested limits is within the budget given at every tick.
    assert run.limit_over_budget_ticks == 0
    over_s, longest_s = S4.judge(run, signal)
    assert over_s / duration < 0.05
    if notice_s > 0:
        assert longest_s <= 1.0


def test_s4_day_signal_maps_the_load_shape_into_the_range() -> None:
    budget, duration = S4.day_budget()
    assert duration == pytest.approx(24 * 60, rel=0.02)  # one day, 60x compressed
    vals = [w for _, w in budget.points]
    assert min(vals) == pytest.approx(S4.DAY_RANGE_W[0])
    assert max(vals) == pytest.approx(S4.DAY_RANGE_W[1])
    assert isinstance(budget, Budget) and budget.interpolate


def test_s4_quick_meter_undershoot_shortens_the_reactive_excursion() -> None:
    """Holding the limits lower for one meter window after a drop ends the meter's excursion sooner, at a small
    cost in tokens (the same replay with the undershoot off, side by side)."""
    hold = 30.0
    signal = S4.step_budget(hold)
    duration = len(S4.STEP_LEVELS_W) * hold
    sc = Scenario("s4-quick-meter", (S4.engine(),), duration, signal, warmup_s=5.0)
    prep = prepare(sc)
    with_meter = run_policy(sc, "pals", REGISTRY, prep)
    without = run_policy(sc, "pals", REGISTRY, prep, config=ControllerConfig(meter_window_s=0.0))
    over_with, longest_with = S4.judge(with_meter, signal)
    over_without, longest_without = S4.judge(without, signal)
    assert longest_with < longest_without and longest_with <= 1.0
    assert over_with < over_without
    assert with_meter.limit_over_budget_ticks == 0
    tokens = [r.engines[0].output_tokens for r in (with_meter, without)]
    assert tokens[0] >= 0.98 * tokens[1]
