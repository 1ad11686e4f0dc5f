"""The main job's best static cap in hindsight: the simulated node's run replayed under every static cap.

``pals-simnode`` runs pals and the default on the live daemon; the third reference, the lowest energy per output
token among static caps whose SLO attainment is within 1 pp of the default's (and that respect the budget at
every moment), is found by replaying the same trace, model, SLOs and budget schedule in simulated time
(``replay/references.py``), then run live like the other two. Only the configured batch is tried: a lower static
batch limit only builds queues on this trace (a full grid is in ``bench/slo_suite.py``).
"""

from __future__ import annotations

from dataclasses import replace

from pals_daemon.model.profile import ProfileRegistry
from pals_daemon.replay.policies import parse_static_spec
from pals_daemon.replay.references import find_best_static, static_grid
from pals_daemon.replay.scenario import Budget, EngineSpec, Scenario, TraceLoad
from pals_daemon.sim.node import ENGINE_ID, SimNodeSpec, load_requests
from pals_daemon.sim.truth import Perturbation

# Simulated seconds after the last arrival for the replay to drain the queue (the live run drains it too).
DRAIN_S = 120.0


def scenario_of(spec: SimNodeSpec) -> Scenario:
    """The replay scenario equivalent to one simulated-node run (trace loads only)."""
    if spec.poisson is not None:
        raise ValueError("the best static in hindsight is found for trace loads only")
    time_column, input_column, output_column = spec.trace_columns
    load = TraceLoad(
        path=spec.trace_path,
        time_column=time_column,
        input_column=input_column,
        output_column=output_column,
        time_scale=spec.time_scale,
        every=spec.nodes,
    )
    engine = EngineSpec(
        ENGINE_ID,
        spec.model,
        load,
        spec.targets,
        num_gpus=spec.num_gpus,
        gpu_kind=spec.gpu_kind,
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        perturbation=Perturbation(spec.truth_throughput_factor, spec.truth_power_factor),
    )
    trace_end_s = load_requests(spec)[-1].arrival_s
    points: list[tuple[float, float | None]] = [(0.0, spec.initial_budget_w)]
    if spec.budget_change_w is not None:
        points.append((spec.budget_change_at * trace_end_s, spec.budget_change_w))
    return Scenario(
        "simnode",
        (engine,),
        duration_s=trace_end_s + DRAIN_S,
        budget=Budget(tuple(points)),
        period_s=spec.period_s,
        warmup_s=0.0,
    )


def best_static_spec(spec: SimNodeSpec, registry: ProfileRegistry) -> SimNodeSpec | None:
    """The live spec of the best static cap in hindsight (advise mode over GPUs held at it), None if none fits."""
    scenario = scenario_of(spec)
    grid = static_grid(scenario, batches=())
    best, _, _ = find_best_static(scenario, registry, grid=grid)
    if best is None:
        return None
    static = parse_static_spec(best)
    return replace(spec, mode="advise", static_cap_w=static.cap_w)
