"""The clock knob in palsctl status and in the Prometheus exposition (hand-built NodeStatus)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pals_daemon.api import pals_pb2
from pals_daemon.cli import palsctl
from pals_daemon.metrics import Metrics


def status() -> pals_pb2.NodeStatus:
    """GPU 0 locked at 1410 MHz; GPU 1 cap-only (not supported), its controller choice shown anyway."""
    s = pals_pb2.NodeStatus()
    common = {"name": "NVIDIA H100 80GB HBM3", "controlled": True, "min_clock_mhz": 345, "max_clock_mhz": 1980}
    s.gpus.add(index=0, uuid="GPU-a", sm_clock_mhz=1410, clock_control=True, locked_clock_requested_mhz=1410,
               locked_clock_decided_mhz=1410, **common)
    s.gpus.add(index=1, uuid="GPU-b", sm_clock_mhz=1980, clock_control=False, locked_clock_decided_mhz=1410,
               clock_control_note="cannot lock the SM clock at 1410 MHz: NOT_SUPPORTED (3); cap-only control",
               **common)
    s.gpus.add(index=2, uuid="GPU-c", name="NVIDIA H100 80GB HBM3", controlled=True, sm_clock_mhz=1500,
               clock_external=True, clock_control_note="clocks set by someone else (...); left alone")
    return s


def test_palsctl_shows_lock_decided_in_force_and_why_not() -> None:
    lines = palsctl.format_status(status()).splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.rstrip().endswith("clock control"))
    rows = [ln.split(maxsplit=5) for ln in lines[header + 1 : header + 4]]
    assert rows[0] == ["0", "1410", "1410", "1410", "345-1980", "yes"]
    assert rows[1][:5] == ["1", "none", "1410", "1980", "345-1980"]
    assert rows[1][5].startswith("no: cannot lock the SM clock") and rows[1][5].endswith("cap-only control")
    assert rows[2][:5] == ["2", "none", "none", "1500", "-"] and "someone else" in rows[2][5]


def test_clock_metrics() -> None:
    text = generate_latest(Metrics(status, registry=CollectorRegistry()).registry).decode()
    samples = {
        (s.name, s.labels["gpu"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("pals_gpu_clock")
    }
    assert samples == {
        ("pals_gpu_clock_control", "0"): 1.0,
        ("pals_gpu_clock_control", "1"): 0.0,
        ("pals_gpu_clock_control", "2"): 0.0,
        ("pals_gpu_clock_external", "0"): 0.0,
        ("pals_gpu_clock_external", "1"): 0.0,
        ("pals_gpu_clock_external", "2"): 1.0,
        # Only while locked / decided: no sample means unlocked.
        ("pals_gpu_clock_locked_requested_hertz", "0"): 1410e6,
        ("pals_gpu_clock_locked_decided_hertz", "0"): 1410e6,
        ("pals_gpu_clock_locked_decided_hertz", "1"): 1410e6,
    }
