"""The cluster budget split and its hard-limit rules. Pure: records in, grants out; no etcd, no clock reads.

Terms (watts everywhere):
- offer: what a live node says a node budget buys it: a monotone curve of (budget, score) points between its
  floor (sum of its GPUs' minimum limits) and its ceiling (sum of their maxima), published under its lease;
- grant: the node budget the leader wrote for a node (persistent key);
- applied: the node budget the node last applied and confirmed (persistent key, written by the node after its
  daemon enforced it: the node's GPU limits sum to at most this);
- reserved: what a node may draw whatever happens next = max(grant, applied). A live node holds at most its
  applied budget until it hears a new grant; one that lost etcd holds its applied budget; a dead daemon leaves
  its GPUs at its applied budget (cluster mode exits to the last grant, not to the original limits: see
  ``exit_limits_mw``), so max(grant, applied) bounds every case.

Invariant kept by ``plan_grants``: whenever the reservations already fit, sum(reserved) <= cluster budget after
the new grants too. A decrease is granted at once, but its watts stay reserved (applied is still high) until
the node confirms; only then can the next plan give them to another node. When the reservations do not fit
(the operator lowered the budget), only decreases are granted until they do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pals_daemon.control.allocate import Option, solve_budget

_EPS_W = 1e-6
# Watts below which a grant change is not written (an allocator round that would move every node by a few
# watts rewrites every key for nothing). Chosen value: 1% of one GPU's minimum limit, below any meter's noise.
MIN_GRANT_CHANGE_W = 1.0
# The split's DP counts each offer point's watts rounded up to a grid of budget / MAX_DP_STATES (at least 1 W), so
# a layer holds at most MAX_DP_STATES + 1 states whatever the number of nodes (512 nodes of 4 GPUs: a 125 W grid;
# 3 nodes: 1 W). Rounded up, the grants' true sum stays within the budget; the spare goes back to the nodes.
# Chosen value: bench/cluster_allocator.py (README "Running a fleet") keeps a 512-node plan well under a period.
MAX_DP_STATES = 4096


@dataclass(frozen=True)
class Offer:
    """A live node's offer: ``points`` are (budget_w, score, predicted_tokens_per_s), budget ascending."""

    floor_w: float
    ceiling_w: float
    points: tuple[tuple[float, float, float], ...]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.floor_w) and math.isfinite(self.ceiling_w) and 0 < self.floor_w <= self.ceiling_w):
            raise ValueError(f"offer: need 0 < floor <= ceiling, got {self.floor_w}, {self.ceiling_w}")
        if not self.points:
            raise ValueError("offer: no points")
        prev_w, prev_s = -math.inf, -math.inf
        for w, s, t in self.points:
            if not all(math.isfinite(x) for x in (w, s, t)):
                raise ValueError("offer: non-finite point")
            if not self.floor_w - _EPS_W <= w <= self.ceiling_w + _EPS_W:
                raise ValueError(f"offer: point {w} W outside [{self.floor_w}, {self.ceiling_w}]")
            if w <= prev_w or s < prev_s:
                raise ValueError("offer: points must rise in watts and never fall in score")
            prev_w, prev_s = w, s


@dataclass(frozen=True)
class NodeView:
    """What the leader knows of one node: ``offer`` None when its lease lapsed (cut off or dead)."""

    offer: Offer | None
    grant_w: float | None
    applied_w: float | None


def reserved_w(node: NodeView) -> float:
    """What the node may draw whatever happens next (module docstring)."""
    values = [v for v in (node.grant_w, node.applied_w) if v is not None]
    if not values and node.offer is not None:
        return node.offer.floor_w  # a node that has applied nothing yet runs at its floor (cluster start-up)
    return max(values, default=0.0)


def effective_budget_w(
    target_w: float, from_w: float | None, set_at_unix_s: float, ramp_s: float, now_unix_s: float
) -> float:
    """The cluster budget in force: a linear ramp from ``from_w`` to ``target_w`` over ``ramp_s`` seconds."""
    if from_w is None or ramp_s <= 0:
        return target_w
    frac = min(max((now_unix_s - set_at_unix_s) / ramp_s, 0.0), 1.0)
    return from_w + (target_w - from_w) * frac


def split(offers: Mapping[str, Offer], budget_w: float) -> dict[str, float] | None:
    """The best split of ``budget_w`` over live nodes (the node controller's DP, nodes in place of engines).

    Each node gets the offer point the DP picks; what is left is spread toward the ceilings in proportion to
    headroom, so that a node whose load rises has watts before the next round. None when the floors do not fit.
    """
    names = sorted(offers)
    if not names:
        return {}
    grid_w = max(1.0, budget_w / MAX_DP_STATES)
    options = [[Option(math.ceil(w / grid_w - 1e-9) * grid_w, s, w) for w, s, _ in offers[n].points] for n in names]
    picks = solve_budget(options, budget_w)
    if picks is None:
        return None
    grants = {n: float(p) for n, p in zip(names, picks, strict=True)}  # type: ignore[arg-type]
    spare = budget_w - sum(grants.values())
    headroom = {n: offers[n].ceiling_w - grants[n] for n in names}
    total_head = sum(headroom.values())
    if spare > _EPS_W and total_head > _EPS_W:
        share = min(1.0, spare / total_head)
        for n in names:
            grants[n] += headroom[n] * share
    return grants


def plan_grants(nodes: Mapping[str, NodeView], budget_w: float) -> dict[str, float]:
    """The grants to write this round (only changed ones), keeping sum(reserved) <= budget_w (module docstring).

    Lapsed nodes keep their grant and reservation. Live nodes share what the lapsed ones leave: decreases are
    granted in full; increases only out of what is free once every node counts at max(new grant, applied).
    """
    lapsed_w = sum(reserved_w(v) for v in nodes.values() if v.offer is None)
    live = {n: v.offer for n, v in nodes.items() if v.offer is not None}
    desired = split(live, budget_w - lapsed_w)
    if desired is None:
        # Even the floors do not fit: every live node to its floor (its hardware minimum).
        desired = {n: o.floor_w for n, o in live.items()}
    new: dict[str, float] = {}
    for n in live:
        current = nodes[n].grant_w
        if current is None or desired[n] <= current + _EPS_W:
            new[n] = desired[n] if current is None else min(desired[n], current)
        else:
            new[n] = current
    # Nodes without a grant yet start at no more than they applied (their floor): raising them is an increase.
    for n in live:
        if nodes[n].grant_w is None:
            new[n] = min(new[n], reserved_w(nodes[n]))

    def reservation(n: str) -> float:
        applied = nodes[n].applied_w
        return max(new[n], applied if applied is not None else new[n])

    free_w = budget_w - lapsed_w - sum(reservation(n) for n in live)
    # Increases, biggest shortfall first (deterministic order by name among equals), out of free watts only.
    for n in sorted(live, key=lambda n: (-(desired[n] - new[n]), n)):
        want = desired[n] - new[n]
        if want <= _EPS_W or free_w <= _EPS_W:
            continue
        before = reservation(n)
        # Raising the grant costs only what it adds above the current reservation.
        room = free_w + before - new[n]
        new[n] = new[n] + min(want, max(room, 0.0))
        free_w -= reservation(n) - before
    return {
        n: w
        for n, w in new.items()
        if nodes[n].grant_w is None or abs(w - nodes[n].grant_w) >= MIN_GRANT_CHANGE_W or w < nodes[n].grant_w - _EPS_W
    }


def total_reserved_w(nodes: Mapping[str, NodeView], grants: Mapping[str, float] | None = None) -> float:
    """Sum of reservations, with ``grants`` (a plan) applied over the recorded ones."""
    grants = grants or {}
    return sum(reserved_w(NodeView(v.offer, grants.get(n, v.grant_w), v.applied_w)) for n, v in nodes.items())


def exit_limits_mw(
    min_mw: Sequence[int], max_mw: Sequence[int], original_mw: Sequence[int], budget_w: float | None
) -> list[int]:
    """The limits a cluster-mode daemon leaves on exit: its GPUs' originals, capped so their sum fits its budget.

    The budget (the last grant applied) is split in proportion to each GPU's range above its minimum (so the
    split never asks below a minimum when the budget is at least the floor); each GPU gets min(original, share).
    Without a budget, the originals.
    """
    if budget_w is None:
        return list(original_mw)
    floor_mw = sum(min_mw)
    span_mw = sum(hi - lo for lo, hi in zip(min_mw, max_mw, strict=True))
    extra_mw = max(budget_w * 1000.0 - floor_mw, 0.0)
    frac = 1.0 if span_mw <= 0 else min(extra_mw / span_mw, 1.0)
    out = []
    for lo, hi, orig in zip(min_mw, max_mw, original_mw, strict=True):
        share = lo + math.floor((hi - lo) * frac)
        out.append(min(orig, share))
    return out
