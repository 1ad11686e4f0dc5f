"""Saving the daemon state without ever holding a GPU change hostage to the disk.

The change is applied first; saving follows. A save that fails (state filesystem full or read-only, an I/O
error) is not an error of the request: a budget cut must take effect on the GPUs whatever the disk says.
The failure is logged (once when it starts, once when it ends), shown in the status
(ControllerStatus.state_save_error) and the metrics (pals_state_save_failing, pals_state_save_failures),
and the latest state is saved again at every tick until a save succeeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pals_daemon.state import DaemonState, StateStore

log = logging.getLogger(__name__)


class StateWriter:
    """Saves states through a StateStore; records and retries failures instead of raising them."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        # Why the last save failed ("" while saves succeed), since when (Unix s), failed attempts in total.
        self.error = ""
        self.failing_since_unix_s = 0.0
        self.failures = 0

    def save(self, state: DaemonState) -> bool:
        """Save ``state``; False (recorded, logged, retried by retry()) when the filesystem refused it."""
        try:
            self.store.save(state)
        except OSError as exc:
            self.failures += 1
            reason = f"{exc.strerror or exc} ({type(exc).__name__}, errno {exc.errno})"
            if not self.error:
                self.failing_since_unix_s = time.time()
                log.error(
                    "cannot save the state to %s: %s; the change is in force on the GPUs but a restart would "
                    "not know it: retrying at every tick",
                    self.store.path,
                    reason,
                )
            self.error = reason
            return False
        if self.error:
            failing_s = time.time() - self.failing_since_unix_s
            log.warning("state saved to %s again after %.0f s of failed saves", self.store.path, failing_s)
            self.error = ""
            self.failing_since_unix_s = 0.0
        return True

    def retry(self, state: DaemonState) -> None:
        """Save the latest state if the last save failed (called at every tick)."""
        if self.error:
            self.save(state)


class StateWriterCollector(Collector):
    """pals_state_save_failing (1 while the latest state is not on disk) and the failed-save counter."""

    def __init__(self, writer: StateWriter) -> None:
        self.writer = writer

    def collect(self) -> Iterator[Metric]:
        """Read the writer at scrape time."""
        yield GaugeMetricFamily(
            "pals_state_save_failing",
            "1 while the latest state (budget, targets, original limits) could not be saved; retried every tick",
            value=float(bool(self.writer.error)),
        )
        yield CounterMetricFamily(
            "pals_state_save_failures", "Failed attempts to save the state file", value=self.writer.failures
        )
