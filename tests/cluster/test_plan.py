"""The pure cluster split and its hard-limit rules, including property checks of the reservation invariant."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pals_daemon.cluster.plan import (
    NodeView,
    Offer,
    effective_budget_w,
    exit_limits_mw,
    plan_grants,
    reserved_w,
    split,
    total_reserved_w,
)


def linear_offer(floor: float, ceiling: float, slope: float, points: int = 5) -> Offer:
    pts = []
    for i in range(points):
        w = floor + (ceiling - floor) * i / (points - 1)
        pts.append((w, slope * (w - floor), slope * (w - floor)))
    return Offer(floor, ceiling, tuple(pts))


def target_offer(floor: float, ceiling: float, need_w: float) -> Offer:
    """A node that meets its target (score 1e6) from need_w on, as the node controller scores it."""
    budgets = sorted({floor, (floor + need_w) / 2, min(need_w, ceiling), ceiling})
    pts = tuple((w, (1e6 if w >= need_w else 0.0) + 1e3 * min(w / need_w, 1.0), w) for w in budgets)
    return Offer(floor, ceiling, pts)


def test_offer_validation_refuses_non_monotone_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        Offer(100, 400, ((100, 1.0, 0.0), (200, 0.5, 0.0)))
    with pytest.raises(ValueError):
        Offer(100, 400, ((50, 0.0, 0.0),))
    with pytest.raises(ValueError):
        Offer(400, 100, ((400, 0.0, 0.0),))
    with pytest.raises(ValueError):
        Offer(100, 400, ((100, math.nan, 0.0),))


def test_split_gives_the_target_needs_first_then_spreads_the_spare() -> None:
    offers = {"a": target_offer(400, 1600, 1400), "b": target_offer(400, 1600, 600), "c": target_offer(400, 1600, 800)}
    grants = split(offers, 3000)
    assert grants is not None
    assert sum(grants.values()) == pytest.approx(3000)
    assert grants["a"] >= 1400 and grants["b"] >= 600 and grants["c"] >= 800
    # Too little for all three: the DP meets the most targets (b and c) rather than starving everyone.
    tight = split(offers, 1900)
    assert tight is not None and sum(tight.values()) <= 1900 + 1e-6
    assert tight["b"] >= 600 and tight["c"] >= 800
    assert split(offers, 1000) is None  # floors (1200 W) do not fit


def test_decrease_is_granted_at_once_but_its_watts_stay_reserved_until_confirmed() -> None:
    # a needs more, b less; b currently applies 1000 W.
    nodes = {
        "a": NodeView(target_offer(400, 1600, 1400), grant_w=1000, applied_w=1000),
        "b": NodeView(target_offer(400, 1600, 500), grant_w=1000, applied_w=1000),
    }
    first = plan_grants(nodes, 2000)
    assert first["b"] < 1000  # decrease written at once
    assert "a" not in first  # no free watts until b confirms
    assert total_reserved_w(nodes, first) <= 2000
    confirmed = {
        "a": nodes["a"],
        "b": NodeView(nodes["b"].offer, grant_w=first["b"], applied_w=first["b"]),
    }
    second = plan_grants(confirmed, 2000)
    assert second["a"] > 1000
    assert total_reserved_w(confirmed, second) <= 2000 + 1e-6


def test_lapsed_node_keeps_its_reservation_and_grant() -> None:
    nodes = {
        "a": NodeView(linear_offer(400, 1600, 1.0), grant_w=800, applied_w=800),
        "dead": NodeView(None, grant_w=900, applied_w=1200),  # it never confirmed a decrease to 900
    }
    plan = plan_grants(nodes, 2400)
    assert "dead" not in plan
    assert reserved_w(nodes["dead"]) == 1200
    assert plan["a"] <= 2400 - 1200 + 1e-6


def test_budget_below_the_reservations_grants_only_decreases() -> None:
    nodes = {n: NodeView(linear_offer(400, 1600, 1.0), grant_w=1000, applied_w=1000) for n in "abc"}
    plan = plan_grants(nodes, 1500)
    assert all(w <= 1000 for w in plan.values())
    assert sum(plan.values()) <= 1500 + 1e-6


def test_ramp_is_linear_and_clamped() -> None:
    assert effective_budget_w(1000, 2000, 100.0, 10.0, 105.0) == pytest.approx(1500)
    assert effective_budget_w(1000, 2000, 100.0, 10.0, 90.0) == pytest.approx(2000)
    assert effective_budget_w(1000, 2000, 100.0, 10.0, 200.0) == pytest.approx(1000)
    assert effective_budget_w(1000, None, 100.0, 10.0, 105.0) == 1000


def test_exit_limits_fit_the_budget_and_never_exceed_originals() -> None:
    mins, maxs = [100_000, 100_000, 150_000], [400_000, 400_000, 700_000]
    limits = exit_limits_mw(mins, maxs, [400_000, 300_000, 700_000], 900.0)
    assert sum(limits) <= 900_000
    assert all(lo <= x <= hi for lo, x, hi in zip(mins, limits, maxs, strict=True))
    assert limits[1] <= 300_000
    assert exit_limits_mw(mins, maxs, [400_000, 300_000, 700_000], None) == [400_000, 300_000, 700_000]
    assert exit_limits_mw(mins, maxs, [400_000, 300_000, 700_000], 5000.0) == [400_000, 300_000, 700_000]


@st.composite
def clusters(draw: st.DrawFn) -> tuple[dict[str, Offer], list[tuple[str, float]]]:
    n = draw(st.integers(2, 6))
    offers = {}
    for i in range(n):
        floor = draw(st.sampled_from([400.0, 600.0, 1000.0]))
        ceiling = floor * draw(st.sampled_from([2.0, 3.0, 4.0]))
        need = draw(st.floats(floor, ceiling))
        offers[f"n{i}"] = target_offer(floor, ceiling, need) if need > floor else linear_offer(floor, ceiling, 1.0)
    events = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["budget", "confirm", "lapse", "return", "offer", "round"]),
                st.floats(0.0, 1.0),
            ),
            min_size=5,
            max_size=40,
        )
    )
    return offers, events


@settings(max_examples=150, deadline=None)
@given(clusters())
def test_reserved_never_exceeds_the_budget_across_grant_moves(case: tuple[dict[str, Offer], list]) -> None:
    """Random budgets, confirmations, lapses and offer changes: after every allocator round the reservations fit
    whenever they fitted before; a node's physical budget (applied) is never above its reservation; once the
    nodes confirm, the reservations fit again after a budget cut."""
    offers, events = case
    floors = sum(o.floor_w for o in offers.values())
    ceilings = sum(o.ceiling_w for o in offers.values())
    budget = floors + 0.5 * (ceilings - floors)
    applied = {n: o.floor_w for n, o in offers.items()}
    grants: dict[str, float] = {}
    live = set(offers)
    current = dict(offers)

    def view() -> dict[str, NodeView]:
        return {n: NodeView(current[n] if n in live else None, grants.get(n), applied[n]) for n in offers}

    def allocate() -> None:
        nodes = view()
        before = total_reserved_w(nodes)
        plan = plan_grants(nodes, budget)
        after = total_reserved_w(nodes, plan)
        if before <= budget + 1e-6:
            assert after <= budget + 1e-6
        assert after <= max(before, budget) + 1e-6  # a round never adds reservation beyond what is free
        for n in plan:
            assert n in live
        grants.update(plan)

    for kind, x in events:
        if kind == "budget":
            budget = floors + x * (ceilings - floors)
        elif kind == "confirm":
            # Live nodes apply their grant (a node applies only what it was granted).
            for n in live:
                if n in grants:
                    applied[n] = grants[n]
        elif kind == "lapse" and len(live) > 1:
            live.discard(sorted(live)[int(x * (len(live) - 1))])
        elif kind == "return":
            live = set(offers)
        elif kind == "offer":
            n = sorted(offers)[int(x * (len(offers) - 1))]
            o = offers[n]
            current[n] = target_offer(o.floor_w, o.ceiling_w, o.floor_w + x * (o.ceiling_w - o.floor_w) + 1.0) \
                if x < 0.99 else linear_offer(o.floor_w, o.ceiling_w, 1.0)
        allocate()
        for n in offers:
            assert applied[n] <= reserved_w(view()[n]) + 1e-6
    # Settling: every node live and confirming, two rounds each: the reservations fit the final budget.
    live = set(offers)
    for _ in range(3):
        allocate()
        for n in live:
            applied[n] = grants[n]
    assert total_reserved_w(view()) <= budget + 1e-6
