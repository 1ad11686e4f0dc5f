"""Runs a Daemon as a service: gRPC on two Unix sockets, metrics, sd_notify, signals, orderly shutdown.

Order at start (systemd's READY=1 only at the end): GPUs opened and state reconciled, sockets claimed and
bound with their modes set, metrics served, first tick. Order at stop: stop accepting, finish the tick,
restore every GPU's original limit, remove the sockets.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from pals_daemon.api import pals_pb2_grpc
from pals_daemon.clock import Clock
from pals_daemon.config import DaemonConfig
from pals_daemon.control.config import ControllerConfig
from pals_daemon.errors import ConfigError
from pals_daemon.gpu.backend import GpuBackend
from pals_daemon.metrics import Metrics
from pals_daemon.model.profile import ProfileRegistry
from pals_daemon.server.admin import PowerAdminServicer
from pals_daemon.server.daemon import Daemon
from pals_daemon.server.engine_link import EngineLinkServicer
from pals_daemon.server.limits import (
    MAX_ADMIN_CONNECTIONS,
    MAX_ADMIN_RPCS,
    MAX_ENGINE_CONNECTIONS,
    MAX_ENGINE_RPCS,
    CoalescedWake,
    EngineLimits,
    HeapTrimmer,
    ReportByteBudget,
    grpc_server_options,
)
from pals_daemon.server.notices import OperatorNotices
from pals_daemon.server.persist import StateWriterCollector
from pals_daemon.server.sdnotify import SystemdNotifier, watchdog_interval_s
from pals_daemon.server.signals import ShutdownSignals
from pals_daemon.server.sockets import SocketPath

log = logging.getLogger(__name__)
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

ADMIN_SOCKET_MODE = 0o600  # root only: PowerAdmin changes GPU settings
ENGINE_SOCKET_MODE = 0o660  # root and the engine group: telemetry in, batch limits out
# The directories enforce the same policy a second time (a socket's mode alone is one chmod from open):
# admin/ is root only; the engine directory is searchable by the engine group, so engines can reach
# engine.sock, and closed to everyone else (0750 rather than 0755: other users need not even see the names).
ADMIN_DIR_MODE = 0o700
ENGINE_DIR_MODE = 0o750
STOP_GRACE_S = 1.0


class Runner:
    """Wires a Daemon to its sockets, metrics endpoint and systemd."""

    def __init__(
        self,
        config: DaemonConfig,
        backend: GpuBackend,
        profiles: ProfileRegistry,
        clock: Clock,
        controller_config: ControllerConfig | None = None,
    ) -> None:
        if config.engine_socket_group:
            try:
                grp.getgrnam(config.engine_socket_group)
            except KeyError as exc:
                raise ConfigError(
                    [
                        f"engine_socket_group: group {config.engine_socket_group!r} does not exist "
                        '(create it, or set engine_socket_group = "")'
                    ]
                ) from exc
        self.config = config
        self.daemon = Daemon(config, backend, profiles, clock, controller_config)
        self.metrics = Metrics(lambda: self.daemon.status)
        self.daemon.on_tick.append(lambda d: self.metrics.observe_tick(d.last_tick_duration_s))
        self.daemon.on_tick.append(OperatorNotices().on_tick)
        self.metrics.registry.register(StateWriterCollector(self.daemon.persist))
        self.notifier = SystemdNotifier.from_environment()
        self.metrics_port: int | None = None
        self._admin_path = SocketPath(config.admin_socket_path, ADMIN_DIR_MODE)
        self._engine_path = SocketPath(config.engine_socket_path, ENGINE_DIR_MODE, config.engine_socket_group)
        self._servers: list[grpc.aio.Server] = []
        self._health: list[HealthServicer] = []
        # Bounds of the engine socket (tests may replace them before start()).
        self.engine_limits = EngineLimits()
        self.report_budget = ReportByteBudget(self.engine_limits.report_bytes_per_s * config.period_s)
        self.daemon.on_tick.append(lambda d: self.report_budget.refill())
        self.engine_link: EngineLinkServicer | None = None
        self.heap_trimmer = HeapTrimmer(lambda: self.engine_link.aborts if self.engine_link else 0)
        self.daemon.on_tick.append(self.heap_trimmer)
        self.signals = ShutdownSignals(self.daemon.request_stop)
        self.session_wake: CoalescedWake | None = None

    async def start(self) -> None:
        """Bring everything up; READY=1 is sent last."""
        os.umask(0o077)  # sockets and files are private until given their mode explicitly
        # From the first moment: a SIGTERM during start-up (the sockets already answer, a tick may already have
        # written limits) must still end in run()'s orderly stop that restores the originals.
        self._install_signal_handlers()
        await self.daemon.start()
        try:
            await self._start_grpc()
            if self.config.metrics_port:
                self.metrics_port = self.metrics.serve(self.config.metrics_address, self.config.metrics_port)
            await self.daemon.tick()
        except BaseException:
            await self.stop()
            raise
        if self.notifier:
            self.notifier.ready()
            self.notifier.status(f"controlling {len(self.daemon.gpus)} GPU(s), mode {self.config.mode}")
        log.info(
            "pals-daemon ready: %d GPU(s), backend %s, mode %s, admin %s, engines %s",
            len(self.daemon.gpus),
            self.daemon.backend.name,
            self.config.mode,
            self.config.admin_socket_path,
            self.config.engine_socket_path,
        )

    async def _start_grpc(self) -> None:
        # One server per socket, each with only its own service (and health): the engine socket's group can
        # never reach PowerAdmin, whatever it sends (tests/server/test_access.py).
        admin = grpc.aio.server(
            options=grpc_server_options(MAX_ADMIN_CONNECTIONS), maximum_concurrent_rpcs=MAX_ADMIN_RPCS
        )
        pals_pb2_grpc.add_PowerAdminServicer_to_server(PowerAdminServicer(self.daemon), admin)
        engine = grpc.aio.server(
            options=grpc_server_options(MAX_ENGINE_CONNECTIONS), maximum_concurrent_rpcs=MAX_ENGINE_RPCS
        )
        # on_change wakes the control loop: a session that ends lapses its directives and its GPUs get the
        # controller's idle allocation soon, not at the end of the period (coalesced: see limits.CoalescedWake).
        self.report_budget.bytes_per_tick = self.engine_limits.report_bytes_per_s * self.config.period_s
        self.session_wake = CoalescedWake(
            self.daemon.wake,
            self.engine_limits.wake_min_interval_periods * self.config.period_s,
            self.daemon.clock,
            self.engine_limits.wake_burst,
        )
        link = EngineLinkServicer(
            self.daemon.engines,
            self.daemon.resolve_gpus,
            report_interval_s=self.config.period_s / 2,
            on_change=self.session_wake,
            now=self.daemon.clock.now,
            limits=self.engine_limits,
            budget=self.report_budget,
        )
        self.engine_link = link
        pals_pb2_grpc.add_EngineLinkServicer_to_server(link, engine)
        for server, path, service in (
            (admin, self._admin_path, "pals.v1.PowerAdmin"),
            (engine, self._engine_path, "pals.v1.EngineLink"),
        ):
            health = HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health, server)
            await health.set("", health_pb2.HealthCheckResponse.SERVING)
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
            self._health.append(health)
            # Standard server reflection (grpcurl, grpc_cli): lists only this socket's services.
            reflection.enable_server_reflection((service, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
            path.claim()
            server.add_insecure_port(path.grpc_address)
            self._servers.append(server)
            await server.start()
        self._admin_path.restrict(ADMIN_SOCKET_MODE)
        self._engine_path.restrict(ENGINE_SOCKET_MODE)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may (tests run the runner in a thread); run() is then not used
        self.signals.install(asyncio.get_running_loop())

    async def run(self) -> None:
        """Run the control loop until SIGTERM/SIGINT or request_stop(), then shut down."""
        loop = asyncio.get_running_loop()
        self._install_signal_handlers()
        interval_s = watchdog_interval_s()
        if self.notifier and interval_s is not None and self.config.period_s > interval_s:
            # The watchdog is fed once per tick: a period this long lets systemd kill a healthy daemon.
            log.warning(
                "period_s %g s exceeds half of WatchdogSec (%g s): raise WatchdogSec", self.config.period_s, interval_s
            )
        try:
            await self.daemon.run(watchdog=self.notifier.watchdog if self.notifier else None)
        finally:
            # The handlers stay through stop(): a second SIGTERM/SIGINT during the restore is logged, not fatal.
            try:
                await self.stop()
            finally:
                self.signals.remove(loop)

    async def stop(self) -> None:
        """Stop serving, restore GPU limits, remove sockets (idempotent)."""
        if self.notifier:
            self.notifier.stopping()
        for health in self._health:
            await health.enter_graceful_shutdown()
        await asyncio.gather(*(s.stop(STOP_GRACE_S) for s in self._servers))
        if self.session_wake is not None:
            self.session_wake.cancel()
        self._servers.clear()
        self._health.clear()
        await self.daemon.close()
        self._admin_path.release()
        self._engine_path.release()
        self.metrics.close()
