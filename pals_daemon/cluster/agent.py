"""The cluster agent in each node daemon: node side (offer, grant, applied) and, when elected, the allocator.

Every ``cluster_period_s``:
1. node: keep the lease alive (a new one if it lapsed), publish the offer under it, read the grant; a grant that
   differs from the budget in force is applied through the daemon's own budget path (``Daemon.set_budget``:
   validated, persisted, enforced before it returns), and only then is ``applied/<node>`` written: that write
   is the node's confirmation;
2. allocator: campaign (create-if-absent on ``leader`` under the node's lease); the leader reads everything at
   one revision, plans with ``plan_grants`` and writes the changed grants in one transaction that succeeds only
   while the leader key still carries its lease.

etcd unreachable: the round fails, the node keeps the budget it has (its last grant) and never raises it; it
stops acting as leader (its lease will lapse). Nothing here changes a GPU except through ``set_budget``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pals_daemon.cluster.offer import offer_curve
from pals_daemon.cluster.plan import Offer, effective_budget_w, plan_grants, total_reserved_w
from pals_daemon.cluster.store import (
    NODE_NAME,
    ClusterRecordError,
    EtcdRequestError,
    EtcdStore,
    EtcdUnavailable,
    Snapshot,
    encode_offer,
)
from pals_daemon.config import DaemonConfig
from pals_daemon.errors import ConfigError, PalsError

if TYPE_CHECKING:
    from pals_daemon.server.daemon import Daemon
    from pals_daemon.server.runner import Runner

log = logging.getLogger(__name__)

# Seconds between repeats of the same "etcd unreachable" warning (a partition must not flood the journal).
_WARN_EVERY_S = 10.0


def node_name(cfg: DaemonConfig) -> str:
    """The node's name in the cluster: the configured one, else the host name (lower case, first label kept)."""
    name = cfg.cluster_node or socket.gethostname().lower()
    if not NODE_NAME.fullmatch(name):
        raise ConfigError([f"cluster_node: host name {name!r} is not a valid node name; set cluster_node"])
    return name


def store_from(cfg: DaemonConfig) -> EtcdStore:
    """The etcd store of ``cfg``'s [cluster] section."""
    return EtcdStore(
        cfg.cluster_endpoints,
        cfg.cluster_name,
        timeout_s=cfg.cluster_timeout_s,
        ca_file=cfg.cluster_ca_file,
        cert_file=cfg.cluster_cert_file,
        key_file=cfg.cluster_key_file,
    )


class ClusterAgent:
    """Runs the node side and the allocator in the daemon's event loop; etcd I/O in a worker thread."""

    def __init__(
        self,
        cfg: DaemonConfig,
        daemon: Daemon,
        store: EtcdStore | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.daemon = daemon
        self.node = node_name(cfg)
        self.store = store or store_from(cfg)
        self.wall_clock = wall_clock
        self.lease_id: int | None = None
        self.leader = False
        self.etcd_up = False
        self.grant_w: float | None = None
        self.published_applied_w: float | None = None
        self.offer: Offer | None = None
        self._published_offer: dict[str, object] | None = None
        self._offer_lease: int | None = None
        self.snapshot: Snapshot | None = None
        self.cluster_budget_w: float | None = None
        self.rounds = 0
        self.failures = 0
        self._last_warn_s = -math.inf
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Rounds every period until stop(); then resign and drop the lease (a clean exit lapses at once)."""
        period = self.cfg.cluster_period_s
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await self.round()
                self.etcd_up = True
            except (EtcdUnavailable, EtcdRequestError, ClusterRecordError) as exc:
                self._lost(exc)
            except PalsError as exc:  # a grant the daemon refused: hold, say why
                log.error("cluster round: %s", exc)
            try:
                await asyncio.wait_for(self._stop.wait(), max(period - (time.monotonic() - started), 0.0))
            except asyncio.TimeoutError:
                pass
        await self._leave()

    def stop(self) -> None:
        """Ask run() to finish its round and leave."""
        self._stop.set()

    def _lost(self, exc: Exception) -> None:
        self.etcd_up = False
        self.leader = False
        self.failures += 1
        now = time.monotonic()
        if now - self._last_warn_s >= _WARN_EVERY_S:
            self._last_warn_s = now
            budget = self.daemon.budget.target_w
            log.warning(
                "cluster: etcd unavailable (%s); holding the node budget at %s W",
                exc,
                "none" if budget is None else f"{budget:g}",
            )

    async def _leave(self) -> None:
        lease = self.lease_id
        if lease is None:
            return
        try:
            await asyncio.to_thread(self._leave_io, lease)
        except (EtcdUnavailable, EtcdRequestError, ClusterRecordError) as exc:
            log.info(
                "cluster: could not resign cleanly (%s); the lease lapses in %d s", exc, self.cfg.cluster_lease_ttl_s
            )
        self.leader = False
        self.lease_id = None

    def _leave_io(self, lease: int) -> None:
        if self.leader:
            self.store.resign(lease)
        self.store.revoke_lease(lease)

    # ------------------------------------------------------------------ one round

    async def round(self) -> None:
        """One round: node side, then (leader) allocation."""
        self.offer = await self._make_offer()
        applied = self.daemon.budget.target_w
        grant = await asyncio.to_thread(self._node_io, self.offer, applied)
        self.grant_w = grant
        if grant is not None and (applied is None or abs(grant - applied) > 1e-6):
            await self._apply(grant)
        self.leader = await asyncio.to_thread(self.store.campaign, self.node, self._lease())
        if self.leader:
            await asyncio.to_thread(self._allocate)
        else:
            self.snapshot = None
        self.rounds += 1

    def _lease(self) -> int:
        if self.lease_id is None:
            raise EtcdUnavailable("no lease")
        return self.lease_id

    async def _make_offer(self) -> Offer:
        floor, ceiling = self.daemon.min_budget_w(), self.daemon.max_budget_w()
        inp = getattr(self.daemon, "last_input", None)
        if inp is None:
            return Offer(floor, ceiling, ((floor, 0.0, 0.0),))
        # One copy taken in the loop (between ticks: consistent); the ~14 controller steps on it run in a thread.
        controller = copy.deepcopy(self.daemon.controller)
        return await asyncio.to_thread(offer_curve, controller, inp, floor, ceiling)

    def _node_io(self, offer: Offer, applied_w: float | None) -> float | None:
        """Lease, applied record, offer, grant (worker thread)."""
        if self.lease_id is None or self.store.refresh_lease(self.lease_id) <= 0:
            if self.lease_id is not None:
                log.warning("cluster: lease lapsed (node was cut off or paused); joining again with a new one")
            self.leader = False
            self.lease_id = self.store.grant_lease(self.cfg.cluster_lease_ttl_s)
        self._publish_applied(applied_w)
        record = encode_offer(offer, applied_w)
        if record != self._published_offer or self.lease_id != self._offer_lease:
            # Unchanged offers are not rewritten: the lease keepalive keeps the key alive.
            self.store.put(self.store.key("offer", self.node), record, self.lease_id)
            self._published_offer, self._offer_lease = record, self.lease_id
        return self.store.grant_of(self.node)

    def _publish_applied(self, applied_w: float | None) -> None:
        if applied_w is not None and applied_w != self.published_applied_w:
            self.store.put(self.store.key("applied", self.node), {"budget_w": applied_w})
            self.published_applied_w = applied_w

    async def _apply(self, grant_w: float) -> None:
        """Apply a grant as the node budget (enforced when set_budget returns), then confirm it in etcd."""
        floor = self.daemon.min_budget_w()
        target = grant_w
        if grant_w < floor:
            # A failed GPU raised the node's floor above its grant: the hardware cannot go lower. Said loudly; the
            # applied record then tells the leader the truth and it re-splits around it.
            log.error("cluster: grant %.0f W is below this node's floor %.0f W; applying the floor", grant_w, floor)
            target = floor
        await self.daemon.set_budget(target)
        log.info("cluster: node budget %.0f W applied (grant %.0f W)", target, grant_w)
        await asyncio.to_thread(self._publish_applied, target)

    def _allocate(self) -> None:
        """Leader: read everything at one revision, plan, write the changed grants in one guarded transaction."""
        snap = self.store.snapshot()
        self.snapshot = snap
        if snap.budget is None:
            self.cluster_budget_w = None
            return
        b = snap.budget
        budget_w = effective_budget_w(b.target_w, b.from_w, b.set_at_unix_s, b.ramp_s, self.wall_clock())
        self.cluster_budget_w = budget_w
        grants = plan_grants(snap.nodes, budget_w)
        if not grants:
            return
        reserved = total_reserved_w(snap.nodes, grants)
        if not self.store.write_grants(self.node, self._lease(), grants, budget_w, reserved):
            self.leader = False
            log.warning("cluster: lost leadership before writing grants; nothing written")
            return
        log.info(
            "cluster: cluster budget %.0f W; grants %s; reserved %.0f W",
            budget_w,
            ", ".join(f"{n}={w:.0f}" for n, w in sorted(grants.items())),
            reserved,
        )


class ClusterCollector(Collector):
    """pals_cluster_* metrics from the agent's last round (the leader also exports every node's records)."""

    def __init__(self, agent: ClusterAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        """The families (module docstring of metrics: base units)."""
        a = self.agent
        leader = GaugeMetricFamily(
            "pals_cluster_leader", "1 while this daemon is the cluster allocator", labels=["node"]
        )
        leader.add_metric([a.node], float(a.leader))
        yield leader
        up = GaugeMetricFamily("pals_cluster_etcd_up", "1 when the last round reached etcd", labels=["node"])
        up.add_metric([a.node], float(a.etcd_up))
        yield up
        grant = GaugeMetricFamily(
            "pals_cluster_node_grant_watts", "Node budget granted by the allocator", labels=["node"]
        )
        applied = GaugeMetricFamily(
            "pals_cluster_node_applied_watts", "Node budget applied and confirmed", labels=["node"]
        )
        ceiling = GaugeMetricFamily(
            "pals_cluster_node_offer_ceiling_watts", "Node offer: sum of maximum limits", labels=["node"]
        )
        floor = GaugeMetricFamily(
            "pals_cluster_node_offer_floor_watts", "Node offer: sum of minimum limits", labels=["node"]
        )
        tps = GaugeMetricFamily(
            "pals_cluster_node_offer_tokens_per_second",
            "Node offer: predicted tokens/s at its top point",
            labels=["node"],
        )
        if a.snapshot is not None:
            for n, v in a.snapshot.nodes.items():
                if v.grant_w is not None:
                    grant.add_metric([n], v.grant_w)
                if v.applied_w is not None:
                    applied.add_metric([n], v.applied_w)
                if v.offer is not None:
                    ceiling.add_metric([n], v.offer.ceiling_w)
                    floor.add_metric([n], v.offer.floor_w)
                    tps.add_metric([n], v.offer.points[-1][2])
        else:
            if a.grant_w is not None:
                grant.add_metric([a.node], a.grant_w)
            if a.published_applied_w is not None:
                applied.add_metric([a.node], a.published_applied_w)
            if a.offer is not None:
                ceiling.add_metric([a.node], a.offer.ceiling_w)
                floor.add_metric([a.node], a.offer.floor_w)
                tps.add_metric([a.node], a.offer.points[-1][2])
        yield from (grant, applied, ceiling, floor, tps)
        if a.leader and a.cluster_budget_w is not None:
            budget = GaugeMetricFamily("pals_cluster_budget_watts", "Cluster budget in force (leader only)")
            budget.add_metric([], a.cluster_budget_w)
            yield budget
            if a.snapshot is not None:
                reserved = GaugeMetricFamily(
                    "pals_cluster_reserved_watts", "Sum of node reservations max(grant, applied) (leader only)"
                )
                reserved.add_metric([], total_reserved_w(a.snapshot.nodes))
                yield reserved


def start_agent(cfg: DaemonConfig, runner: Runner) -> ClusterAgent:
    """Start the agent beside a started Runner: metrics registered, stopped (and gone from etcd) before the GPUs
    are restored."""
    agent = ClusterAgent(cfg, runner.daemon)
    runner.metrics.registry.register(ClusterCollector(agent))
    task = asyncio.get_running_loop().create_task(agent.run(), name="cluster-agent")

    async def stop() -> None:
        agent.stop()
        await task
        agent.store.close()

    runner.before_stop.append(stop)
    log.info(
        "cluster mode: node %s in cluster %s via %s", agent.node, cfg.cluster_name, ", ".join(cfg.cluster_endpoints)
    )
    return agent
