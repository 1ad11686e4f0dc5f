"""Request streams for load levels: a trace at a chosen mean rate, a trace following a published load shape,
and a model's measured capacity on a request mix (what load levels are defined from).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pals_daemon.sim.engine import Request, SimEngine
from pals_daemon.sim.gpu import make_sim_gpus
from pals_daemon.sim.truth import ModelTruth


def at_mean_rate(requests: Sequence[Request], rate_per_s: float, duration_s: float) -> list[Request]:
    """The trace's first ``round(rate x duration)`` requests in order, its timeline scaled so that they
    arrive over ``[0, duration_s)`` at mean ``rate_per_s`` (burst structure kept, stretched or compressed).

    Where the trace has fewer requests, it loops: each repetition follows the last, shifted by the trace's
    span plus one mean gap.
    """
    if not requests:
        raise ValueError("at_mean_rate needs a non-empty trace")
    if not (rate_per_s > 0 and duration_s > 0):
        raise ValueError(f"rate_per_s and duration_s must be > 0, got {rate_per_s!r}, {duration_s!r}")
    base = sorted(requests, key=lambda r: r.arrival_s)
    t0 = base[0].arrival_s
    span = base[-1].arrival_s - t0
    period = span + (span / max(1, len(base) - 1) if len(base) > 1 else 1.0)
    n = max(1, round(rate_per_s * duration_s))
    times = np.empty(n)
    picked: list[Request] = []
    for i in range(n):
        k, j = divmod(i, len(base))
        r = base[j]
        times[i] = (r.arrival_s - t0) + k * period
        picked.append(r)
    # The (n+1)-th arrival (next request of the loop) maps to duration_s, so the mean rate is exact.
    k, j = divmod(n, len(base))
    end = (base[j].arrival_s - t0) + k * period
    scale = duration_s / end if end > 0 else 1.0
    return [Request(float(t * scale), r.prompt_tokens, r.output_tokens) for t, r in zip(times, picked, strict=True)]


def load_shape(path: str | Path, service: str, hours: float = 24.0) -> tuple[np.ndarray, np.ndarray]:
    """(minutes from start, requests per minute) of ``service`` in a digitized load-shape CSV, first ``hours``.

    The CSV (``data/azure_llm_2024_week_load_shape_digitized.csv``) has ``service, minutes_from_start,
    req_per_min_mid`` among its columns.
    """
    mins, rpm = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["service"] != service:
                continue
            m = float(row["minutes_from_start"])
            if m <= hours * 60.0:
                mins.append(m)
                rpm.append(float(row["req_per_min_mid"]))
    if len(mins) < 2:
        raise ValueError(f"{path}: fewer than two points for service {service!r}")
    order = np.argsort(mins)
    return np.asarray(mins)[order], np.asarray(rpm)[order]


def shaped_requests(
    shape_min: np.ndarray,
    shape_rpm: np.ndarray,
    sizes: Sequence[Request],
    rate_per_s: float,
    duration_s: float,
    seed: int = 0,
) -> list[Request]:
    """Poisson arrivals over ``[0, duration_s)`` whose rate follows the shape (its whole span mapped onto the
    duration, linear between points) with mean ``rate_per_s``; each request's (prompt, output) sizes are
    drawn with replacement from ``sizes`` (a real trace), seeded."""
    if not sizes:
        raise ValueError("shaped_requests needs request sizes to resample")
    rng = np.random.default_rng(seed)
    x = (shape_min - shape_min[0]) / (shape_min[-1] - shape_min[0]) * duration_s
    rel = shape_rpm / np.trapezoid(shape_rpm, x) * duration_s  # mean 1 over the duration
    # Cumulative intensity (trapezoid), then unit-rate Poisson arrivals mapped through its inverse.
    cum = np.concatenate([[0.0], np.cumsum(np.diff(x) * (rel[1:] + rel[:-1]) / 2)]) * rate_per_s
    arrivals = []
    s = rng.exponential()
    while s < cum[-1]:
        arrivals.append(float(np.interp(s, cum, x)))
        s += rng.exponential()
    idx = rng.integers(0, len(sizes), size=len(arrivals))
    return [Request(t, sizes[i].prompt_tokens, sizes[i].output_tokens) for t, i in zip(arrivals, idx, strict=True)]


def measure_capacity_req_per_s(
    truth: ModelTruth,
    sizes: Sequence[Request],
    gpu_kind: str,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    duration_s: float = 240.0,
    seed: int = 0,
) -> float:
    """Requests/s the engine completes under the default policy (top cap, configured batch) when saturated
    on this request mix: a replay with every request queued at once (sizes resampled from ``sizes``),
    completions counted after the first quarter of the run (the start-up transient)."""
    rng = np.random.default_rng(seed)
    # More requests than any model here can finish in duration_s (checked below).
    n = 20_000
    idx = rng.integers(0, len(sizes), size=n)
    reqs = [Request(0.0, sizes[i].prompt_tokens, sizes[i].output_tokens) for i in idx]
    now = [0.0]
    gpus = make_sim_gpus(gpu_kind, truth.num_gpus, lambda: now[0])
    eng = SimEngine("capacity", truth, gpus, reqs, max_num_seqs, max_num_batched_tokens)
    t_from = duration_s / 4
    now[0] = t_from
    eng.advance(t_from)
    done0 = eng.totals.requests_finished + eng.totals.requests_rejected
    now[0] = duration_s
    eng.advance(duration_s)
    done = eng.totals.requests_finished + eng.totals.requests_rejected - done0
    if eng.num_waiting == 0:
        raise ValueError(f"capacity run of {truth.model} ran out of requests: not saturated")
    return done / (duration_s - t_from) if done else math.nan
