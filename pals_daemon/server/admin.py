"""PowerAdmin servicer: a thin adapter that validates requests and hands them to the daemon.

Reachable only through the admin socket (0600 root): that mode, not anything in the request, is the
authorization (gRPC gives handlers no peer credentials over Unix sockets).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.control.types import EngineTargets
from pals_daemon.errors import InvalidRequestError
from pals_daemon.server import validate
from pals_daemon.server.daemon import Daemon
from pals_daemon.server.profiler import ProfileConflictError, ProfileNotFoundError

log = logging.getLogger(__name__)
# Trailing-metadata key of a warning attached to a reply that succeeded (palsctl prints it).
WARNING_METADATA_KEY = "pals-warning"
# Watch snapshots no faster than this (wall seconds), whatever the client asks.
MIN_WATCH_INTERVAL_S = 0.05


def _optional(message: pals_pb2.EngineTargets, name: str) -> float | None:
    return getattr(message, name) if message.HasField(name) else None


class PowerAdminServicer(pals_pb2_grpc.PowerAdminServicer):
    """Node status, budget and targets."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def GetStatus(self, request, context):  # noqa: N802
        """The latest snapshot."""
        return self.daemon.status

    async def GetBudget(self, request, context):  # noqa: N802
        """The budget part of the status."""
        return self.daemon.budget_status()

    async def SetBudget(self, request: pals_pb2.SetBudgetRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        """Set or clear the budget; INVALID_ARGUMENT (and nothing changed) for a bad value."""
        try:
            if request.clear:
                if request.budget_w != 0:
                    raise InvalidRequestError("give either a budget or clear, not both")
                await self.daemon.set_budget(None, request.ramp_s)
            else:
                await self.daemon.set_budget(request.budget_w, request.ramp_s)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self.daemon.budget_status()

    async def SetEngineTargets(self, request: pals_pb2.SetEngineTargetsRequest, context):  # noqa: N802
        """Replace an engine's targets."""
        try:
            engine_id = validate.engine_id(request.engine_id)
            t = request.targets
            targets = validate.targets(_optional(t, "tokens_per_s"), _optional(t, "ttft_ms"), _optional(t, "tpot_ms"))
            self.daemon.set_targets(engine_id, targets)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # The snapshot too, so that a GetStatus right after this call (palsctl target get) shows the new targets.
        self.daemon.status = self.daemon.build_status()
        reply = self.daemon.engine_status(engine_id)
        if not reply.connected and targets != EngineTargets():
            # Accepted (an engine may connect later), but a typo in the id would otherwise go unnoticed.
            warning = f"engine {engine_id!r} is not connected: the targets are kept and apply when it connects"
            log.warning("%s", warning)
            context.set_trailing_metadata(((WARNING_METADATA_KEY, warning),))
        return reply

    async def StartProfile(self, request: pals_pb2.StartProfileRequest, context):  # noqa: N802
        """Start an online profile sweep of an engine (see pals_daemon/server/profiler.py)."""
        try:
            job = self.daemon.profiler.start(request)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ProfileConflictError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        self.daemon.wake()
        return self.daemon.profiler.job_proto(job)

    async def GetProfile(self, request: pals_pb2.GetProfileRequest, context):  # noqa: N802
        """The engine's running or last profile job."""
        try:
            job = self.daemon.profiler.get(request.engine_id)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ProfileNotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return self.daemon.profiler.job_proto(job)

    async def CancelProfile(self, request: pals_pb2.CancelProfileRequest, context):  # noqa: N802
        """Cancel the engine's running profile job; the controller takes over at once."""
        try:
            job = self.daemon.profiler.cancel(request.engine_id)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ProfileNotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        self.daemon.wake()
        return self.daemon.profiler.job_proto(job)

    async def WatchStatus(  # noqa: N802
        self, request: pals_pb2.WatchStatusRequest, context
    ) -> AsyncIterator[pals_pb2.NodeStatus]:
        """A snapshot after every tick (or every ``interval_s``), until the client goes away."""
        try:
            interval = validate.finite(request.interval_s, "interval_s", 0.0, 3600.0)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        yield self.daemon.status
        while True:
            if interval > 0:
                await asyncio.sleep(max(interval, MIN_WATCH_INTERVAL_S))
                yield self.daemon.status
            else:
                yield await self.daemon.wait_status(timeout_s=max(self.daemon.config.period_s * 4, 1.0))
