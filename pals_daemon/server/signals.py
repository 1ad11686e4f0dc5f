"""What each signal does to the daemon (README "Limits and hardening"): none may leave a GPU capped.

- SIGTERM, SIGINT: orderly stop (finish the tick, restore every GPU's original limit, remove the sockets).
  A second one while stopping is logged and ignored: the restore always runs to its end (systemd's
  TimeoutStopSec, then SIGKILL and ExecStopPost's `pals-daemon restore`, remain the last resort).
- SIGHUP: ignored, with a log line. There is no reload: the configuration is read at start only
  (`systemctl restart pals-daemon` applies a new one; the budget and targets change live over PowerAdmin).
- SIGUSR1, SIGUSR2: ignored, with a log line (their default action would kill the daemon at once, leaving
  the GPUs capped and the sockets stale).
SIGPIPE is already ignored by Python. SIGKILL cannot be caught: ExecStopPost restores the limits then.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def ignore_early() -> None:
    """Ignore the no-op signals from process start, before the event loop exists (their default kills)."""
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class ShutdownSignals:
    """Installs the daemon's signal handlers on an event loop; counts what arrived (for logs and tests)."""

    def __init__(self, request_stop: Callable[[], None]) -> None:
        self.request_stop = request_stop
        self.stop_requests = 0
        self.ignored: dict[str, int] = {}
        self._installed = False

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take over the stop and no-op signals (idempotent)."""
        if self._installed:
            return
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._stop, sig)
        for sig in IGNORED_SIGNALS:
            loop.add_signal_handler(sig, self._ignore, sig)
        self._installed = True

    def remove(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the signals back: stop signals to their defaults, the no-op ones stay ignored."""
        if not self._installed:
            return
        for sig in (*STOP_SIGNALS, *IGNORED_SIGNALS):
            loop.remove_signal_handler(sig)
        ignore_early()
        self._installed = False

    def _stop(self, sig: signal.Signals) -> None:
        self.stop_requests += 1
        if self.stop_requests == 1:
            log.info("%s: stopping (restoring the GPUs' original limits first)", sig.name)
        else:
            log.warning("%s again while stopping: ignored, the GPUs' limits are being restored", sig.name)
        self.request_stop()

    def _ignore(self, sig: signal.Signals) -> None:
        self.ignored[sig.name] = self.ignored.get(sig.name, 0) + 1
        what = "no reload: the configuration is read at start only" if sig == signal.SIGHUP else "no action"
        log.warning("%s received and ignored (%s)", sig.name, what)
