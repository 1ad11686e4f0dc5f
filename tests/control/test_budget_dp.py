"""The budget DP (control/allocate.solve_budget, used by Controller._solve_budget) against exhaustive search.

The DP runs on numpy with back-pointers (64 engines must fit well inside a 0.5 s tick); it must still find a
combination of per-engine options with the best summed score whose summed cost fits the budget.
"""

from __future__ import annotations

import itertools
import random

import pytest

from pals_daemon.control.allocate import Option as AllocOption
from pals_daemon.control.allocate import solve_budget

Option = tuple[float, float, tuple[int, int]]


def solve(plans: list[list[Option]], budget_w: float) -> list[tuple[int, int]]:
    picks = solve_budget([[AllocOption(*o) for o in opts] for opts in plans], budget_w)
    if picks is None:
        return [(-1, -1)] * len(plans)  # the controller's fallback: every engine at its minimum
    return picks  # type: ignore[return-value]


def best_by_search(plans: list[list[Option]], budget_w: float) -> float | None:
    best = None
    for combo in itertools.product(*plans):
        if sum(o[0] for o in combo) <= budget_w + 1e-6:
            score = sum(o[1] for o in combo)
            best = score if best is None else max(best, score)
    return best


@pytest.mark.parametrize("seed", range(60))
def test_dp_finds_the_best_combination_within_budget(seed: int) -> None:
    rng = random.Random(seed)
    plans = []
    for _ in range(rng.randint(1, 4)):
        plans.append(
            [
                (float(rng.choice([100, 150, 200, 250, 300, 400]) * rng.randint(1, 2)), rng.random() * 1e3, (i, 0))
                for i in range(rng.randint(1, 5))
            ]
        )
    budget_w = rng.uniform(100, 900 * len(plans))
    picks = solve(plans, budget_w)
    best = best_by_search(plans, budget_w)
    if best is None:
        assert picks == [(-1, -1)] * len(plans)  # nothing fits: every engine at its minimum
        return
    chosen = [next(o for o in opts if o[2] == ij) for opts, ij in zip(plans, picks, strict=True)]
    assert sum(o[0] for o in chosen) <= budget_w + 1e-6
    assert sum(o[1] for o in chosen) == pytest.approx(best, abs=1e-6)


def test_dp_on_64_engines_stays_within_budget() -> None:
    rng = random.Random(7)
    plans = [
        [(float(c), float(c) / 10 + rng.random(), (i, 0)) for i, c in enumerate(range(100, 401, 25))] for _ in range(64)
    ]
    picks = solve(plans, 64 * 250.0)
    costs = [float(100 + 25 * i) for i, _ in picks]
    assert len(picks) == 64 and sum(costs) <= 64 * 250.0
    assert sum(costs) > 64 * 250.0 - 25  # the budget is used, not left idle
