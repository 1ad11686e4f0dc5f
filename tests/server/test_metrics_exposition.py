"""Prometheus exposition of a hand-built NodeStatus: names, labels, units, counters, and the HTTP endpoint."""

from __future__ import annotations

import importlib.util
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pals_daemon.api import pals_pb2
from pals_daemon.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "pals-dashboard.json"
DASHBOARD_TEST = REPO / "tests" / "deploy" / "test_grafana_dashboard.py"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def node_status(with_budget: bool = True) -> pals_pb2.NodeStatus:
    """Two GPUs (the second without instant power, lost), two engines (one with targets), a ramping budget."""
    s = pals_pb2.NodeStatus(timestamp_unix_s=1.7e9)
    s.gpus.add(
        index=0,
        uuid="GPU-aaaa",
        name="NVIDIA A100-SXM4-80GB",
        min_limit_w=100,
        max_limit_w=400,
        default_limit_w=400,
        requested_limit_w=300,
        enforced_limit_w=290,
        decided_limit_w=310,
        power_w=250.5,
        power_instant_w=260.25,
        energy_j=12345.5,
        sm_clock_mhz=1410,
        power_capped=True,
        controlled=True,
        engine_id="e1",
        clock_control=True,
        locked_clock_requested_mhz=1410,
        locked_clock_decided_mhz=1410,
        limit_drift=True,
        external_limit_w=290,
    )
    s.gpus.add(
        index=1,
        uuid="GPU-bbbb",
        name="NVIDIA A100-SXM4-80GB",
        min_limit_w=100,
        max_limit_w=400,
        default_limit_w=400,
        requested_limit_w=400,
        enforced_limit_w=400,
        decided_limit_w=350,
        power_w=80,
        energy_j=100,
        sm_clock_mhz=1005,
        power_capped=False,
        controlled=False,
        fault="GPU 1: GPU is lost",
    )
    s.engines.add(
        engine_id="e1",
        model="mixtral-8x7b-instruct",
        gpu_indices=[0],
        connected=True,
        targets=pals_pb2.EngineTargets(tokens_per_s=500, ttft_ms=2000, tpot_ms=50),
        max_num_seqs_limit=64,
        max_num_batched_tokens_limit=4096,
        throughput_tokens_per_s=480.5,
        tokens_per_joule=1.25,
        windows=10,
        qos_violation_windows=3,
    )
    s.engines.add(engine_id="e2", connected=False, max_num_seqs_limit=0)
    s.budget.CopyFrom(
        pals_pb2.BudgetStatus(
            min_budget_w=200, max_budget_w=800, node_power_w=330.5, sum_enforced_limits_w=690, ramp_remaining_s=4
        )
    )
    if with_budget:
        s.budget.budget_w = 700
        s.budget.effective_budget_w = 650
    s.controller.CopyFrom(pals_pb2.ControllerStatus(mode="enforce", backend="sim", ticks=42, decisions_changed=7))
    return s


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, labels) -> value)."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return types, samples


def gpu(index: int, uuid: str) -> frozenset[tuple[str, str]]:
    return frozenset({("gpu", str(index)), ("gpu_uuid", uuid)})


MODELS = {"e1": "mixtral-8x7b-instruct", "e2": ""}


def engine(engine_id: str) -> frozenset[tuple[str, str]]:
    return frozenset({("engine", engine_id), ("model", MODELS[engine_id])})


NONE: frozenset[tuple[str, str]] = frozenset()


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture
def scraped() -> tuple[dict[str, str], Samples]:
    metrics = Metrics(lambda: node_status(), registry=CollectorRegistry())
    metrics.observe_tick(0.003)
    return parse(exposition(metrics))


def test_gpu_metrics_have_gpu_and_uuid_labels_and_base_units(scraped) -> None:
    types, samples = scraped
    g0, g1 = gpu(0, "GPU-aaaa"), gpu(1, "GPU-bbbb")
    expected = {
        "pals_gpu_power_watts": (250.5, 80.0),
        "pals_gpu_power_limit_requested_watts": (300.0, 400.0),
        "pals_gpu_power_limit_enforced_watts": (290.0, 400.0),
        "pals_gpu_power_limit_decided_watts": (310.0, 350.0),
        "pals_gpu_power_limit_min_watts": (100.0, 100.0),
        "pals_gpu_power_limit_max_watts": (400.0, 400.0),
        "pals_gpu_sm_clock_hertz": (1.41e9, 1.005e9),  # MHz -> Hz
        "pals_gpu_power_capped": (1.0, 0.0),
        "pals_gpu_controlled": (1.0, 0.0),
    }
    for name, (v0, v1) in expected.items():
        assert types[name] == "gauge", name
        assert samples[(name, g0)] == pytest.approx(v0), name
        assert samples[(name, g1)] == pytest.approx(v1), name
    assert types["pals_gpu_energy_joules"] == "counter"
    assert samples[("pals_gpu_energy_joules_total", g0)] == 12345.5
    assert samples[("pals_gpu_energy_joules_total", g1)] == 100.0
    # Instant power only where the GPU reports it.
    assert samples[("pals_gpu_power_instant_watts", g0)] == 260.25
    assert ("pals_gpu_power_instant_watts", g1) not in samples
    # Every GPU sample carries exactly the two labels.
    for name, labels in samples:
        if name.startswith("pals_gpu_"):
            assert {k for k, _ in labels} == {"gpu", "gpu_uuid"}, name


def test_node_and_controller_metrics(scraped) -> None:
    types, samples = scraped
    assert samples[("pals_node_power_watts", NONE)] == 330.5
    # The budget in force (mid-ramp), not the target.
    assert samples[("pals_node_power_budget_watts", NONE)] == 650.0
    assert samples[("pals_node_power_limit_sum_watts", NONE)] == 690.0
    assert types["pals_controller_ticks"] == "counter"
    assert samples[("pals_controller_ticks_total", NONE)] == 42.0
    assert types["pals_controller_limit_changes"] == "counter"
    assert samples[("pals_controller_limit_changes_total", NONE)] == 7.0
    assert samples[("pals_controller_info", frozenset({("mode", "enforce"), ("backend", "sim")}))] == 1.0
    assert types["pals_controller_tick_duration_seconds"] == "histogram"
    assert samples[("pals_controller_tick_duration_seconds_count", NONE)] == 1.0
    assert samples[("pals_controller_tick_duration_seconds_sum", NONE)] == pytest.approx(0.003)
    assert samples[("pals_controller_tick_duration_seconds_bucket", frozenset({("le", "0.005")}))] == 1.0
    assert samples[("pals_controller_tick_duration_seconds_bucket", frozenset({("le", "0.0025")}))] == 0.0


def test_engine_metrics(scraped) -> None:
    types, samples = scraped
    e1, e2 = engine("e1"), engine("e2")
    assert samples[("pals_engine_throughput_tokens_per_second", e1)] == 480.5
    assert samples[("pals_engine_tokens_per_joule", e1)] == 1.25
    assert samples[("pals_engine_max_num_seqs_limit", e1)] == 64.0
    assert samples[("pals_engine_max_num_batched_tokens_limit", e1)] == 4096.0
    assert samples[("pals_engine_target_tokens_per_second", e1)] == 500.0
    assert samples[("pals_engine_target_ttft_seconds", e1)] == pytest.approx(2.0)  # ms -> s
    assert samples[("pals_engine_target_tpot_seconds", e1)] == pytest.approx(0.05)
    assert samples[("pals_engine_connected", e1)] == 1.0
    assert samples[("pals_engine_has_profile", e1)] == 0.0  # no decision with a profile in this snapshot
    assert types["pals_engine_windows"] == "counter"
    assert types["pals_engine_qos_violation_windows"] == "counter"
    assert samples[("pals_engine_windows_total", e1)] == 10.0
    assert samples[("pals_engine_qos_violation_windows_total", e1)] == 3.0
    # A disconnected engine without targets: no batch limits, no targets, but its identity and counters.
    assert samples[("pals_engine_connected", e2)] == 0.0
    assert samples[("pals_engine_windows_total", e2)] == 0.0
    for name in (
        "pals_engine_max_num_seqs_limit",
        "pals_engine_max_num_batched_tokens_limit",
        "pals_engine_target_tokens_per_second",
        "pals_engine_target_ttft_seconds",
        "pals_engine_target_tpot_seconds",
        "pals_engine_has_profile",
    ):
        assert (name, e2) not in samples, name
    # Every engine sample carries the engine and its model (joins and grouping by model).
    for name, labels in samples:
        if name.startswith("pals_engine_"):
            assert {k for k, _ in labels} == {"engine", "model"}, name


def test_engine_with_a_profile_is_flagged_1() -> None:
    status = node_status()
    status.engines[0].has_profile = True
    _, samples = parse(exposition(Metrics(lambda: status, registry=CollectorRegistry())))
    assert samples[("pals_engine_has_profile", engine("e1"))] == 1.0


def test_budget_gauge_absent_without_an_effective_budget() -> None:
    _, samples = parse(exposition(Metrics(lambda: node_status(with_budget=False), registry=CollectorRegistry())))
    assert "pals_node_power_budget_watts" not in names(samples)
    assert samples[("pals_node_power_budget_set", NONE)] == 0.0  # "no budget" is a value, not a missing series
    assert samples[("pals_node_power_watts", NONE)] == 330.5


def test_budget_set_gauge_with_a_budget(scraped) -> None:
    _, samples = scraped
    assert samples[("pals_node_power_budget_set", NONE)] == 1.0


def test_metrics_port_in_use_names_the_address() -> None:
    holder = Metrics(lambda: node_status(), registry=CollectorRegistry())
    port = holder.serve("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=rf"^\[Errno \d+\] metrics endpoint 127\.0\.0\.1:{port}: "):
            Metrics(lambda: node_status(), registry=CollectorRegistry()).serve("127.0.0.1", port)
    finally:
        holder.close()


def test_rendered_from_the_snapshot_at_scrape_time() -> None:
    current = {"status": node_status()}
    metrics = Metrics(lambda: current["status"], registry=CollectorRegistry())
    _, before = parse(exposition(metrics))
    assert ("pals_engine_connected", engine("e2")) in before
    changed = node_status()
    del changed.engines[1]
    del changed.gpus[0]
    changed.controller.ticks = 43
    current["status"] = changed
    _, after = parse(exposition(metrics))
    # Gone from the snapshot, gone from the scrape: no stale series.
    assert ("pals_engine_connected", engine("e2")) not in after
    assert ("pals_gpu_power_watts", gpu(0, "GPU-aaaa")) not in after
    assert ("pals_gpu_power_watts", gpu(1, "GPU-bbbb")) in after
    assert after[("pals_controller_ticks_total", NONE)] == 43.0


def _dashboard_metric_families() -> set[str]:
    spec = importlib.util.spec_from_file_location("_pals_dashboard_test", DASHBOARD_TEST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return set(module.METRICS)


def test_every_metric_the_dashboard_uses_is_exported(scraped) -> None:
    types, samples = scraped
    exported = names(samples)
    used = set(re.findall(r"pals_[a-z_]+", DASHBOARD.read_text()))
    assert used, "no pals_ metric in the dashboard?"
    missing = used - exported
    assert not missing, f"dashboard queries series the exporter does not produce: {sorted(missing)}"
    # And the list the dashboard test checks against: each is an exported family or sample name.
    listed = _dashboard_metric_families()
    assert not listed - exported - set(types), sorted(listed - exported - set(types))
    json.loads(DASHBOARD.read_text())  # still valid JSON


def test_serve_on_loopback_over_http() -> None:
    metrics = Metrics(lambda: node_status(), registry=CollectorRegistry())
    port = metrics.serve("127.0.0.1", 0)
    try:
        assert port > 0
        assert metrics._server is not None
        assert metrics._server.server_address[:2] == ("127.0.0.1", port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            body = response.read().decode()
        _, samples = parse(body)
        assert samples[("pals_gpu_power_watts", gpu(0, "GPU-aaaa"))] == 250.5
        assert samples[("pals_node_power_budget_watts", NONE)] == 650.0
    finally:
        metrics.close()
    assert metrics._server is None
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    metrics.close()  # idempotent
