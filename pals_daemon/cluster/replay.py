"""Multi-node replay: several simulated nodes, each with its own Controller, and the cluster allocator in the loop.

A ``Policy`` for ``pals_daemon.replay.simulate.run_policy``: the replay's node is cut into nodes (GPU groups);
each node's controller sees only its GPUs, engines and targets, under its own node budget. ``cluster`` mode runs
the allocator every ``alloc_every`` ticks on the nodes' offers (``offer_curve``) with ``plan_grants``; a node
applies its grant at its next tick and the allocator sees that confirmation at its next round, so a decrease's
watts reach another node one round later, as over etcd. ``static`` mode gives every node an equal share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pals_daemon.cluster.offer import offer_curve
from pals_daemon.cluster.plan import NodeView, Offer, plan_grants, reserved_w
from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.core import Controller
from pals_daemon.control.types import ControllerInput, Decision
from pals_daemon.model.profile import ProfileRegistry

MODES = ("cluster", "static")


class ClusterPolicy:
    """Per-node controllers under node budgets from the cluster allocator (or a static equal split)."""

    def __init__(
        self,
        registry: ProfileRegistry,
        config: ControllerConfig,
        nodes: Mapping[str, Sequence[int]],
        mode: str = "cluster",
        alloc_every: int = 2,
        offer_every: int = 4,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
        self.name = f"{mode}-split"
        self.mode = mode
        self.nodes = {n: frozenset(g) for n, g in nodes.items()}
        self.controllers = {n: Controller(registry, config) for n in nodes}
        self.alloc_every = max(1, alloc_every)
        # Offers are refreshed every offer_every ticks (each costs ~14 controller steps per node; the daemon's
        # agent refreshes every round, but in replay that would be most of the run's time).
        self.offer_every = max(1, offer_every)
        self.offers: dict[str, Offer] = {}
        self.grants: dict[str, float] = {}
        self.applied: dict[str, float] = {}
        self.ticks = 0
        # Largest sum of reservations seen against the cluster budget in force (must stay <= 0 W over).
        self.max_reserved_over_w = float("-inf")

    def _sub(self, inp: ControllerInput, node: str, budget_w: float | None) -> ControllerInput:
        gpus = tuple(g for g in inp.gpus if g.index in self.nodes[node])
        engines = tuple(e for e in inp.engines if set(e.gpu_indices) <= self.nodes[node])
        targets = {e.engine_id: inp.targets[e.engine_id] for e in engines if e.engine_id in inp.targets}
        return ControllerInput(inp.now_s, budget_w, gpus, engines, targets)

    def decide(self, inp: ControllerInput) -> Decision:
        """Node budgets for this tick, then each node's own decision; merged."""
        floors = {n: sum(g.min_limit_w for g in inp.gpus if g.index in gs) for n, gs in self.nodes.items()}
        ceilings = {n: sum(g.max_limit_w for g in inp.gpus if g.index in gs) for n, gs in self.nodes.items()}
        budget = inp.budget_w
        if budget is None:
            node_budget: dict[str, float | None] = dict.fromkeys(self.nodes)
        elif self.mode == "static":
            node_budget = {n: max(budget / len(self.nodes), floors[n]) for n in self.nodes}
        else:
            if self.ticks % self.offer_every == 0 or not self.offers:
                self.offers = {
                    n: offer_curve(self.controllers[n], self._sub(inp, n, None), floors[n], ceilings[n])
                    for n in self.nodes
                }
            if self.ticks % self.alloc_every == 0:
                views = {
                    n: NodeView(self.offers[n], self.grants.get(n), self.applied.get(n, floors[n])) for n in self.nodes
                }
                self.grants.update(plan_grants(views, budget))
                reserved = sum(reserved_w(NodeView(None, self.grants.get(n), v.applied_w)) for n, v in views.items())
                self.max_reserved_over_w = max(self.max_reserved_over_w, reserved - budget)
            # A node applies its grant at its own next tick (the floor until its first grant).
            node_budget = {n: self.grants.get(n, floors[n]) for n in self.nodes}
        limits: dict[int, float] = {}
        engines = {}
        changed = False
        reasons = []
        for n in self.nodes:
            b = node_budget[n]
            if b is not None:
                self.applied[n] = b
            d = self.controllers[n].step(self._sub(inp, n, b))
            limits.update(d.gpu_limits_w)
            engines.update(d.engines)
            changed = changed or d.changed
            reasons.append(f"{n}: {d.reason}")
        self.ticks += 1
        return Decision(limits, engines, changed, "; ".join(reasons))
