"""The Grafana dashboard is importable and uses only the metric names the exporter exposes."""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import pytest

DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pals-dashboard.json"

# Exactly the families pals_daemon's exporter exposes (histogram and counters by family name).
METRICS = {
    "pals_gpu_power_watts",
    "pals_gpu_power_instant_watts",
    "pals_gpu_energy_joules_total",
    "pals_gpu_power_limit_requested_watts",
    "pals_gpu_power_limit_enforced_watts",
    "pals_gpu_power_limit_min_watts",
    "pals_gpu_power_limit_max_watts",
    "pals_gpu_sm_clock_hertz",
    "pals_gpu_power_capped",
    "pals_gpu_controlled",
    "pals_gpu_clock_control",
    "pals_gpu_clock_external",
    "pals_gpu_clock_locked_requested_hertz",
    "pals_gpu_clock_locked_decided_hertz",
    "pals_gpu_power_limit_decided_watts",
    "pals_gpu_power_limit_external_watts",
    "pals_gpu_failed",
    "pals_gpu_power_limit_drift",
    "pals_node_power_watts",
    "pals_node_power_budget_watts",
    "pals_node_power_budget_set",
    "pals_node_power_limit_sum_watts",
    "pals_engine_throughput_tokens_per_second",
    "pals_engine_tokens_per_joule",
    "pals_engine_max_num_seqs_limit",
    "pals_engine_max_num_batched_tokens_limit",
    "pals_engine_target_tokens_per_second",
    "pals_engine_target_ttft_seconds",
    "pals_engine_target_tpot_seconds",
    "pals_engine_qos_violation_windows_total",
    "pals_engine_windows_total",
    "pals_engine_connected",
    "pals_engine_has_profile",
    "pals_controller_tick_duration_seconds",
    "pals_controller_ticks_total",
    "pals_controller_limit_changes_total",
    "pals_controller_info",
}
HISTOGRAMS = {"pals_controller_tick_duration_seconds"}
OPTIONAL = {"pals_controller_info"}
TOKEN = re.compile(r"pals_[a-z_]+")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        # Collapsed rows keep their panels inside.
        yield from panel.get("panels", [])


def _queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL string: panel targets and template-variable queries."""
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def _family(token: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = token.removesuffix(suffix)
        if base != token and base in HISTOGRAMS:
            return base
    return token


def test_every_expr_uses_only_exported_metrics(dashboard) -> None:
    unknown = {tok for expr in _queries(dashboard) for tok in TOKEN.findall(expr) if _family(tok) not in METRICS}
    assert not unknown, f"dashboard queries metrics the exporter does not expose: {sorted(unknown)}"


def test_every_metric_family_is_shown(dashboard) -> None:
    used = {_family(tok) for p in _panels(dashboard) for t in p.get("targets", []) for tok in TOKEN.findall(t["expr"])}
    missing = METRICS - OPTIONAL - used
    assert not missing, f"metric families without a panel: {sorted(missing)}"


def test_counters_and_histograms_are_not_graphed_raw(dashboard) -> None:
    # A raw counter or bucket series is meaningless on a graph: it must go through rate()/increase().
    for expr in _queries(dashboard):
        for match in re.finditer(r"pals_[a-z_]+(_total|_bucket|_sum|_count)\b", expr):
            before = expr[: match.start()]
            if before.startswith("label_values("):
                continue
            assert re.search(r"(rate|increase)\(\s*$", before), f"raw counter in {expr!r}"


def test_histogram_quantile_for_tick_p99(dashboard) -> None:
    exprs = _queries(dashboard)
    assert any("histogram_quantile(0.99" in e and "pals_controller_tick_duration_seconds_bucket" in e for e in exprs)


def test_qos_violation_ratio(dashboard) -> None:
    exprs = _queries(dashboard)
    assert any(
        re.search(r"increase\(pals_engine_qos_violation_windows_total.*/.*increase\(pals_engine_windows_total", e)
        for e in exprs
    )


def test_importable_with_datasource_input(dashboard) -> None:
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"]
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert target["expr"].count("{") == target["expr"].count("}"), target["expr"]


def test_template_variables(dashboard) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"gpu", "engine"} <= set(variables)
    for name in ("gpu", "engine"):
        assert variables[name]["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert variables[name]["multi"] and variables[name]["includeAll"]
    # Panels filter on them (regex match, so "All" and multi-select work).
    exprs = "\n".join(_queries(dashboard))
    assert 'gpu=~"$gpu"' in exprs
    assert 'engine=~"$engine"' in exprs


def test_panel_ids_unique_and_layout_fits(dashboard) -> None:
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, p["title"]
