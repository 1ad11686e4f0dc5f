"""Operator notices: what the daemon would otherwise do silently, logged once each.

Hooked on the tick (Daemon.on_tick), so it reads the decisions as they are made and changes nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pals_daemon.server.daemon import Daemon

log = logging.getLogger(__name__)

# Engine ids come from clients: remember at most this many (then start over: a repeat notice, not a leak).
MAX_REMEMBERED = 1024
# What the controller does with an engine it has no profile for (pals_daemon/control/core.py, unprofiled).
UNPROFILED_BEHAVIOUR = (
    "its GPUs get their default limit (with a budget: an equal share of it) and it keeps its own batch limit"
)


class OperatorNotices:
    """Logs once per engine and model that a connected engine's model has no profile for this node's GPUs."""

    def __init__(self) -> None:
        self._unprofiled: set[tuple[str, str]] = set()

    def on_tick(self, daemon: Daemon) -> None:
        """Check the tick's decisions (status and metrics flag the same engines: has_profile)."""
        decision = daemon.last_decision
        if decision is None:
            return
        for engine_id, decided in decision.engines.items():
            session = daemon.engines.get(engine_id)
            if decided.has_profile or session is None:
                continue
            key = (engine_id, session.registration.model)
            if key in self._unprofiled:
                continue
            if len(self._unprofiled) >= MAX_REMEMBERED:
                self._unprofiled.clear()
            self._unprofiled.add(key)
            log.warning(
                "engine %r: no profile for model %r on %s GPUs; %s (`palsctl profile %s ...` measures one)",
                engine_id,
                key[1],
                daemon.controller.config.gpu_kind or "these",
                UNPROFILED_BEHAVIOUR,
                engine_id,
            )
