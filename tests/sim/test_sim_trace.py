"""Trace loading (CSV replay) and synthetic Poisson arrivals."""

from __future__ import annotations

from pathlib import Path

import pytest

from pals_daemon.sim.engine import Request
from pals_daemon.sim.trace import DEFAULT_TRACE, load_trace_csv, poisson_requests, shift_requests


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "trace.csv"
    p.write_text(text)
    return p


def test_default_azure_trace() -> None:
    reqs = load_trace_csv(DEFAULT_TRACE)
    assert len(reqs) == 8819
    assert reqs[0] == Request(0.0, 4808, 10)
    # 18:17:04.0319600 - 18:17:03.9799600
    assert reqs[1].arrival_s == pytest.approx(0.052, abs=1e-9)
    assert reqs[-1].arrival_s == pytest.approx(3435.948056, abs=1e-6)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:], strict=False))


def test_seven_fractional_digits_are_kept(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 23:59:59.9999999,1,1\n2023-11-17T00:00:00.0000001Z,2,2\n2023-11-17 00:00:01.5,3,3\n",
    )
    reqs = load_trace_csv(p)
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 2e-7, 1.5000001], abs=1e-12)


def test_numeric_times_custom_columns_scale_limit_and_sorting(tmp_path: Path) -> None:
    p = _write(tmp_path, "t,in,out\n12.5,10,3\n10.0,20,4\n20,30,5\n16,40.0,6\n")
    reqs = load_trace_csv(p, time_column="t", input_column="in", output_column="out")
    assert reqs == [Request(0.0, 20, 4), Request(2.5, 10, 3), Request(6.0, 40, 6), Request(10.0, 30, 5)]
    half = load_trace_csv(p, "t", "in", "out", time_scale=0.5)
    assert [r.arrival_s for r in half] == [0.0, 1.25, 3.0, 5.0]
    limited = load_trace_csv(p, "t", "in", "out", time_scale=0.5, limit_s=3.0)
    assert [r.prompt_tokens for r in limited] == [20, 10]


def test_timezone_offsets(tmp_path: Path) -> None:
    p = _write(
        tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n2024-01-01T10:00:00+01:00,1,1\n2024-01-01T09:00:30Z,1,1\n"
    )
    assert [r.arrival_s for r in load_trace_csv(p)] == [0.0, 30.0]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("TIMESTAMP,Context,GeneratedTokens\n0,1,1\n", r"missing column\(s\) \['ContextTokens'\]"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\n1,-5,1\n", r"row 3, column 'ContextTokens'.*negative"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\n1,1,2.5\n", r"row 3, column 'GeneratedTokens'.*whole"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\n1,x,1\n", r"row 3, column 'ContextTokens'.*not a number"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,1\n", r"row 2, column 'TIMESTAMP'.*cannot parse"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-13-01 00:00:00,1,1\n", r"row 2.*out of range"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\n2023-11-16 18:17:03,1,1\n", r"row 3.*mixes"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nnan,1,1\n", r"row 2.*not finite"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,1\n", r"row 2 has too few fields"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n", r"no requests"),
    ],
)
def test_loader_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_trace_csv(_write(tmp_path, text))


def test_bad_scale_and_limit(tmp_path: Path) -> None:
    p = _write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\n")
    with pytest.raises(ValueError, match="time_scale"):
        load_trace_csv(p, time_scale=0.0)
    with pytest.raises(ValueError, match="limit_s"):
        load_trace_csv(p, limit_s=-1.0)


def test_poisson_requests() -> None:
    a = poisson_requests(20.0, 100.0, 512, 64, seed=42)
    assert a == poisson_requests(20.0, 100.0, 512, 64, seed=42)
    assert a != poisson_requests(20.0, 100.0, 512, 64, seed=43)
    assert 1800 < len(a) < 2200
    assert all(0 <= r.arrival_s < 100.0 for r in a)
    assert {(r.prompt_tokens, r.output_tokens) for r in a} == {(512, 64)}
    b = poisson_requests(5.0, 60.0, [100, 200], [1, 7, 9], seed=1)
    assert {r.prompt_tokens for r in b} == {100, 200}
    assert {r.output_tokens for r in b} == {1, 7, 9}
    with pytest.raises(ValueError):
        poisson_requests(0.0, 10.0, 1, 1)
    with pytest.raises(ValueError):
        poisson_requests(1.0, 10.0, [], 1)


def test_shift_requests() -> None:
    assert shift_requests([Request(1.0, 2, 3)], 10.0) == [Request(11.0, 2, 3)]
