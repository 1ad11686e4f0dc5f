"""Load: simulated engines stream StepReports to a daemon process over the real engine socket (bench/load_engines.py).

The short run (default suite) checks that the daemon survives, keeps ticking, answers every engine with
directives and does not grow; the 60 s run of the issue's acceptance (64 engines x 100 Hz) is second stage.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Acceptance goals of issue 5: control period jitter p99 under 50 ms, RSS growth under 20 MB.
JITTER_P99_GOAL_MS = 50.0
RSS_GROWTH_GOAL_MB = 20.0


def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("load_engines", ROOT / "bench" / "load_engines.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_engines"] = module
    spec.loader.exec_module(module)
    return module


def check_healthy(figures: dict[str, Any], engines: int) -> None:
    assert figures["daemon_alive_at_end"], figures["daemon_log_tail"]
    assert figures["daemon_exit_code"] == 0, figures["daemon_log_tail"]
    assert figures["client_errors"] == []
    assert figures["ticks_measured"] >= 2
    # Every engine got directives: the daemon kept answering while taking the reports.
    assert figures["directives_received"] >= engines * figures["ticks_measured"] // 2
    assert 0 < figures["directive_latency_ms"]["p99"] < 5_000
    assert not math.isnan(figures["rss_mb"]["growth"])


def test_short_load_no_crash_and_bounded_memory() -> None:
    engines = 8
    figures = bench().run_load(engines=engines, rate_hz=50.0, duration_s=2.5, procs=1, lead_s=1.5)
    check_healthy(figures, engines)
    assert figures["achieved_fraction"] > 0.5
    assert figures["rss_mb"]["growth"] < RSS_GROWTH_GOAL_MB


@pytest.mark.slow
def test_64_engines_at_100_hz_for_60_s(tmp_path: Path) -> None:
    module = bench()
    figures = module.run_load(engines=64, rate_hz=100.0, duration_s=60.0, procs=4)
    check_healthy(figures, 64)
    # On a small machine the clients saturate before the daemon: the bench reports the rate achieved; the
    # daemon's goals are judged under whatever rate that was, which must still be most of the target.
    assert figures["achieved_fraction"] > 0.5
    assert figures["period_jitter_ms"]["p99"] < JITTER_P99_GOAL_MS
    assert figures["rss_mb"]["growth"] < RSS_GROWTH_GOAL_MB
