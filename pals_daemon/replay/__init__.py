"""Trace replay in simulated time: the daemon's control loop without sockets, policies side by side."""

from __future__ import annotations

from pals_daemon.replay.policies import POLICIES, make_policy
from pals_daemon.replay.scenario import Budget, BurstyLoad, EngineSpec, PoissonLoad, Scenario, TraceLoad, load_scenario
from pals_daemon.replay.simulate import PolicyRun, run_policy, run_scenario

__all__ = [
    "POLICIES",
    "Budget",
    "BurstyLoad",
    "EngineSpec",
    "PoissonLoad",
    "PolicyRun",
    "Scenario",
    "TraceLoad",
    "load_scenario",
    "make_policy",
    "run_policy",
    "run_scenario",
]
