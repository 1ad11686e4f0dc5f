"""Request traces for the simulated engines: CSV replay and synthetic Poisson arrivals."""

from __future__ import annotations

import calendar
import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pals_daemon.sim.engine import Request

# 8,819 requests of an Azure code-completion LLM service, 2023-11-16 18:17-19:14 UTC. Source:
# Azure/AzurePublicDataset data/AzureLLMInferenceTrace_code.csv, CC-BY-4.0; cite Patel et al., "Splitwise:
# Efficient Generative LLM Inference Using Phase Splitting", ISCA 2024 (see data/README.md).
DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "data" / "azure_llm_code_2023.csv"

# "2023-11-16 18:17:03.9799600", ISO "T" separator, any number of fractional digits, optional zone.
_DATETIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?\s*(Z|[+-]\d{2}:?\d{2})?$", re.IGNORECASE
)


def _parse_time(value: str) -> tuple[int, float, bool]:
    """(whole seconds, fraction, is_datetime) of a timestamp: a number of seconds or a date and time."""
    text = value.strip()
    try:
        x = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(x):
            raise ValueError(f"timestamp {value!r} is not finite")
        whole = math.floor(x)
        return whole, x - whole, False
    m = _DATETIME.match(text)
    if m is None:
        raise ValueError(f"cannot parse timestamp {value!r} (want seconds or 'YYYY-MM-DD HH:MM:SS[.fff]')")
    y, mo, d, hh, mi, ss = (int(g) for g in m.groups()[:6])
    # Python's datetime keeps 6 fractional digits; traces like Azure's have 7, so keep the fraction apart.
    digits = m.group(7) or ""
    frac = int(digits) / 10 ** len(digits) if digits else 0.0
    if not (1 <= mo <= 12 and 1 <= d <= 31 and hh <= 23 and mi <= 59 and ss <= 60):
        raise ValueError(f"timestamp {value!r} is out of range")
    whole = calendar.timegm((y, mo, d, hh, mi, ss, 0, 0, 0))
    zone = m.group(8)
    if zone and zone.upper() != "Z":
        sign = -1 if zone[0] == "-" else 1
        hm = zone[1:].replace(":", "")
        whole -= sign * (int(hm[:2]) * 3600 + int(hm[2:]) * 60)
    return whole, frac, True


def _parse_tokens(value: str, column: str, row_no: int) -> int:
    """A non-negative whole token count."""
    text = value.strip()
    try:
        x = float(text)
    except ValueError:
        raise ValueError(f"row {row_no}, column {column!r}: token count {value!r} is not a number") from None
    if not math.isfinite(x) or x != int(x):
        raise ValueError(f"row {row_no}, column {column!r}: token count {value!r} is not a whole number")
    if x < 0:
        raise ValueError(f"row {row_no}, column {column!r}: token count {value!r} is negative")
    return int(x)


def load_trace_csv(
    path: str | Path = DEFAULT_TRACE,
    time_column: str = "TIMESTAMP",
    input_column: str = "ContextTokens",
    output_column: str = "GeneratedTokens",
    time_scale: float = 1.0,
    limit_s: float | None = None,
) -> list[Request]:
    """Requests from a CSV of arrival time, prompt tokens and output tokens, sorted by arrival.

    Times are seconds (numbers) or date-times; arrivals are relative to the earliest row (the first, in a
    sorted trace) and multiplied by ``time_scale`` (0.5 replays twice as fast). ``limit_s`` keeps the
    requests arriving before it (after scaling). Row numbers in errors count the header as row 1.
    """
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise ValueError(f"time_scale must be finite and > 0, got {time_scale!r}")
    if limit_s is not None and not limit_s >= 0:
        raise ValueError(f"limit_s must be >= 0, got {limit_s!r}")
    times: list[tuple[int, float]] = []
    prompts: list[int] = []
    outputs: list[int] = []
    kinds: set[bool] = set()
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in (time_column, input_column, output_column) if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the file has {list(header)}")
        for row_no, row in enumerate(reader, start=2):
            values = (row.get(time_column), row.get(input_column), row.get(output_column))
            if any(v is None for v in values):
                raise ValueError(f"{path}: row {row_no} has too few fields")
            try:
                whole, frac, is_dt = _parse_time(values[0])
            except ValueError as e:
                raise ValueError(f"{path}: row {row_no}, column {time_column!r}: {e}") from None
            kinds.add(is_dt)
            if len(kinds) > 1:
                raise ValueError(f"{path}: row {row_no}, column {time_column!r}: mixes numbers and date-times")
            times.append((whole, frac))
            try:
                prompts.append(_parse_tokens(values[1], input_column, row_no))
                outputs.append(_parse_tokens(values[2], output_column, row_no))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
    if not times:
        raise ValueError(f"{path}: no requests in the trace")
    w0, f0 = min(times)
    requests = [
        Request(((w - w0) + (fr - f0)) * time_scale, p, o)
        for (w, fr), p, o in zip(times, prompts, outputs, strict=True)
    ]
    requests.sort(key=lambda r: r.arrival_s)
    if limit_s is not None:
        requests = [r for r in requests if r.arrival_s < limit_s]
    return requests


def shift_requests(requests: Sequence[Request], offset_s: float) -> list[Request]:
    """The same requests arriving ``offset_s`` later (e.g. to start a trace at the simulated clock's now)."""
    return [Request(r.arrival_s + offset_s, r.prompt_tokens, r.output_tokens) for r in requests]


def poisson_requests(
    rate_per_s: float,
    duration_s: float,
    prompt_tokens: int | Sequence[int],
    output_tokens: int | Sequence[int],
    seed: int = 0,
) -> list[Request]:
    """Poisson arrivals at ``rate_per_s`` over ``duration_s``; lengths fixed (int) or drawn from a sequence."""
    if not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"rate_per_s must be finite and > 0, got {rate_per_s!r}")
    if not (math.isfinite(duration_s) and duration_s >= 0):
        raise ValueError(f"duration_s must be finite and >= 0, got {duration_s!r}")
    rng = np.random.default_rng(seed)
    arrivals: list[float] = []
    t = float(rng.exponential(1.0 / rate_per_s))
    while t < duration_s:
        arrivals.append(t)
        t += float(rng.exponential(1.0 / rate_per_s))
    n = len(arrivals)
    return [
        Request(a, p, o)
        for a, p, o in zip(
            arrivals,
            _lengths(prompt_tokens, n, rng, "prompt_tokens"),
            _lengths(output_tokens, n, rng, "output_tokens"),
            strict=True,
        )
    ]


def _lengths(spec: int | Sequence[int], n: int, rng: np.random.Generator, name: str) -> list[int]:
    """``n`` token counts: ``spec`` repeated, or sampled with replacement from it."""
    if isinstance(spec, (int, np.integer)):
        if spec < 0:
            raise ValueError(f"{name} must be >= 0, got {spec!r}")
        return [int(spec)] * n
    values = [int(v) for v in spec]
    if not values or min(values) < 0:
        raise ValueError(f"{name} must be a non-negative int or a non-empty sequence of them")
    return [values[i] for i in rng.integers(0, len(values), size=n)]
