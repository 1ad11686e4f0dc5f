"""SLO-respecting references for a replay: the ``best-static`` search, parallel replays, and JSON rows.

``best-static``: the static (per-GPU cap, batch limit) of least GPU energy per output token whose SLO
attainment is within ``tolerance`` (1 percentage point) of the default policy's, found by replaying every
static of a grid (caps every 25 W from the GPUs' minimum limit to their maximum, x batch limits
{configured, 32, 16, 8}). With a budget only budget-respecting statics enter the grid: caps at most the
budget's smallest uniform share over the run. The replays are independent, so they run in worker processes
that inherit the prepared truths and request lists (fork start method: built once, shared copy-on-write).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pals_daemon.control.config import ControllerConfig
from pals_daemon.model.profile import ProfileRegistry
from pals_daemon.replay.policies import StaticSpec
from pals_daemon.replay.scenario import Scenario
from pals_daemon.replay.simulate import PolicyRun, Prepared, Timeline, prepare, run_policy
from pals_daemon.sim.hardware import hardware_profile

BEST_STATIC = "best-static"
# Static grid: the suggestion (25 W from the GPU minimum to the maximum) x these batch limits
# beside the configured one.
STATIC_CAP_STEP_W = 25.0
STATIC_BATCHES = (32, 16, 8)
# "Within 1 pp of default's SLO attainment" (issue 9's acceptance).
SLO_TOLERANCE = 0.01


def static_grid(
    scenario: Scenario, cap_step_w: float = STATIC_CAP_STEP_W, batches: Sequence[int] = STATIC_BATCHES
) -> list[str]:
    """``static:CAP:BATCH`` specs of the grid for ``scenario`` (budget-respecting caps only under a budget)."""
    hw = [hardware_profile(e.gpu_kind) for e in scenario.engines]
    lo = max(h.min_limit_w for h in hw)
    hi = min(h.max_limit_w for h in hw)
    share = min_budget_share_w(scenario)
    top = min(hi, math.floor(share)) if share is not None else hi
    caps = [lo + k * cap_step_w for k in range(int((top - lo) // cap_step_w) + 1)] if top >= lo else [lo]
    if top > caps[-1]:
        caps.append(float(top))
    configured = min(e.max_num_seqs for e in scenario.engines)
    bs = sorted({configured, *(b for b in batches if b < configured)}, reverse=True)
    return [StaticSpec(float(c), b).name for c in caps for b in bs]


def min_budget_share_w(scenario: Scenario) -> float | None:
    """The smallest uniform per-GPU share of the budget over the run (None without a budget)."""
    n = scenario.num_gpus
    times = [t for t, _ in scenario.budget.points if t < scenario.duration_s] or [0.0]
    vals = [scenario.budget.gpu_w(t, n) for t in times]
    # Interpolated budgets are piecewise linear: the extremes lie on the points already sampled.
    vals = [v for v in vals if v is not None]
    return min(vals) / n if vals else None


def pick_best_static(
    default: PolicyRun, statics: Mapping[str, PolicyRun], tolerance: float = SLO_TOLERANCE
) -> str | None:
    """The spec of least J per output token among ``statics`` within ``tolerance`` of default's SLO attainment."""
    d_slo = node_slo_attainment(default)
    ok = []
    for spec, run in statics.items():
        slo = node_slo_attainment(run)
        if d_slo is not None and (slo is None or slo < d_slo - tolerance - 1e-12):
            continue
        if run.output_tokens <= 0:
            continue
        ok.append((run.gpu_energy_j / run.output_tokens, spec))
    return min(ok)[1] if ok else None


# ---- parallel replays -----------------------------------------------------------------------------------

# Set in the parent before the pool forks; the workers read it (shared copy-on-write, never re-pickled).
_SHARED: dict[str, Any] = {}


@dataclass(frozen=True)
class Job:
    """One replay: a case of the shared table, a policy spec, whether to keep the timeline and requests."""

    case: str
    policy: str
    keep_detail: bool = True


def strip_detail(run: PolicyRun) -> PolicyRun:
    """``run`` without its timeline and per-request rows (what a grid search keeps of each replay)."""
    return replace(run, timeline=Timeline(), engines=[replace(e, finished=np.zeros((0, 5))) for e in run.engines])


def _run_job(job: Job) -> tuple[Job, PolicyRun | None, float, str | None]:
    started = time.process_time()
    scenario, prep = _SHARED["cases"][job.case]
    try:
        run = run_policy(scenario, job.policy, _SHARED["registry"], prep, config=_SHARED["config"])
    except Exception as e:  # noqa: BLE001 (a policy's failure is reported per job, not fatal to a suite)
        where = traceback.extract_tb(e.__traceback__)[-1]
        error = f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})"
        return job, None, time.process_time() - started, error
    return job, run if job.keep_detail else strip_detail(run), time.process_time() - started, None


def run_jobs(
    cases: Mapping[str, tuple[Scenario, Prepared]],
    jobs: Iterable[Job],
    registry: ProfileRegistry,
    config: ControllerConfig | None = None,
    workers: int | None = None,
    on_done: Callable[[Job, PolicyRun], None] | None = None,
    cpu_s: dict[tuple[str, str], float] | None = None,
    errors: dict[tuple[str, str], str] | None = None,
) -> dict[tuple[str, str], PolicyRun]:
    """Run every job (in ``workers`` processes; 1: in this process) and return runs by (case, policy).

    ``cpu_s``, when given, receives each replay's CPU seconds (what predicts the time on idle cores).
    A replay that raises is left out of the result and its error recorded in ``errors`` when given;
    without ``errors`` the first one raises RuntimeError here."""
    jobs = list(jobs)
    workers = default_workers() if workers is None else max(1, workers)
    _SHARED.update(cases=cases, registry=registry, config=config)
    out: dict[tuple[str, str], PolicyRun] = {}
    try:
        with contextlib.ExitStack() as stack:
            if workers == 1 or len(jobs) <= 1:
                results: Iterable[tuple[Job, PolicyRun | None, float, str | None]] = map(_run_job, jobs)
            else:
                ctx = multiprocessing.get_context("fork")
                pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers, mp_context=ctx))
                results = pool.map(_run_job, jobs, chunksize=1)
            for job, run, cpu, error in results:
                if cpu_s is not None:
                    cpu_s[(job.case, job.policy)] = cpu
                if run is None:
                    if errors is None:
                        raise RuntimeError(f"{job.policy} on {job.case}: {error}")
                    errors[(job.case, job.policy)] = str(error)
                    continue
                out[(job.case, job.policy)] = run
                if on_done is not None:
                    on_done(job, run)
        return out
    finally:
        _SHARED.clear()


def default_workers() -> int:
    """Worker processes: the CPUs this process may use (2 on CI)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def find_best_static(
    scenario: Scenario,
    registry: ProfileRegistry,
    prepared: Prepared | None = None,
    default: PolicyRun | None = None,
    grid: Sequence[str] | None = None,
    workers: int | None = None,
    tolerance: float = SLO_TOLERANCE,
) -> tuple[str | None, PolicyRun | None, dict[str, PolicyRun]]:
    """Replay the static grid (in parallel) and return (best spec, its full run, every static's stripped run).

    The best is None (and so is its run) when no static of the grid is within ``tolerance`` of default."""
    prep = prepared if prepared is not None else prepare(scenario)
    specs = list(grid if grid is not None else static_grid(scenario))
    if default is None:
        default = run_policy(scenario, "default", registry, prep)
    runs = run_jobs({"case": (scenario, prep)}, [Job("case", s, False) for s in specs], registry, workers=workers)
    statics = {s: runs[("case", s)] for s in specs}
    best = pick_best_static(default, statics, tolerance)
    # The winner again with its timeline and requests (the grid kept only the figures); its policy is the spec.
    full = run_policy(scenario, best, registry, prep) if best is not None else None
    return best, full, statics


# ---- JSON rows ------------------------------------------------------------------------------------------


def _all_finished(run: PolicyRun) -> np.ndarray:
    arrays = [e.finished for e in run.engines if e.finished.size]
    return np.concatenate(arrays) if arrays else np.zeros((0, 5))


def node_slo_attainment(run: PolicyRun) -> float | None:
    """SLO attainment over every engine's finished requests (each engine's own SLO), None without an SLO."""
    judged = [(e.slo_attainment, e.requests_finished) for e in run.engines if e.slo_attainment is not None]
    total = sum(n for _, n in judged)
    return sum(a * n for a, n in judged) / total if total else None


def _pcts(values: np.ndarray) -> dict[str, float | None]:
    if not values.size:
        return {"p50": None, "p90": None, "p99": None}
    p = np.percentile(values, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def policy_row(run: PolicyRun) -> dict[str, Any]:
    """The JSON figures of one policy on one case (node level; latency over every engine's requests)."""
    fin = _all_finished(run)
    ttft = _pcts(fin[:, 2]) if fin.size else _pcts(np.zeros(0))
    tpot = _pcts(fin[fin[:, 4] > 1, 3]) if fin.size else _pcts(np.zeros(0))
    out_tok = run.output_tokens
    all_tok = out_tok + sum(e.prompt_tokens for e in run.engines)
    return {
        "policy": run.policy,
        "j_per_output_token": run.gpu_energy_j / out_tok if out_tok else None,
        "j_per_token": run.gpu_energy_j / all_tok if all_tok else None,
        "server_j_per_output_token": run.server_energy_j / out_tok if out_tok else None,
        "slo_attainment": node_slo_attainment(run),
        "ttft_ms": ttft,
        "tpot_ms": tpot,
        "output_tokens": out_tok,
        "prompt_tokens": all_tok - out_tok,
        "requests_finished": sum(e.requests_finished for e in run.engines),
        "requests_arrived": sum(e.requests_arrived for e in run.engines),
        "gpu_energy_j": run.gpu_energy_j,
        "mean_gpu_power_w": run.gpu_energy_j / run.duration_s if run.duration_s > 0 else None,
        "time_over_budget_s": run.time_over_budget_s,
        "longest_excursion_s": run.longest_excursion_s,
        "limit_over_budget_ticks": run.limit_over_budget_ticks,
        "max_limit_excess_w": run.max_limit_excess_w,
        "duration_s": run.duration_s,
        "wall_s": run.wall_s,
    }


def scenario_inputs(scenario: Scenario) -> dict[str, Any]:
    """What a replay was run on: engines (model, load, SLOs, batch, mismatch), budget, duration."""
    return {
        "scenario": scenario.name,
        "duration_s": scenario.duration_s,
        "warmup_s": scenario.warmup_s,
        "period_s": scenario.period_s,
        "budget": {"unit": scenario.budget.unit, "points": [list(p) for p in scenario.budget.points]},
        "engines": [
            {
                "engine_id": e.engine_id,
                "model": e.model,
                "gpu_kind": e.gpu_kind,
                "num_gpus": e.num_gpus,
                "load": {"kind": type(e.load).__name__, **asdict(e.load)},
                "slo": {"ttft_ms": e.targets.ttft_ms, "tpot_ms": e.targets.tpot_ms},
                "target_tokens_per_s": e.targets.tokens_per_s,
                "max_num_seqs": e.max_num_seqs,
                "perturbation": asdict(e.perturbation),
            }
            for e in scenario.engines
        ],
    }

