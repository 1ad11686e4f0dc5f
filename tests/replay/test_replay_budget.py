"""The budget is never exceeded in replay: the sum of requested limits stays within it every tick."""

from __future__ import annotations

import pytest

from pals_daemon.control.types import EngineTargets
from pals_daemon.model.profile import load_profiles
from pals_daemon.replay.scenario import Budget, EngineSpec, PoissonLoad, Scenario, gpu_to_server_w, server_to_gpu_w
from pals_daemon.replay.simulate import prepare, run_policy
from pals_daemon.server.daemon import default_profiles_dir

REGISTRY = load_profiles(str(default_profiles_dir()))


def _scenario(budget: Budget) -> Scenario:
    engines = (
        EngineSpec(
            "e0", "mixtral-8x7b-instruct", PoissonLoad(6.0, 256, 128, seed=1), targets=EngineTargets(tokens_per_s=250.0)
        ),
        EngineSpec(
            "e1", "olmoe-1b-7b", PoissonLoad(40.0, 256, 128, seed=2), targets=EngineTargets(tokens_per_s=2000.0)
        ),
    )
    return Scenario("budget", engines, duration_s=40.0, budget=budget)


@pytest.mark.parametrize("policy", ["static-cap", "cap-only", "batch-only", "pals", "tput-oracle"])
def test_sum_of_limits_never_exceeds_budget(policy: str) -> None:
    budget = Budget(((0.0, None), (8.0, 2400.0), (16.0, 1100.0), (26.0, 1700.0), (33.0, 850.0)))
    sc = _scenario(budget)
    run = run_policy(sc, policy, REGISTRY, prepare(sc))
    assert run.limit_over_budget_ticks == 0
    assert run.max_limit_excess_w == 0.0


def test_server_budget_converts_with_the_paper_fit() -> None:
    assert server_to_gpu_w(gpu_to_server_w(1000.0, 8), 8) == pytest.approx(1000.0)
    assert gpu_to_server_w(1000.0, 4) == pytest.approx(1.05 * 1000.0 + 345.0)
    b = Budget.constant(4800.0, unit="server")
    assert b.gpu_w(0.0, 12) == pytest.approx((4800.0 - 3 * 345.0) / 1.05)
    sc = _scenario(Budget.constant(2000.0, unit="server"))
    run = run_policy(sc, "pals", REGISTRY, prepare(sc))
    assert run.limit_over_budget_ticks == 0


def test_default_ignores_the_budget_and_is_flagged() -> None:
    sc = _scenario(Budget.constant(1000.0))
    run = run_policy(sc, "default", REGISTRY, prepare(sc))
    assert run.limit_over_budget_ticks > 0
