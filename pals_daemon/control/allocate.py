"""Allocation: split a power budget among units (engines on a node, nodes in a cluster) by a DP over options.

Pure and public, so that the node controller (engines) and a cluster allocator (nodes) share one allocation.
Each unit offers a few options, each a (cost in watts, score, key); the DP picks one option per unit so that the
summed cost fits the budget with the best summed score. Scores are the caller's: the node controller scores
"meets its requirement" >> "fraction of it" >> efficiency.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

_EPS_W = 1e-6


@dataclass(frozen=True)
class Option:
    """One choice a unit offers: it would use ``cost_w`` watts of the budget and be worth ``score``."""

    cost_w: float
    score: float
    key: Hashable


def solve_budget(options: Sequence[Sequence[Option]], budget_w: float) -> list[Hashable] | None:
    """One option key per unit with the best summed score whose summed cost fits ``budget_w``.

    None when no combination fits (the caller falls back to each unit's minimum). States are (cost, score)
    pairs, one per cost (rounded to mW), Pareto-pruned so that score strictly rises with cost; each layer is
    computed with numpy and keeps back-pointers instead of pick tuples (64 units: milliseconds, where a per-state
    Python loop took most of a 0.5 s period).
    """
    costs = np.zeros(1)
    scores = np.zeros(1)
    layers: list[tuple[NDArray[np.int64], NDArray[np.int64], Sequence[Option]]] = []
    for opts in options:
        oc = np.array([o.cost_w for o in opts])
        os_ = np.array([o.score for o in opts])
        # Candidates in the order the states x options are visited: state-major, option-minor.
        c = (costs[:, None] + oc[None, :]).ravel()
        sc = (scores[:, None] + os_[None, :]).ravel()
        order = np.flatnonzero(c <= budget_w + _EPS_W)
        if order.size == 0:
            return None
        c, sc = c[order], sc[order]
        keys = np.round(c, 3)
        # Per cost key the best score, the earliest candidate among equals.
        rank = np.lexsort((order, -sc, keys))
        first = np.ones(rank.size, dtype=bool)
        first[1:] = keys[rank][1:] != keys[rank][:-1]
        win = rank[first]
        # By cost, keeping only the states whose score beats every cheaper one.
        win = win[np.argsort(c[win], kind="stable")]
        ws = sc[win]
        prev_best = np.maximum.accumulate(np.concatenate(([-np.inf], ws[:-1])))
        keep = win[ws > prev_best + 1e-9]
        costs, scores = c[keep], sc[keep]
        n_opts = len(opts)
        layers.append((order[keep] // n_opts, order[keep] % n_opts, opts))
    picks: list[Hashable] = []
    state = len(costs) - 1
    for parents, chosen, opts in reversed(layers):
        picks.append(opts[int(chosen[state])].key)
        state = int(parents[state])
    return picks[::-1]
