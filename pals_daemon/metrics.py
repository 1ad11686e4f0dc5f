"""Prometheus exposition: a collector that renders the daemon's latest status snapshot at scrape time.

Rendering from the snapshot keeps one source of truth (the same data PowerAdmin serves) and makes a
disconnected engine or a lost GPU disappear from the scrape instead of leaving stale gauges behind.
Conventions of Kepler and dcgm-exporter: base units, labels ``gpu`` (index), ``gpu_uuid``, ``engine``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pals_daemon.api import pals_pb2
from pals_daemon.server.metrics_http import CachedExposition, serve_metrics

log = logging.getLogger(__name__)

HZ_PER_MHZ = 1e6
MS_PER_S = 1000.0


class StatusCollector(Collector):
    """Yields every pals_* gauge and counter from ``snapshot()``."""

    def __init__(self, snapshot: Callable[[], pals_pb2.NodeStatus]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """Build the metric families from the current snapshot."""
        s = self.snapshot()
        yield from self._gpu_metrics(s)
        yield from self._node_metrics(s)
        yield from self._engine_metrics(s)
        info = GaugeMetricFamily("pals_controller_info", "Mode and backend of the daemon", labels=["mode", "backend"])
        info.add_metric([s.controller.mode, s.controller.backend], 1)
        yield info

    def _gpu_metrics(self, s: pals_pb2.NodeStatus) -> Iterator[Metric]:
        labels = ["gpu", "gpu_uuid"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        power = gauge("pals_gpu_power_watts", "GPU power, NVML's averaged reading (1 s window on Ampere+)")
        instant = gauge("pals_gpu_power_instant_watts", "GPU instantaneous power (NVML_FI_DEV_POWER_INSTANT)")
        energy = CounterMetricFamily("pals_gpu_energy_joules", "GPU energy since driver load", labels=labels)
        requested = gauge("pals_gpu_power_limit_requested_watts", "Power limit the daemon requested")
        enforced = gauge("pals_gpu_power_limit_enforced_watts", "Power limit the driver enforces")
        decided = gauge("pals_gpu_power_limit_decided_watts", "Power limit the controller chose (advise: not applied)")
        low = gauge("pals_gpu_power_limit_min_watts", "Smallest power limit the driver accepts")
        high = gauge("pals_gpu_power_limit_max_watts", "Largest power limit the driver accepts")
        clock = gauge("pals_gpu_sm_clock_hertz", "SM clock")
        capped = gauge("pals_gpu_power_capped", "1 when the software power cap holds the clocks down")
        controlled = gauge("pals_gpu_controlled", "0 once a fatal error stopped the daemon controlling the GPU")
        failed = gauge("pals_gpu_failed", "1 once a fatal NVML error (lost, reset, permission, unsupported, hung)")
        drift = gauge("pals_gpu_power_limit_drift", "1 while someone else caps the GPU below the daemon's request")
        external = gauge("pals_gpu_power_limit_external_watts", "The cap someone else set (only while one is known)")
        clock_control = gauge("pals_gpu_clock_control", "1 while the daemon may lock the SM clock (0: cap-only)")
        clock_external = gauge("pals_gpu_clock_external", "1 once someone else's clock setting was detected")
        lock_requested = gauge("pals_gpu_clock_locked_requested_hertz", "SM clock ceiling the daemon locked (if any)")
        lock_decided = gauge("pals_gpu_clock_locked_decided_hertz", "SM clock ceiling the controller chose")
        for g in s.gpus:
            key = [str(g.index), g.uuid]
            power.add_metric(key, g.power_w)
            if g.HasField("power_instant_w"):
                instant.add_metric(key, g.power_instant_w)
            energy.add_metric(key, g.energy_j)
            requested.add_metric(key, g.requested_limit_w)
            enforced.add_metric(key, g.enforced_limit_w)
            decided.add_metric(key, g.decided_limit_w)
            low.add_metric(key, g.min_limit_w)
            high.add_metric(key, g.max_limit_w)
            clock.add_metric(key, g.sm_clock_mhz * HZ_PER_MHZ)
            capped.add_metric(key, float(g.power_capped))
            controlled.add_metric(key, float(g.controlled))
            failed.add_metric(key, float(bool(g.fault)))
            drift.add_metric(key, float(g.limit_drift))
            if g.HasField("external_limit_w"):
                external.add_metric(key, g.external_limit_w)
            clock_control.add_metric(key, float(g.clock_control))
            clock_external.add_metric(key, float(g.clock_external))
            if g.HasField("locked_clock_requested_mhz"):
                lock_requested.add_metric(key, g.locked_clock_requested_mhz * HZ_PER_MHZ)
            if g.HasField("locked_clock_decided_mhz"):
                lock_decided.add_metric(key, g.locked_clock_decided_mhz * HZ_PER_MHZ)
        yield from (
            power,
            instant,
            energy,
            requested,
            enforced,
            decided,
            low,
            high,
            clock,
            capped,
            controlled,
            failed,
            drift,
            external,
            clock_control,
            clock_external,
            lock_requested,
            lock_decided,
        )

    def _node_metrics(self, s: pals_pb2.NodeStatus) -> Iterator[Metric]:
        yield GaugeMetricFamily("pals_node_power_watts", "Sum of the GPUs' averaged power", value=s.budget.node_power_w)
        # Always exported: pals_node_power_budget_watts is absent without a budget, and an absent series cannot
        # tell "no budget" from "not scraped".
        yield GaugeMetricFamily(
            "pals_node_power_budget_set",
            "1 while a node GPU power budget is in force, 0 without one",
            value=float(s.budget.HasField("effective_budget_w")),
        )
        if s.budget.HasField("effective_budget_w"):
            yield GaugeMetricFamily(
                "pals_node_power_budget_watts",
                "Node GPU power budget in force",
                value=s.budget.effective_budget_w,
            )
        yield GaugeMetricFamily(
            "pals_node_power_limit_sum_watts",
            "Sum of enforced GPU power limits",
            value=s.budget.sum_enforced_limits_w,
        )
        yield CounterMetricFamily("pals_controller_ticks", "Control ticks run", value=s.controller.ticks)
        yield CounterMetricFamily(
            "pals_controller_limit_changes",
            "Ticks that changed a power or batch limit",
            value=s.controller.decisions_changed,
        )

    def _engine_metrics(self, s: pals_pb2.NodeStatus) -> Iterator[Metric]:
        # model: what the engine serves ("" for an engine known only by its targets), to group and join by.
        labels = ["engine", "model"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        throughput = gauge("pals_engine_throughput_tokens_per_second", "Output tokens per second, last window")
        efficiency = gauge("pals_engine_tokens_per_joule", "Output tokens per joule of the engine's GPUs, recent ticks")
        seqs = gauge("pals_engine_max_num_seqs_limit", "Batch limit: max running sequences")
        tokens = gauge("pals_engine_max_num_batched_tokens_limit", "Batch limit: max scheduled tokens per step")
        target = gauge("pals_engine_target_tokens_per_second", "Throughput target")
        ttft = gauge("pals_engine_target_ttft_seconds", "Time-to-first-token SLO")
        tpot = gauge("pals_engine_target_tpot_seconds", "Time-per-output-token SLO")
        connected = gauge("pals_engine_connected", "1 while the engine's session is open")
        has_profile = gauge(
            "pals_engine_has_profile",
            "0 while a connected engine's model has no profile for these GPUs: its GPUs get their default limit "
            "or an equal share of the budget, and it keeps its own batch limit",
        )
        violations = CounterMetricFamily(
            "pals_engine_qos_violation_windows", "Control windows with throughput below target", labels=labels
        )
        windows = CounterMetricFamily("pals_engine_windows", "Control windows with telemetry", labels=labels)
        for e in s.engines:
            key = [e.engine_id, e.model]
            throughput.add_metric(key, e.throughput_tokens_per_s)
            efficiency.add_metric(key, e.tokens_per_joule)
            connected.add_metric(key, float(e.connected))
            if e.connected:
                has_profile.add_metric(key, float(e.has_profile))
                seqs.add_metric(key, e.max_num_seqs_limit)
                tokens.add_metric(key, e.max_num_batched_tokens_limit)
            if e.targets.HasField("tokens_per_s"):
                target.add_metric(key, e.targets.tokens_per_s)
            if e.targets.HasField("ttft_ms"):
                ttft.add_metric(key, e.targets.ttft_ms / MS_PER_S)
            if e.targets.HasField("tpot_ms"):
                tpot.add_metric(key, e.targets.tpot_ms / MS_PER_S)
            windows.add_metric(key, e.windows)
            violations.add_metric(key, e.qos_violation_windows)
        yield from (throughput, efficiency, seqs, tokens, target, ttft, tpot, connected, has_profile)
        yield from (violations, windows)


class Metrics:
    """The daemon's registry: the snapshot collector plus the tick histogram."""

    def __init__(self, snapshot: Callable[[], pals_pb2.NodeStatus], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.registry.register(StatusCollector(snapshot))
        self.tick_duration = Histogram(
            "pals_controller_tick_duration_seconds",
            "Wall time of one control tick",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )
        self.exposition = CachedExposition(self.registry)
        self._server = None

    def observe_tick(self, duration_s: float) -> None:
        """Record one tick's duration (a new snapshot: the next scrape renders afresh)."""
        self.tick_duration.observe(duration_s)
        self.exposition.invalidate()

    def serve(self, address: str, port: int) -> int:
        """Start the HTTP endpoint (bounded: server/metrics_http.py); returns the bound port (port 0 in tests)."""
        try:
            server = serve_metrics(address, port, self.exposition)
        except OSError as exc:  # name the address: "Address already in use" alone does not say which
            raise OSError(exc.errno, f"metrics endpoint {address}:{port}: {exc.strerror or exc}") from exc
        self._server = server
        bound = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", address, bound)
        return bound

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
