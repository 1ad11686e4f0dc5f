"""pals_cluster_* metrics through the real prometheus-client exposition (a node's own view and the leader's)."""

from __future__ import annotations

import types

from prometheus_client import CollectorRegistry, generate_latest

from pals_daemon.cluster.agent import ClusterAgent, ClusterCollector
from pals_daemon.cluster.plan import NodeView, Offer
from pals_daemon.cluster.store import Budget, Snapshot
from pals_daemon.config import DaemonConfig

OFFER = Offer(400.0, 1600.0, ((400.0, 0.0, 100.0), (1600.0, 1.0, 900.0)))


def _agent() -> ClusterAgent:
    cfg = DaemonConfig(cluster_endpoints=("http://127.0.0.1:9",), cluster_node="n1")
    # The daemon is not used until run(); the collector reads only the agent's fields.
    return ClusterAgent(cfg, types.SimpleNamespace())  # type: ignore[arg-type]


def _scrape(agent: ClusterAgent) -> str:
    registry = CollectorRegistry()
    registry.register(ClusterCollector(agent))
    return generate_latest(registry).decode()


def test_node_view() -> None:
    agent = _agent()
    agent.grant_w, agent.published_applied_w, agent.offer, agent.etcd_up = 900.0, 900.0, OFFER, True
    text = _scrape(agent)
    assert 'pals_cluster_leader{node="n1"} 0.0' in text
    assert 'pals_cluster_etcd_up{node="n1"} 1.0' in text
    assert 'pals_cluster_node_grant_watts{node="n1"} 900.0' in text
    assert 'pals_cluster_node_offer_ceiling_watts{node="n1"} 1600.0' in text
    assert 'pals_cluster_node_offer_tokens_per_second{node="n1"} 900.0' in text
    assert "pals_cluster_budget_watts" not in text.replace("# HELP", "").replace("# TYPE", "")


def test_leader_view_exports_every_node_and_the_budget() -> None:
    agent = _agent()
    agent.leader, agent.cluster_budget_w = True, 2000.0
    agent.snapshot = Snapshot(
        7, Budget(2000.0), "n1",
        {"n1": NodeView(OFFER, 900.0, 1000.0), "n2": NodeView(None, 700.0, 700.0)},
    )
    text = _scrape(agent)
    assert "pals_cluster_budget_watts 2000.0" in text
    assert "pals_cluster_reserved_watts 1700.0" in text  # max(900, 1000) + 700
    assert 'pals_cluster_node_applied_watts{node="n2"} 700.0' in text
    assert 'pals_cluster_node_offer_floor_watts{node="n1"} 400.0' in text
    assert 'pals_cluster_node_offer_floor_watts{node="n2"}' not in text  # lapsed: no offer
