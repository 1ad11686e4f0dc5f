"""The daemon: GPUs, engine sessions, the control tick, persisted state, and every exit path restoring limits.

Layering (GEOPM style): the gRPC servicers are thin facades that call the methods here; the decisions come
from the pure controller core; only the GpuWorkers touch a backend.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pals_daemon.api import pals_pb2
from pals_daemon.clock import Clock
from pals_daemon.config import DaemonConfig
from pals_daemon.control.budget import BudgetSchedule
from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.core import Controller
from pals_daemon.control.qos import QosWindows
from pals_daemon.control.types import (
    ControllerInput,
    Decision,
    EngineObservation,
    EngineTargets,
    GpuObservation,
)
from pals_daemon.errors import GpuError, GpuFatalError, InvalidRequestError
from pals_daemon.gpu.backend import GpuBackend, GpuDevice, GpuIdentity, GpuReading, PowerConstraints
from pals_daemon.gpu.worker import GpuWorker
from pals_daemon.model.profile import ProfileRegistry
from pals_daemon.server import validate
from pals_daemon.server.engines import EngineRegistry
from pals_daemon.server.profiler import Profiler
from pals_daemon.state import DaemonState, OriginalLimit, StateStore, current_boot_id, origin_notes
from pals_daemon.units import mj_to_j, mw_to_w, w_to_mw

log = logging.getLogger(__name__)

# Ticks over which an engine's tokens/J is measured (10 s at the default 0.5 s period).
EFFICIENCY_WINDOW_TICKS = 20
# An enforced limit this far below the daemon's request is someone else's cap, not rounding (chosen value:
# NVML limits are whole milliwatts; drivers enforce the requested value exactly when nothing else caps).
DRIFT_TOLERANCE_MW = 1000
# How long an external cap is kept as the GPU's ceiling without being seen again. The daemon then lets the
# controller ask above it once: if the cap is still there the enforced limit shows it again (and the
# ceiling returns), if it was lifted the GPU gets the watts back. Chosen value: rare enough not to fight
# the other tool, short enough not to strand watts for long after a cap is lifted.
EXTERNAL_CAP_RECHECK_S = 30.0


@dataclass
class GpuSlot:
    """The daemon's view of one GPU."""

    worker: GpuWorker
    identity: GpuIdentity
    constraints: PowerConstraints
    reading: GpuReading
    # What the daemon last requested (the driver's requested limit until the first write).
    requested_limit_mw: int
    decided_limit_w: float = 0.0
    controlled: bool = True
    fault: str = ""
    # Energy counter at the previous tick, for per-tick energy deltas.
    last_energy_mj: int = 0
    tick_energy_j: float = 0.0
    # False while no read ever succeeded (the GPU failed at start-up): the reading is a placeholder.
    has_reading: bool = True
    # A cap someone else set (the enforced limit was seen below the daemon's request), and when it was
    # last seen (daemon clock); None when none is known. The controller keeps the GPU at or under it.
    external_cap_mw: int | None = None
    external_cap_seen_s: float = 0.0
    # A management limit someone else wrote over the daemon's (logged once per value).
    foreign_limit_mw: int | None = None

    def accounted_limit_mw(self) -> int:
        """What this GPU may draw when the daemon does not control it: its enforced limit, or its maximum
        when it was never read."""
        return self.reading.enforced_limit_mw if self.has_reading else self.constraints.max_limit_mw

    def ceiling_mw(self, now_s: float) -> int:
        """The highest limit worth asking for: the maximum, or a recently seen external cap below it."""
        c = self.constraints
        if self.external_cap_mw is not None and now_s - self.external_cap_seen_s < EXTERNAL_CAP_RECHECK_S:
            return max(c.min_limit_mw, min(c.max_limit_mw, self.external_cap_mw))
        return c.max_limit_mw


@dataclass
class EngineStats:
    """Per-engine figures kept across ticks (survive reconnects under the same id)."""

    qos: QosWindows = dataclasses.field(default_factory=QosWindows)
    throughput_tokens_per_s: float = 0.0
    recent: collections.deque[tuple[int, float]] | None = None

    def tokens_per_joule(self) -> float:
        """Decode tokens per joule of the engine's GPUs over the recent ticks."""
        if not self.recent:
            return 0.0
        tokens = sum(t for t, _ in self.recent)
        joules = sum(e for _, e in self.recent)
        return tokens / joules if joules > 0 else 0.0


class Daemon:
    """Owns GPUs, sessions, budget, targets and the control loop."""

    def __init__(
        self,
        config: DaemonConfig,
        backend: GpuBackend,
        profiles: ProfileRegistry,
        clock: Clock,
        controller_config: ControllerConfig | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.clock = clock
        self.controller = Controller(profiles, controller_config or config.controller_config())
        self.store = StateStore(config.state_dir)
        self.state = DaemonState()
        # Stamped on each original-limit record (set in start()).
        self.boot_id: str | None = None
        self.driver_version: str | None = None
        self.engines = EngineRegistry()
        self.gpus: list[GpuSlot] = []
        self.budget = BudgetSchedule()
        self.engine_stats: dict[str, EngineStats] = {}
        self.last_decision: Decision | None = None
        self.ticks = 0
        self.decisions_changed = 0
        self.last_tick_duration_s = 0.0
        self.last_tick_s = 0.0
        self.last_tick_started_unix_s = 0.0
        self.status: pals_pb2.NodeStatus = pals_pb2.NodeStatus()
        self._status_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tick_lock = asyncio.Lock()
        # Hooks for the metrics exporter and sd_notify (set by the runner).
        self.on_tick: list[Callable[[Daemon], None]] = []
        # Online profiling jobs: while one runs, its engine's caps and batch come from it, not the controller.
        self.profiler = Profiler(self)

    # ------------------------------------------------------------------ start / stop

    @property
    def enforcing(self) -> bool:
        """True when decisions are applied (enforce mode); False in advise mode."""
        return self.config.mode == "enforce"

    async def start(self) -> None:
        """Open the GPUs, load and reconcile state (originals recorded before any write), first snapshot."""
        self.state = self.store.load()
        devices: Sequence[GpuDevice] = self.backend.open()
        wanted = set(self.config.gpus)
        first_error: GpuError | None = None
        for device in devices:
            if wanted and device.identity.index not in wanted:
                continue
            worker = GpuWorker(device, self.config.gpu_timeout_s)
            constraints: PowerConstraints | None = None
            try:
                constraints = await worker.constraints()
                reading = await worker.read()
            except GpuError as exc:
                # Dropped and reported, not fatal: the other GPUs still need their budget enforced.
                log.error("GPU %d failed at start-up and is not controlled: %s", device.identity.index, exc)
                first_error = first_error or exc
                self.gpus.append(_failed_slot(worker, device.identity, exc, constraints))
                continue
            self.gpus.append(
                GpuSlot(
                    worker,
                    device.identity,
                    constraints,
                    reading,
                    reading.requested_limit_mw,
                    last_energy_mj=reading.energy_mj,
                )
            )
        missing = wanted - {g.identity.index for g in self.gpus}
        if missing:
            raise InvalidRequestError(f"configured GPU indices {sorted(missing)} do not exist")
        if first_error is not None and not any(g.controlled for g in self.gpus):
            for g in self.gpus:
                g.worker.close()
            self.gpus.clear()
            self.backend.close()
            raise first_error
        if self.controller.config.gpu_kind is None and self.gpus:
            # Only profiles measured on this node's kind of GPU apply (an H100 profile would mislead on A100s).
            kind = self.gpus[0].identity.name
            self.controller.config = dataclasses.replace(self.controller.config, gpu_kind=kind)
        self.boot_id = current_boot_id()
        self.driver_version = self._read_driver_version()
        if self.enforcing:
            # Records left by a run that did not stop cleanly: put those GPUs back before control starts.
            await self._restore_recorded_limits()
            for g in (g for g in self.gpus if g.has_reading):
                # First one wins: a record left by a crashed run keeps the limit found before that run.
                self.state = self.state.with_original(g.identity.uuid, self._original_of(g))
        elif self.state.original_limits:
            log.warning(
                "advise mode: %d GPU(s) still have limits recorded by an earlier enforcing run; "
                "run 'pals-daemon restore' to put them back",
                len(self.state.original_limits),
            )
        budget = self.state.budget_w if self.state.budget_w is not None else self.config.budget_w
        if budget is not None and budget < self.min_budget_w():
            log.error(
                "saved budget %.0f W is below the node minimum %.0f W; using the minimum",
                budget,
                self.min_budget_w(),
            )
            budget = self.min_budget_w()
        self.budget = BudgetSchedule(target_w=budget)
        self.state = self.state.with_budget(budget)
        self.store.save(self.state)
        self.last_tick_s = self.clock.now()
        self.status = self.build_status()

    def _read_driver_version(self) -> str | None:
        """The driver version for new records; None (unknown) when the backend cannot say."""
        try:
            return self.backend.driver_version()
        except GpuError as exc:
            log.warning("cannot read the driver version (records will say 'unknown'): %s", exc)
            return None

    def _original_of(self, g: GpuSlot) -> OriginalLimit:
        """A record of ``g``'s limit now, as its original (call before the daemon's first write to it)."""
        return OriginalLimit(g.identity.index, g.requested_limit_mw, self.boot_id, self.driver_version)

    async def _restore_recorded_limits(self) -> None:
        """Start-up: write each managed GPU back to a recorded original left by an earlier run; keep the records.

        A record is applied only to the GPU with its UUID (from an earlier boot too: the same board); one whose
        GPU is not managed here is kept for 'pals-daemon restore' and never applied to another GPU. The records
        stay: this run writes again, and they hold the limits found before any run touched the GPUs.
        """
        by_uuid = {g.identity.uuid: g for g in self.gpus}
        for uuid, original in sorted(self.state.original_limits.items(), key=lambda kv: kv[1].gpu_index):
            g = by_uuid.get(uuid)
            if g is None:
                log.warning(
                    "original limit %d mW recorded for GPU %s (index %d then) by an earlier run: no such GPU is "
                    "managed here; record kept, not applied to any other GPU",
                    original.limit_mw,
                    uuid,
                    original.gpu_index,
                )
                continue
            notes = origin_notes(original, self.boot_id, self.driver_version)
            if notes:
                log.warning("GPU %d (%s): record %s; applied by UUID", g.identity.index, uuid, "; ".join(notes))
            if g.requested_limit_mw == original.limit_mw and g.reading.enforced_limit_mw == original.limit_mw:
                continue
            found_mw = g.requested_limit_mw
            try:
                enforced = await g.worker.set_power_limit_mw(original.limit_mw)
            except GpuError as exc:
                log.error(
                    "GPU %d: cannot restore its original limit %d mW left by an earlier run (record kept): %s",
                    g.identity.index,
                    original.limit_mw,
                    exc,
                )
                continue
            g.requested_limit_mw = original.limit_mw
            g.reading = _with_enforced(g.reading, enforced, original.limit_mw)
            log.warning(
                "GPU %d: found at %d mW after an earlier run did not stop cleanly; restored to its original %d mW "
                "(enforced %d mW) before control starts",
                g.identity.index,
                found_mw,
                original.limit_mw,
                enforced,
            )

    async def restore_all(self) -> list[str]:
        """Put every GPU back to its recorded original limit; returns the problems (empty when all restored)."""
        problems = []
        managed = {g.identity.uuid for g in self.gpus}
        for uuid in sorted(set(self.state.original_limits) - managed):
            log.warning("original limit of GPU %s is not restored by this daemon (not managed here); kept", uuid)
        for g in self.gpus:
            original = self.state.original_limits.get(g.identity.uuid)
            if original is None:
                continue
            try:
                if g.requested_limit_mw != original.limit_mw or g.reading.enforced_limit_mw != original.limit_mw:
                    await g.worker.set_power_limit_mw(original.limit_mw)
                g.requested_limit_mw = original.limit_mw
                self.state = self.state.without_original(g.identity.uuid)
            except GpuError as exc:
                problems.append(str(exc))
                log.error(
                    "could not restore GPU %d to %d mW (record kept for 'pals-daemon restore'): %s",
                    g.identity.index,
                    original.limit_mw,
                    exc,
                )
        self.store.save(self.state)
        return problems

    async def close(self) -> None:
        """Restore limits (enforce mode), stop the GPU workers and close the backend."""
        self.profiler.stop()
        if self.enforcing:
            await self.restore_all()
        for g in self.gpus:
            g.worker.close()
        self.backend.close()

    def wake(self) -> None:
        """Run the next tick now rather than at the end of the period."""
        self._wake.set()

    def request_stop(self) -> None:
        """Ask the control loop to finish its tick and return."""
        self._stop.set()
        self._wake.set()

    # ------------------------------------------------------------------ the control loop

    async def run(self, watchdog: Callable[[], None] | None = None) -> None:
        """Tick every period until request_stop(); a budget change wakes it at once."""
        while not self._stop.is_set():
            # Cleared before the tick: a wake during it (a GPU failed, new targets) runs the next one at once.
            self._wake.clear()
            await self.tick()
            if watchdog is not None:
                watchdog()
            if self._stop.is_set():
                break
            # Ticks start a period apart (a slow tick does not stretch the period), never closer than now.
            delay_s = max(0.0, self.last_tick_s + self.config.period_s - self.clock.now())
            sleeper = asyncio.ensure_future(self.clock.sleep(delay_s))
            waker = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            sleeper.cancel()
            waker.cancel()

    async def tick(self) -> Decision:
        """One control period: observe, decide, apply (enforce mode), publish."""
        async with self._tick_lock:
            started = time.perf_counter()
            self.last_tick_started_unix_s = time.time()
            now = self.clock.now()
            elapsed = max(now - self.last_tick_s, 1e-6)
            self.last_tick_s = now
            await self._read_gpus(now)
            observations = self._observe_engines(elapsed)
            inp = ControllerInput(
                now_s=now,
                budget_w=self.budget.effective_w(now),
                gpus=tuple(self._gpu_observation(g, now) for g in self.gpus),
                engines=observations,
                targets=dict(self.state.targets),
            )
            decision = self.profiler.override(self.controller.step(self.profiler.controller_input(inp)), inp)
            for g in self.gpus:
                g.decided_limit_w = decision.gpu_limits_w.get(g.identity.index, mw_to_w(g.requested_limit_mw))
            if self.enforcing:
                await self._apply_limits(decision, now)
                self._send_directives(decision)
            self._account(observations, decision)
            self.profiler.after_tick(now, observations)
            self.last_decision = decision
            self.ticks += 1
            self.decisions_changed += int(decision.changed)
            self.last_tick_duration_s = time.perf_counter() - started
            self.status = self.build_status()
            for hook in self.on_tick:
                hook(self)
            self._status_event.set()
            self._status_event = asyncio.Event()
            return decision

    async def _read_gpus(self, now_s: float) -> None:
        # Concurrent, one worker each: a hung GPU holds the tick up for at most gpu_timeout_s.
        results = await asyncio.gather(*(g.worker.read() for g in self.gpus), return_exceptions=True)
        for g, result in zip(self.gpus, results, strict=True):
            if isinstance(result, GpuReading):
                g.tick_energy_j = mj_to_j(max(0, result.energy_mj - g.last_energy_mj)) if g.has_reading else 0.0
                g.last_energy_mj = result.energy_mj
                g.reading = result
                g.has_reading = True
                if g.controlled:
                    self._check_drift(g, now_s)
            else:
                g.tick_energy_j = 0.0
                self._gpu_failed(g, result)

    def _gpu_failed(self, g: GpuSlot, exc: BaseException) -> None:
        # A call that timed out leaves the worker wedged: every later call is refused, so stop now.
        if isinstance(exc, GpuFatalError) or g.worker.wedged:
            if g.controlled:
                log.error(
                    "GPU %d no longer controlled (counted at %d mW in the budget): %s",
                    g.identity.index,
                    g.accounted_limit_mw(),
                    exc,
                )
                self._wake.set()  # re-plan the others around it at once, not a period later
            g.controlled = False
            g.fault = g.fault or str(exc)
        elif g.controlled:
            log.warning("GPU %d: %s (retrying next tick)", g.identity.index, exc)
        else:
            log.debug("GPU %d (not controlled): %s", g.identity.index, exc)

    def _check_drift(self, g: GpuSlot, now_s: float) -> None:
        """Notice a limit someone else set, from the latest reading; log once per new value.

        Two cases. Someone wrote the management limit itself (the value read back is not the daemon's): the
        daemon owns that setting while it runs, as the budget is a hard limit, so _apply_limits writes its
        own value back. The enforced limit is below the daemon's request (another tool's or an out-of-band
        cap): the daemon does not fight it; the GPU's ceiling becomes that cap, so the controller gives the
        watts it cannot draw to the other GPUs, and the request stays under the cap, so lifting the cap
        cannot push the node over budget.
        """
        r, index = g.reading, g.identity.index
        if not self.enforcing:
            g.requested_limit_mw = r.requested_limit_mw  # advise mode writes nothing: the driver's value stands
        if r.requested_limit_mw != g.requested_limit_mw:
            if g.foreign_limit_mw != r.requested_limit_mw:
                log.warning(
                    "GPU %d: power limit changed to %d mW by someone else (the daemon set %d mW); setting it back",
                    index,
                    r.requested_limit_mw,
                    g.requested_limit_mw,
                )
                g.foreign_limit_mw = r.requested_limit_mw
            return
        g.foreign_limit_mw = None
        if r.enforced_limit_mw < g.requested_limit_mw - DRIFT_TOLERANCE_MW:
            if g.external_cap_mw != r.enforced_limit_mw:
                log.warning(
                    "GPU %d: enforced limit %d mW is below the requested %d mW: capped by someone else; "
                    "the daemon keeps this GPU at or under that cap and budgets it there",
                    index,
                    r.enforced_limit_mw,
                    g.requested_limit_mw,
                )
            g.external_cap_mw = r.enforced_limit_mw
            g.external_cap_seen_s = now_s
        elif g.external_cap_mw is not None and g.requested_limit_mw > g.external_cap_mw + DRIFT_TOLERANCE_MW:
            log.info(
                "GPU %d: the external cap of %d mW is gone (enforced %d mW follows the request again)",
                index,
                g.external_cap_mw,
                r.enforced_limit_mw,
            )
            g.external_cap_mw = None

    def _gpu_observation(self, g: GpuSlot, now_s: float) -> GpuObservation:
        r, c = g.reading, g.constraints
        return GpuObservation(
            index=g.identity.index,
            uuid=g.identity.uuid,
            min_limit_w=mw_to_w(c.min_limit_mw),
            # A GPU capped by someone else cannot use more: the controller gives those watts to the others.
            max_limit_w=mw_to_w(g.ceiling_mw(now_s)),
            default_limit_w=mw_to_w(c.default_limit_mw),
            requested_limit_w=mw_to_w(g.requested_limit_mw),
            # The controller counts uncontrolled GPUs at this value.
            enforced_limit_w=mw_to_w(r.enforced_limit_mw if g.controlled else g.accounted_limit_mw()),
            power_avg_w=mw_to_w(r.power_avg_mw),
            power_instant_w=None if r.power_instant_mw is None else mw_to_w(r.power_instant_mw),
            energy_j=mj_to_j(r.energy_mj),
            sm_clock_mhz=r.sm_clock_mhz,
            power_capped=r.power_capped,
            controlled=g.controlled,
        )

    def _observe_engines(self, elapsed_s: float) -> tuple[EngineObservation, ...]:
        known = {g.identity.index for g in self.gpus}
        out = []
        for session in self.engines.sessions():
            obs = session.take_observation(elapsed_s)
            # Telemetry about GPUs this daemon does not manage cannot steer their limits.
            if set(obs.gpu_indices) <= known:
                out.append(obs)
        return tuple(out)

    async def _apply_limits(self, decision: Decision, now_s: float) -> None:
        """Set the decided limits: every decrease first, then the increases, so the sum stays in budget.

        An enforced limit below the request (someone else's cap) is no reason to write: only a new decision
        or a management limit overwritten by someone else is.
        """
        changes = []
        for g in self.gpus:
            if not g.controlled or g.identity.index not in decision.gpu_limits_w:
                continue
            target_mw = w_to_mw(decision.gpu_limits_w[g.identity.index])
            target_mw = min(max(target_mw, g.constraints.min_limit_mw), g.ceiling_mw(now_s))
            if target_mw != g.requested_limit_mw or g.reading.requested_limit_mw != g.requested_limit_mw:
                changes.append((g, target_mw))
        if not changes:
            return
        if any(g.identity.uuid not in self.state.original_limits for g, _ in changes):
            # Never write a GPU whose original limit is not on disk.
            for g, _ in changes:
                self.state = self.state.with_original(g.identity.uuid, self._original_of(g))
            self.store.save(self.state)
        decreases = [
            (g, mw)
            for g, mw in changes
            if mw < max(g.requested_limit_mw, g.reading.requested_limit_mw, g.reading.enforced_limit_mw)
        ]
        increases = [(g, mw) for g, mw in changes if (g, mw) not in decreases]
        for batch in (decreases, increases):
            results = await asyncio.gather(
                *(g.worker.set_power_limit_mw(mw) for g, mw in batch), return_exceptions=True
            )
            failed = False
            for (g, mw), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    self._gpu_failed(g, result)
                    failed = True
                    continue
                g.requested_limit_mw = mw
                g.reading = _with_enforced(g.reading, int(result), mw)
                self._check_drift(g, now_s)
            if failed and batch is decreases:
                # The increases were sized on these decreases: skip them, and lower the others now if the
                # GPU that refused leaves the node over budget (the next tick re-plans around it).
                if increases:
                    log.warning("a decrease failed: %d increase(s) deferred to the next tick", len(increases))
                await self._repair_budget(now_s)
                return

    async def _repair_budget(self, now_s: float) -> None:
        """Lower controlled GPUs (largest headroom first) until the limits in force fit the budget again."""
        budget_w = self.budget.effective_w(now_s)
        if budget_w is None:
            return
        excess_mw = sum(g.requested_limit_mw if g.controlled else g.accounted_limit_mw() for g in self.gpus)
        excess_mw -= w_to_mw(budget_w)
        cuts = []
        for g in sorted(
            (g for g in self.gpus if g.controlled),
            key=lambda g: g.requested_limit_mw - g.constraints.min_limit_mw,
            reverse=True,
        ):
            if excess_mw <= 0:
                break
            new_mw = max(g.constraints.min_limit_mw, g.requested_limit_mw - excess_mw)
            if new_mw < g.requested_limit_mw:
                cuts.append((g, new_mw))
                excess_mw -= g.requested_limit_mw - new_mw
        if not cuts:
            return
        log.warning("budget repair after a failed decrease: lowering %d GPU(s)", len(cuts))
        results = await asyncio.gather(*(g.worker.set_power_limit_mw(mw) for g, mw in cuts), return_exceptions=True)
        for (g, mw), result in zip(cuts, results, strict=True):
            if isinstance(result, BaseException):
                self._gpu_failed(g, result)
                continue
            g.requested_limit_mw = mw
            g.decided_limit_w = mw_to_w(mw)
            g.reading = _with_enforced(g.reading, int(result), mw)
            self._check_drift(g, now_s)

    def _send_directives(self, decision: Decision) -> None:
        # Relative, in the daemon's clock: the simulated engines run on the same (scaled) clock.
        ttl_ms = int(self.config.directive_ttl_s * 1000)
        for session in self.engines.sessions():
            d = decision.engines.get(session.registration.engine_id)
            if d is None:
                continue
            session.current_max_num_seqs = d.max_num_seqs
            session.current_max_num_batched_tokens = d.max_num_batched_tokens
            msg = pals_pb2.DaemonMessage(
                directive=pals_pb2.Directive(
                    sequence=self.ticks,
                    max_num_seqs=d.max_num_seqs,
                    max_num_batched_tokens=d.max_num_batched_tokens,
                    ttl_ms=max(1, ttl_ms),
                )
            )
            try:
                session.outbox.put_nowait(msg)
            except asyncio.QueueFull:
                log.warning("engine %s is not reading its directives", session.registration.engine_id)

    def _account(self, observations: Sequence[EngineObservation], decision: Decision) -> None:
        energy_by_gpu = {g.identity.index: g.tick_energy_j for g in self.gpus}
        for obs in observations:
            stats = self.engine_stats.setdefault(obs.engine_id, EngineStats())
            if stats.recent is None:
                stats.recent = collections.deque(maxlen=EFFICIENCY_WINDOW_TICKS)
            energy = sum(energy_by_gpu.get(i, 0.0) for i in obs.gpu_indices)
            stats.recent.append((obs.decode_tokens, energy))
            stats.throughput_tokens_per_s = obs.throughput_tokens_per_s
            target = self.state.targets.get(obs.engine_id, EngineTargets()).tokens_per_s
            stats.qos.add(obs.decode_tokens, obs.window_s, self.config.qos_window_s, target)

    # ------------------------------------------------------------------ admin operations

    def min_budget_w(self) -> float:
        """The smallest budget the node can honour: minimum limits, plus what uncontrolled GPUs enforce."""
        return sum(mw_to_w(g.constraints.min_limit_mw if g.controlled else g.accounted_limit_mw()) for g in self.gpus)

    def max_budget_w(self) -> float:
        """The sum of the GPUs' maximum limits (a budget at or above it never binds)."""
        return sum(mw_to_w(g.constraints.max_limit_mw) for g in self.gpus)

    async def set_budget(self, budget_w: float | None, ramp_s: float = 0.0) -> None:
        """Validate and set the node budget (None clears it); the next tick runs at once.

        InvalidRequestError (and nothing changed) for NaN, Inf, non-positive, below the node minimum, or a bad ramp.
        """
        ramp_s = validate.finite(ramp_s, "ramp_s", 0.0, validate.MAX_RAMP_S)
        if budget_w is not None:
            budget_w = validate.finite(budget_w, "budget_w", 0.0, 1e7)
            if budget_w < self.min_budget_w():
                raise InvalidRequestError(
                    f"budget {budget_w:g} W is below the sum of the GPUs' minimum limits ({self.min_budget_w():g} W)"
                )
        async with self._tick_lock:
            new_state = self.state.with_budget(budget_w)
            self.store.save(new_state)  # persisted before it takes effect: a crash cannot lose it
            self.state = new_state
            self.budget = self.budget.retarget(budget_w, ramp_s, self.clock.now(), self.max_budget_w())
        log.info("budget set to %s (ramp %g s)", "none" if budget_w is None else f"{budget_w:g} W", ramp_s)
        # Applied now, not at the next period: a lowered budget is a hard limit.
        await self.tick()

    def set_targets(self, engine_id: str, targets: EngineTargets) -> None:
        """Replace an engine's targets (the engine need not be connected yet); empty targets clear them.

        InvalidRequestError (nothing changed) for a new engine id once MAX_TARGET_ENGINES ids have targets: each
        is kept in the state file and the status, so their number must be bounded.
        """
        validate.engine_id(engine_id)
        adding = engine_id not in self.state.targets and targets != EngineTargets()
        if adding and len(self.state.targets) >= validate.MAX_TARGET_ENGINES:
            raise InvalidRequestError(
                f"targets are kept for at most {validate.MAX_TARGET_ENGINES} engines; clear an unused engine's "
                "targets (set them with no target) first"
            )
        new_state = self.state.with_targets(engine_id, targets)
        self.store.save(new_state)
        self.state = new_state
        self._wake.set()

    async def wait_status(self, timeout_s: float) -> pals_pb2.NodeStatus:
        """The next snapshot after a tick (or the current one after ``timeout_s`` wall seconds)."""
        event = self._status_event
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        return self.status

    # ------------------------------------------------------------------ status

    def resolve_gpus(self, uuids: Sequence[str], indices: Sequence[int]) -> tuple[int, ...]:
        """Map an engine's GPU UUIDs or indices to managed GPU indices (InvalidRequestError if unknown)."""
        by_uuid = {g.identity.uuid: g.identity.index for g in self.gpus}
        known = set(by_uuid.values())
        if uuids and indices:
            raise InvalidRequestError("give the engine's GPUs by UUID or by index, not both")
        if not uuids and not indices:
            raise InvalidRequestError("an engine must name at least one GPU")
        out = []
        for uuid in uuids:
            if uuid not in by_uuid:
                raise InvalidRequestError(f"GPU {uuid!r} is not managed by this daemon")
            out.append(by_uuid[uuid])
        for index in indices:
            if index not in known:
                raise InvalidRequestError(f"GPU index {index} is not managed by this daemon")
            out.append(index)
        if len(set(out)) != len(out):
            raise InvalidRequestError("an engine listed the same GPU twice")
        return tuple(out)

    def budget_status(self) -> pals_pb2.BudgetStatus:
        """The budget part of the status."""
        now = self.clock.now()
        status = pals_pb2.BudgetStatus(
            ramp_remaining_s=self.budget.ramp_remaining_s(now),
            min_budget_w=self.min_budget_w(),
            max_budget_w=self.max_budget_w(),
            sum_requested_limits_w=sum(mw_to_w(g.requested_limit_mw) for g in self.gpus),
            sum_enforced_limits_w=sum(mw_to_w(g.reading.enforced_limit_mw) for g in self.gpus),
            node_power_w=sum(mw_to_w(g.reading.power_avg_mw) for g in self.gpus),
        )
        if self.budget.target_w is not None:
            status.budget_w = self.budget.target_w
        effective = self.budget.effective_w(now)
        if effective is not None:
            status.effective_budget_w = effective
        return status

    def engine_status(self, engine_id: str) -> pals_pb2.EngineStatus:
        """One engine's status (connected or only configured with targets)."""
        session = self.engines.get(engine_id)
        targets = self.state.targets.get(engine_id, EngineTargets())
        stats = self.engine_stats.get(engine_id, EngineStats())
        decided = self.last_decision.engines.get(engine_id) if self.last_decision else None
        status = pals_pb2.EngineStatus(
            engine_id=engine_id,
            connected=session is not None,
            targets=_targets_proto(targets),
            throughput_tokens_per_s=stats.throughput_tokens_per_s,
            tokens_per_joule=stats.tokens_per_joule(),
            qos_violation_fraction=stats.qos.violation_fraction,
            windows=stats.qos.windows,
            qos_violation_windows=stats.qos.violations,
        )
        if session is not None:
            reg = session.registration
            status.model = reg.model
            status.gpu_indices.extend(reg.gpu_indices)
            status.configured_max_num_seqs = reg.max_num_seqs
            status.configured_max_num_batched_tokens = reg.max_num_batched_tokens
            status.num_running = session.num_running
            status.num_waiting = session.num_waiting
            status.max_num_seqs_limit = reg.max_num_seqs
            status.max_num_batched_tokens_limit = reg.max_num_batched_tokens
        if decided is not None:
            status.max_num_seqs_limit = decided.max_num_seqs
            status.max_num_batched_tokens_limit = decided.max_num_batched_tokens
            status.predicted_tokens_per_s = decided.predicted_tokens_per_s
            status.predicted_power_w = decided.predicted_power_w
            status.has_profile = decided.has_profile
        return status

    def build_status(self) -> pals_pb2.NodeStatus:
        """A full snapshot for PowerAdmin, watchers and the metrics exporter."""
        status = pals_pb2.NodeStatus(timestamp_unix_s=time.time())
        for g in self.gpus:
            r, c = g.reading, g.constraints
            session = self.engines.engine_of_gpu(g.identity.index)
            original = self.state.original_limits.get(g.identity.uuid)
            gs = pals_pb2.GpuStatus(
                index=g.identity.index,
                uuid=g.identity.uuid,
                name=g.identity.name,
                min_limit_w=mw_to_w(c.min_limit_mw),
                max_limit_w=mw_to_w(c.max_limit_mw),
                default_limit_w=mw_to_w(c.default_limit_mw),
                requested_limit_w=mw_to_w(g.requested_limit_mw),
                enforced_limit_w=mw_to_w(r.enforced_limit_mw),
                original_limit_w=mw_to_w(original.limit_mw) if original else mw_to_w(g.requested_limit_mw),
                power_w=mw_to_w(r.power_avg_mw),
                energy_j=mj_to_j(r.energy_mj),
                sm_clock_mhz=r.sm_clock_mhz,
                clock_event_reasons=r.clock_event_reasons,
                power_capped=r.power_capped,
                controlled=g.controlled,
                fault=g.fault,
                engine_id=session.registration.engine_id if session else "",
                decided_limit_w=g.decided_limit_w,
                limit_drift=g.external_cap_mw is not None,
            )
            if g.external_cap_mw is not None:
                gs.external_limit_w = mw_to_w(g.external_cap_mw)
            if r.power_instant_mw is not None:
                gs.power_instant_w = mw_to_w(r.power_instant_mw)
            status.gpus.append(gs)
        engine_ids = [s.registration.engine_id for s in self.engines.sessions()]
        engine_ids += sorted(set(self.state.targets) - set(engine_ids))
        status.engines.extend(self.engine_status(e) for e in engine_ids)
        status.budget.CopyFrom(self.budget_status())
        status.controller.CopyFrom(
            pals_pb2.ControllerStatus(
                mode=self.config.mode,
                backend=self.backend.name,
                period_s=self.config.period_s,
                ticks=self.ticks,
                decisions_changed=self.decisions_changed,
                last_tick_duration_s=self.last_tick_duration_s,
                last_reason=self.last_decision.reason if self.last_decision else "",
                last_tick_started_unix_s=self.last_tick_started_unix_s,
            )
        )
        return status


def _targets_proto(t: EngineTargets) -> pals_pb2.EngineTargets:
    out = pals_pb2.EngineTargets()
    if t.tokens_per_s is not None:
        out.tokens_per_s = t.tokens_per_s
    if t.ttft_ms is not None:
        out.ttft_ms = t.ttft_ms
    if t.tpot_ms is not None:
        out.tpot_ms = t.tpot_ms
    return out


def _failed_slot(
    worker: GpuWorker, identity: GpuIdentity, exc: GpuError, constraints: PowerConstraints | None
) -> GpuSlot:
    """A GPU that failed at start-up: kept for status and budget accounting, never controlled.

    With its constraints known it is counted at its maximum limit (it may draw that much), else at 0 W.
    """
    constraints = constraints or PowerConstraints(0, 0, 0)
    reading = GpuReading(0, None, 0, 0, 0, 0, 0)
    return GpuSlot(worker, identity, constraints, reading, 0, controlled=False, fault=str(exc), has_reading=False)


def _with_enforced(reading: GpuReading, enforced_mw: int, requested_mw: int) -> GpuReading:
    return GpuReading(
        power_avg_mw=reading.power_avg_mw,
        power_instant_mw=reading.power_instant_mw,
        energy_mj=reading.energy_mj,
        enforced_limit_mw=enforced_mw,
        requested_limit_mw=requested_mw,
        sm_clock_mhz=reading.sm_clock_mhz,
        clock_event_reasons=reading.clock_event_reasons,
    )


def default_profiles_dir() -> pathlib.Path:
    """profiles/ of a source checkout (editable install), else the system location."""
    checkout = pathlib.Path(__file__).resolve().parents[2] / "profiles"
    return checkout if checkout.is_dir() else pathlib.Path("/usr/share/pals/profiles")
