"""The multi-node replay: two simulated nodes with their own controllers, the allocator in the loop, in
simulated time; the node limits never exceed the cluster budget, and the split follows the load where a static
equal split cannot."""

from __future__ import annotations

from pals_daemon.cluster.replay import ClusterPolicy
from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.types import EngineTargets
from pals_daemon.model.profile import load_profiles
from pals_daemon.replay.scenario import Budget, EngineSpec, PoissonLoad, Scenario
from pals_daemon.replay.simulate import prepare, run_policy
from pals_daemon.server.daemon import default_profiles_dir

REG = load_profiles(str(default_profiles_dir()))
CFG = ControllerConfig(gpu_kind="A100-SXM4")


def _scenario(budget_w: float) -> Scenario:
    # Node 0 is saturated with a throughput target; node 1 is almost idle: its watts are better spent on node 0.
    busy = EngineSpec("busy", "mixtral-8x7b-instruct", PoissonLoad(40.0, 256, 128, seed=1),
                      targets=EngineTargets(tokens_per_s=2000.0))
    idle = EngineSpec("idle", "olmoe-1b-7b", PoissonLoad(0.2, 256, 128, seed=2))
    return Scenario("two-nodes", (busy, idle), duration_s=60.0, warmup_s=10.0, budget=Budget.constant(budget_w))


def test_cluster_split_moves_watts_to_the_loaded_node_and_never_over_grants() -> None:
    sc = _scenario(1400.0)
    prep = prepare(sc)
    nodes = {"n0": (0, 1, 2, 3), "n1": (4, 5, 6, 7)}
    cluster = ClusterPolicy(REG, CFG, nodes, "cluster")
    static = ClusterPolicy(REG, CFG, nodes, "static")
    rc = run_policy(sc, "cluster-split", REG, prep, policy=cluster)
    rs = run_policy(sc, "static-split", REG, prep, policy=static)
    assert rc.limit_over_budget_ticks == 0 and rs.limit_over_budget_ticks == 0
    assert cluster.max_reserved_over_w <= 1e-6
    assert cluster.grants["n0"] > cluster.grants["n1"]  # the loaded node gets more than half
    busy_c = next(e for e in rc.engines if e.engine_id == "busy")
    busy_s = next(e for e in rs.engines if e.engine_id == "busy")
    assert busy_c.output_tokens > busy_s.output_tokens
