"""A node's offer: what each node budget would buy it, derived by asking the node's own controller.

The offer is computed by running ``Controller.step`` on a copy of the controller (its feedback state included)
with the tick's inputs at a few budgets between the floor and the ceiling, so it follows whatever the
controller does: when the controller's planning or allocation changes, the offer changes with it.
"""

from __future__ import annotations

import copy
import dataclasses
import math

from pals_daemon.cluster.plan import Offer
from pals_daemon.control.core import Controller
from pals_daemon.control.types import ControllerInput, Decision

# Points on the curve. Chosen value: the allocator's DP is linear in points per node, and a node's
# throughput-vs-budget curve is concave-ish with one knee; 8 points place the knee within 1/7 of the range.
OFFER_POINTS = 8
# Score tiers (as the node controller's budget DP): an engine meeting its throughput target dominates how close
# one gets, which dominates throughput. Each per-engine term is in [0, 1].
_W_MEET = 1e6
_W_FRACTION = 1e3
# The knee (smallest budget meeting the most targets) is located to within this many watts (about 6 more steps).
KNEE_TOLERANCE_W = 10.0
# An engine counts as meeting its target within this relative shortfall (model noise).
_MEET_TOLERANCE = 0.02


def score_decision(decision: Decision, inp: ControllerInput, max_tokens_per_s: float) -> tuple[float, float]:
    """(score, predicted tokens/s) of one decision: targets met, then closeness, then throughput."""
    score = 0.0
    tokens = 0.0
    for eng_id, d in decision.engines.items():
        tokens += d.predicted_tokens_per_s
        target = inp.targets.get(eng_id)
        want = target.tokens_per_s if target is not None else None
        if want and want > 0:
            frac = min(d.predicted_tokens_per_s / want, 1.0)
            score += _W_MEET * (frac >= 1.0 - _MEET_TOLERANCE) + _W_FRACTION * frac
    if max_tokens_per_s > 0:
        score += min(tokens / max_tokens_per_s, 1.0)
    return score, tokens


def offer_curve(
    controller: Controller, inp: ControllerInput, floor_w: float, ceiling_w: float, points: int = OFFER_POINTS
) -> Offer:
    """The node's monotone offer between ``floor_w`` and ``ceiling_w`` (``points`` budgets, evenly spaced).

    Each budget is decided by a fresh copy of ``controller`` (the live one is never stepped here). Scores and
    predicted throughput are made monotone (running maximum): a node can always leave watts unused.
    """
    if not (math.isfinite(floor_w) and math.isfinite(ceiling_w) and 0 < floor_w <= ceiling_w):
        raise ValueError(f"offer_curve: need 0 < floor <= ceiling, got {floor_w}, {ceiling_w}")
    n = max(2, points) if ceiling_w > floor_w else 1
    budgets = [floor_w + (ceiling_w - floor_w) * i / max(n - 1, 1) for i in range(n)]

    def decide(budget: float) -> Decision:
        return copy.deepcopy(controller).step(dataclasses.replace(inp, budget_w=budget))

    results = [(b, decide(b)) for b in budgets]
    top = max((sum(e.predicted_tokens_per_s for e in d.engines.values()) for _, d in results), default=0.0)
    # The knee: the smallest budget at which as many targets are met as at the ceiling, found by bisection between
    # grid points, so the allocator need not round a node's need up to the next grid point (up to 1/7 of the range).
    best_tier = math.floor(score_decision(results[-1][1], inp, top)[0] / _W_MEET)
    if best_tier > 0:
        hi = next(
            i for i, (_, d) in enumerate(results) if math.floor(score_decision(d, inp, top)[0] / _W_MEET) == best_tier
        )
        if hi > 0:
            lo_w, hi_w = results[hi - 1][0], results[hi][0]
            hi_d = results[hi][1]
            while hi_w - lo_w > KNEE_TOLERANCE_W:
                mid = (lo_w + hi_w) / 2
                d = decide(mid)
                if math.floor(score_decision(d, inp, top)[0] / _W_MEET) == best_tier:
                    hi_w, hi_d = mid, d
                else:
                    lo_w = mid
            if hi_w < results[hi][0]:
                results.insert(hi, (hi_w, hi_d))
    pts = []
    best_s = best_t = -math.inf
    for budget, d in results:
        s, t = score_decision(d, inp, top)
        best_s, best_t = max(best_s, s), max(best_t, t)
        pts.append((budget, best_s, best_t))
    return Offer(floor_w=floor_w, ceiling_w=ceiling_w, points=tuple(pts))
