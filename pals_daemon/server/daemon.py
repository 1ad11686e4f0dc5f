"""The daemon: GPUs, engine sessions, the control tick, persisted state, and every exit path restoring limits.

Layering (GEOPM style): the gRPC servicers are thin facades that call the methods here; the decisions come
from the pure controller core; only the GpuWorkers touch a backend, and each hardware knob (power limit,
locked clock) is one actuator (pals_daemon/actuators) that reads, applies, records and restores it.
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

from pals_daemon import resources
from pals_daemon.actuators import LockedClockActuator, all_actuators
from pals_daemon.api import pals_pb2
from pals_daemon.clock import Clock
from pals_daemon.config import DaemonConfig
from pals_daemon.control.budget import BudgetSchedule
from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.core import Controller
from pals_daemon.control.qos import QosWindows
from pals_daemon.control.types import (
    Decision,
    EngineObservation,
    EngineTargets,
)
from pals_daemon.errors import GpuError, GpuFatalError, InvalidRequestError
from pals_daemon.gpu.backend import GpuBackend, GpuDevice, GpuIdentity, GpuReading, PowerConstraints
from pals_daemon.gpu.worker import GpuWorker
from pals_daemon.model.profile import ProfileRegistry
from pals_daemon.server import validate
from pals_daemon.server.engines import EngineRegistry
from pals_daemon.server.persist import StateWriter
from pals_daemon.server.profiler import Profiler
from pals_daemon.state import BudgetRamp, DaemonState, StateStore, current_boot_id
from pals_daemon.tick import ClockView, engine_directives, observe
from pals_daemon.units import mj_to_j, mw_to_w

log = logging.getLogger(__name__)

# Ticks over which an engine's tokens/J is measured (10 s at the default 0.5 s period).
EFFICIENCY_WINDOW_TICKS = 20
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
        # Budget, targets and restores are saved through this (never raising: applied first, saved after).
        self.persist = StateWriter(self.store)
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
        # One per hardware knob, in apply order (the power limit, the hard bound, first).
        self.actuators = all_actuators(clocks_enabled=config.clocks_enabled)
        self.clocks = next(a for a in self.actuators if isinstance(a, LockedClockActuator))

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
        for actuator in self.actuators:
            # Each undoes what a crashed run left (enforce mode) and records originals before any write.
            await actuator.start(self)
        budget = self.state.budget_w if self.state.budget_w is not None else self.config.budget_w
        if self.state.budget_w is not None:
            overrides = self.config.budget_w is not None and self.config.budget_w != self.state.budget_w
            (log.warning if overrides else log.info)(
                "budget %g W from %s%s (`palsctl budget set` changes it)",
                self.state.budget_w,
                self.store.path,
                f" overrides budget_w {self.config.budget_w:g} W of the configuration" if overrides else "",
            )
        if budget is not None and budget < self.min_budget_w():
            log.error(
                "saved budget %.0f W is below the node minimum %.0f W; using the minimum",
                budget,
                self.min_budget_w(),
            )
            budget = self.min_budget_w()
        self.budget = self._resumed_schedule(budget)
        self.state = self.state.with_budget(budget, self._ramp_record())
        self.store.save(self.state)
        self.last_tick_s = self.clock.now()
        self.status = self.build_status()

    def _resumed_schedule(self, budget_w: float | None) -> BudgetSchedule:
        """The budget schedule at start: a saved ramp towards ``budget_w`` resumes where it is now (wall time)."""
        ramp = self.state.budget_ramp
        if budget_w is None or ramp is None or budget_w != self.state.budget_w:
            return BudgetSchedule(target_w=budget_w)
        # Ramps run on the daemon's clock (scaled for the simulated node); the record is in wall seconds.
        elapsed_s = (time.time() - ramp.start_unix_s) * _clock_speed(self.clock)
        if not 0.0 <= elapsed_s < ramp.ramp_s:
            # Over, or the wall clock went back: the lower end is in force (never more watts than asked).
            if elapsed_s < 0.0 and ramp.start_w < budget_w:
                elapsed_s = 0.0
            else:
                return BudgetSchedule(target_w=budget_w)
        log.info(
            "resuming the budget ramp from %.0f W to %.0f W: %.0f s of %.0f s left",
            ramp.start_w,
            budget_w,
            ramp.ramp_s - elapsed_s,
            ramp.ramp_s,
        )
        return BudgetSchedule(budget_w, ramp.start_w, self.clock.now() - elapsed_s, ramp.ramp_s)

    def _ramp_record(self) -> BudgetRamp | None:
        """The budget ramp in progress, as saved (None when the budget is in force)."""
        now = self.clock.now()
        b = self.budget
        if b.target_w is None or b.start_w is None or b.ramp_remaining_s(now) <= 0:
            return None
        # Wall time of the ramp's start: the monotonic clock does not survive a restart.
        return BudgetRamp(b.start_w, time.time() - (now - b.start_s) / _clock_speed(self.clock), b.ramp_s)

    def _read_driver_version(self) -> str | None:
        """The driver version for new records; None (unknown) when the backend cannot say."""
        try:
            return self.backend.driver_version()
        except GpuError as exc:
            log.warning("cannot read the driver version (records will say 'unknown'): %s", exc)
            return None

    async def restore_all(self) -> list[str]:
        """Put every GPU back to its recorded originals, knob by knob; returns the problems (empty when all done)."""
        problems = []
        for actuator in self.actuators:
            problems += await actuator.restore_all(self)
        # A failed save leaves records of restored GPUs on disk: harmless, restoring them again is a no-op.
        self.persist.save(self.state)
        return problems

    def gpu_failed(self, g: GpuSlot, exc: BaseException) -> None:
        """An actuator's call on ``g`` failed (see _gpu_failed)."""
        self._gpu_failed(g, exc)

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
            self.persist.retry(self.state)
            started = time.perf_counter()
            self.last_tick_started_unix_s = time.time()
            now = self.clock.now()
            elapsed = max(now - self.last_tick_s, 1e-6)
            self.last_tick_s = now
            await self._read_gpus(now)
            inp = observe(
                now,
                elapsed,
                self.budget.effective_w(now),
                self.gpus,
                self.engines.sessions(),
                self.state.targets,
                self._clock_view,
            )
            observations = inp.engines
            decision = self.profiler.override(self.controller.step(self.profiler.controller_input(inp)), inp)
            for actuator in self.actuators:
                actuator.decide(self, decision)
            if self.enforcing:
                for actuator in self.actuators:
                    await actuator.apply(self, decision, now)
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
                    for actuator in self.actuators:
                        actuator.observe(self, g, now_s)
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

    def _clock_view(self, g: GpuSlot) -> ClockView:
        """The clock knob of ``g`` as the controller sees it (off while the actuator may not lock it)."""
        clock = self.clocks.of(g.identity.index)
        return ClockView(
            controllable=clock.controllable and g.controlled,
            min_mhz=clock.info.min_mhz if clock.info else 0,
            max_mhz=clock.info.max_mhz if clock.info else 0,
            locked_mhz=clock.requested_max_mhz,
        )

    def _send_directives(self, decision: Decision) -> None:
        for session, directive in engine_directives(
            decision, self.engines.sessions(), self.ticks, self.config.directive_ttl_s
        ):
            try:
                session.outbox.put_nowait(pals_pb2.DaemonMessage(directive=directive))
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
            # Applied first, saved after: a budget cut takes effect even when the state disk is full or
            # read-only (the failure is reported and the save retried every tick: server/persist.py).
            self.budget = self.budget.retarget(budget_w, ramp_s, self.clock.now(), self.max_budget_w())
            self.state = self.state.with_budget(budget_w, self._ramp_record())
            self.persist.save(self.state)
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
        self.state = self.state.with_targets(engine_id, targets)
        self.persist.save(self.state)
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
            self._clock_status(g, gs)
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
                state_save_error=self.persist.error,
                state_save_failures=self.persist.failures,
            )
        )
        return status

    def _clock_status(self, g: GpuSlot, gs: pals_pb2.GpuStatus) -> None:
        """The clock knob's part of a GPU's status."""
        st = self.clocks.of(g.identity.index)
        gs.clock_control = st.controllable and g.controlled
        gs.clock_control_note = st.note
        gs.clock_external = st.external
        if st.info is not None:
            gs.min_clock_mhz, gs.max_clock_mhz = st.info.min_mhz, st.info.max_mhz
        if st.requested_max_mhz is not None:
            gs.locked_clock_requested_mhz = st.requested_max_mhz
        if st.decided_max_mhz is not None:
            gs.locked_clock_decided_mhz = st.decided_max_mhz


def _clock_speed(clock: Clock) -> float:
    """Daemon seconds per wall second (1 but for the simulated node's scaled clock)."""
    return float(getattr(clock, "speed", 1.0))


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


def default_profiles_dir() -> pathlib.Path:
    """The profiles shipped with the package (pals_daemon/resources.py)."""
    return resources.profiles_dir()
