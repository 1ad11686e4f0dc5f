"""The etcd records against a real etcd member: election, the leader-guarded grant transaction, leases."""

from __future__ import annotations

import time

import pytest
from etcd_harness import EtcdCluster

from pals_daemon.cluster.plan import Offer
from pals_daemon.cluster.store import Budget, EtcdRequestError, EtcdStore, EtcdUnavailable, encode_offer


def test_one_leader_and_only_its_lease_can_write_grants(etcd1: EtcdCluster) -> None:
    store = EtcdStore(etcd1.endpoints, "t")
    a, b = store.grant_lease(5), store.grant_lease(5)
    assert store.campaign("a", a) is True
    assert store.campaign("b", b) is False
    assert store.campaign("a", a) is True  # re-campaign by the holder: still the leader
    assert store.write_grants("b", b, {"x": 500.0}, 1000.0, 500.0) is False
    assert store.grant_of("x") is None  # the failed transaction wrote nothing
    assert store.write_grants("a", a, {"x": 500.0, "y": 400.0}, 1000.0, 900.0) is True
    assert store.grant_of("x") == 500.0 and store.grant_of("y") == 400.0
    store.resign(a)
    assert store.campaign("b", b) is True
    assert store.write_grants("a", a, {"x": 900.0}, 1000.0, 900.0) is False
    assert store.grant_of("x") == 500.0


def test_lease_lapse_drops_offer_and_leadership_but_not_grants(etcd1: EtcdCluster) -> None:
    store = EtcdStore(etcd1.endpoints, "t")
    lease = store.grant_lease(2)
    store.put(store.key("offer", "n1"), encode_offer(Offer(400, 1600, ((400, 0, 0), (1600, 1, 1))), 400.0), lease)
    store.put(store.key("applied", "n1"), {"budget_w": 700.0})
    assert store.campaign("n1", lease)
    assert store.write_grants("n1", lease, {"n1": 700.0}, 2000.0, 700.0)
    snap = store.snapshot()
    assert snap.leader == "n1" and snap.nodes["n1"].offer is not None
    deadline = time.monotonic() + 10
    while store.refresh_lease(lease) > 0 and time.monotonic() < deadline:
        time.sleep(3.5)  # no keepalive for longer than the TTL
    snap = store.snapshot()
    assert snap.leader is None
    assert snap.nodes["n1"].offer is None  # lapsed
    assert snap.nodes["n1"].grant_w == 700.0 and snap.nodes["n1"].applied_w == 700.0  # kept: it is reserved


def test_malformed_and_oversized_records_are_skipped(etcd1: EtcdCluster) -> None:
    store = EtcdStore(etcd1.endpoints, "t")
    store.set_budget(Budget(2000.0))
    store.put(store.key("offer", "bad"), {"floor_w": 400, "ceiling_w": 100, "points": [[400, 0, 0]]})
    store.put(store.key("offer", "BAD_NAME"), {"floor_w": 100, "ceiling_w": 400, "points": [[100, 0, 0]]})
    store.put(store.key("grant", "huge"), {"budget_w": 1.0, "pad": "x" * 70_000})
    store.put(store.key("grant", "nan"), {"budget_w": "NaN"})
    store.put(store.key("applied", "ok"), {"budget_w": 500.0})
    snap = store.snapshot()
    assert set(snap.nodes) == {"ok"}
    assert snap.budget == Budget(2000.0)


def test_unreachable_endpoints_fail_over_then_raise() -> None:
    store = EtcdStore(["http://127.0.0.1:9", "http://127.0.0.1:10"], "t", timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(EtcdUnavailable):
        store.snapshot()
    assert time.monotonic() - t0 < 3.0


def test_second_endpoint_answers_when_the_first_is_down(etcd1: EtcdCluster) -> None:
    store = EtcdStore(["http://127.0.0.1:9", *etcd1.endpoints], "t", timeout_s=0.5)
    store.set_budget(Budget(1234.0))
    assert store.get_budget() == Budget(1234.0)


def test_a_grant_transaction_over_max_txn_ops_is_refused_whole(etcd1: EtcdCluster) -> None:
    """etcd's default --max-txn-ops is 128: 200 grants in one transaction are refused, none written (README:
    raise it to at least nodes + 1)."""
    store = EtcdStore(etcd1.endpoints, "t")
    lease = store.grant_lease(5)
    assert store.campaign("a", lease)
    with pytest.raises(EtcdRequestError, match="too many operations"):
        store.write_grants("a", lease, {f"n{i}": 500.0 for i in range(200)}, 1e6, 1e5)
    assert store.snapshot().nodes == {}
