"""A simulated node stepped through the daemon's tick pipeline (``pals_daemon/tick.py``) in simulated time.

Per tick (:meth:`ReplayNode.observe`, then :meth:`ReplayNode.actuate`): every SimEngine advances to the tick
time and reports its window into an ``EngineSession`` as its EngineLink client would (the same StepReport and
ExpertLoadReport messages, folded by the daemon's own validation and aggregation); the GPUs are read;
``tick.observe`` builds the input; the caller's policy decides; ``tick.plan_settings`` orders the limit
writes, made on the SimGpus; ``tick.engine_directives`` gives each engine its directive, applied as a
simulated engine applies a received one. Nothing here copies the daemon's code: a change to the pipeline
reaches both, and ``tests/replay/test_tick_parity.py`` checks that both decide the same.

Not modelled, since the replay has no source for them: GPU faults, external caps and foreign writes (its
SimGpus have none, so a GPU's ceiling is its maximum), directive expiry (a directive arrives every tick,
well within its ttl), and reports arriving out of phase with the tick (one report per engine per tick).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from pals_daemon.config import DaemonConfig
from pals_daemon.control.types import ControllerInput, Decision, EngineTargets
from pals_daemon.gpu.backend import ClockInfo, GpuIdentity, GpuReading, PowerConstraints
from pals_daemon.replay.scenario import Scenario
from pals_daemon.server.engines import EngineRegistration, EngineRegistry, EngineSession
from pals_daemon.sim.engine import Request, SimEngine
from pals_daemon.sim.gpu import SimGpu, make_sim_gpus
from pals_daemon.sim.link import expert_load_reports, step_report
from pals_daemon.sim.truth import ModelTruth
from pals_daemon.tick import (
    LOCKED_CLOCK,
    NO_CLOCK,
    POWER_LIMIT,
    ClockView,
    GpuView,
    Knob,
    SettingWrite,
    apply_plan,
    engine_directives,
    observe,
    plan_settings,
)

# Directive ttl in the replay (simulated s): the daemon's default; a directive never expires in a replay anyway.
DIRECTIVE_TTL_S = DaemonConfig.directive_ttl_s


@dataclass
class ReplayGpu:
    """A SimGpu as the pipeline sees it (a ``tick.GpuView``): read every tick, always controlled."""

    device: SimGpu
    identity: GpuIdentity
    constraints: PowerConstraints
    reading: GpuReading
    requested_limit_mw: int
    controlled: bool = True
    # The locked-clock knob (tick.ClockKnobView): the supported clocks when the replay offers the knob, else
    # None; the ceiling this node holds locked (None: unlocked).
    clock_info: ClockInfo | None = None
    locked_clock_mhz: int | None = None

    @classmethod
    def of(cls, device: SimGpu, clocks: bool = False) -> ReplayGpu:
        """The view of a fresh SimGpu (its limit as found; with ``clocks``, its clock knob on)."""
        reading = device.read()
        info = device.clock_info() if clocks else None
        return cls(device, device.identity, device.constraints(), reading, reading.requested_limit_mw, clock_info=info)

    def clock_view(self) -> ClockView:
        """The clock knob as the controller sees it (as the daemon's ``_clock_view`` reports it)."""
        info = self.clock_info
        if info is None:
            return NO_CLOCK
        return ClockView(True, info.min_mhz, info.max_mhz, self.locked_clock_mhz)

    def write_locked_clock(self, write: SettingWrite) -> int:
        """Lock [lowest supported, value] MHz, or unlock for 0 (as the daemon's actuator does); the clock after it."""
        assert self.clock_info is not None
        if write.value == 0:
            in_force = self.device.reset_locked_clocks()
            self.locked_clock_mhz = None
        else:
            in_force = self.device.set_locked_clocks_mhz(self.clock_info.min_mhz, write.value)
            self.locked_clock_mhz = write.value
        return in_force

    def read(self) -> None:
        """Take this tick's reading."""
        self.reading = self.device.read()

    def ceiling_mw(self, now_s: float) -> int:
        """The maximum limit: nobody else caps a simulated GPU in a replay."""
        return self.constraints.max_limit_mw

    def accounted_limit_mw(self) -> int:
        """The enforced limit (never used: a replay GPU is always controlled)."""
        return self.reading.enforced_limit_mw

    def write_power_limit(self, write: SettingWrite) -> int:
        """Write the limit; the view then holds it as requested and the driver's read-back as enforced."""
        enforced = self.device.set_power_limit_mw(write.value)
        self.requested_limit_mw = write.value
        self.reading = replace(self.reading, enforced_limit_mw=enforced, requested_limit_mw=write.value)
        return enforced


def report_window(engine: SimEngine, session: EngineSession, gpu_uuids: Sequence[str]) -> None:
    """Fold the engine's window since its last report into ``session``: the messages its EngineLink sends."""
    window = engine.take_window()
    session.add_step_report(step_report(window))
    for report, gpu_index in zip(
        expert_load_reports(window, gpu_uuids), session.registration.gpu_indices, strict=False
    ):
        session.add_expert_load(report, gpu_index)


class ReplayNode:
    """The scenario's SimGpus and SimEngines, with one EngineSession per engine, in simulated time."""

    def __init__(
        self,
        scenario: Scenario,
        truths: Mapping[str, ModelTruth],
        requests: Mapping[str, Sequence[Request]],
        clock: Callable[[], float],
        clocks: bool = False,
    ) -> None:
        """``clocks``: offer the controller the locked-clock knob on every GPU (as ``[clocks] enabled``)."""
        self.engines: list[SimEngine] = []
        self.engine_gpus: list[list[SimGpu]] = []
        self.registry = EngineRegistry()
        self.sessions: list[EngineSession] = []
        first = 0
        for spec in scenario.engines:
            gpus = make_sim_gpus(spec.gpu_kind, spec.num_gpus, clock, first_index=first)
            first += spec.num_gpus
            engine = SimEngine(
                spec.engine_id,
                truths[spec.engine_id],
                gpus,
                requests[spec.engine_id],
                spec.max_num_seqs,
                spec.max_num_batched_tokens,
                expert_load_share=spec.expert_load_share,
            )
            self.engines.append(engine)
            self.engine_gpus.append(gpus)
            registration = EngineRegistration(
                spec.engine_id,
                spec.model,
                tuple(g.identity.index for g in gpus),
                spec.max_num_seqs,
                spec.max_num_batched_tokens,
            )
            self.sessions.append(self.registry.register(registration))
        self.gpus = [ReplayGpu.of(g, clocks) for gs in self.engine_gpus for g in gs]
        self.clocks = clocks
        self._knobs: tuple[Knob, ...] = (POWER_LIMIT, LOCKED_CLOCK) if clocks else (POWER_LIMIT,)
        self._writers = {POWER_LIMIT.name: self._write_power_limit, LOCKED_CLOCK.name: self._write_locked_clock}
        self._by_index = {g.identity.index: g for g in self.gpus}
        self._ticks = 0

    def observe(
        self, now_s: float, elapsed_s: float, budget_w: float | None, targets: Mapping[str, EngineTargets]
    ) -> ControllerInput:
        """Advance every engine to ``now_s``, fold its report, read the GPUs: the tick's ControllerInput."""
        for engine, gpus, session in zip(self.engines, self.engine_gpus, self.sessions, strict=True):
            engine.advance(now_s)
            report_window(engine, session, [g.identity.uuid for g in gpus])
        for g in self.gpus:
            g.read()
        clocks = self._clock_view if self.clocks else None
        return observe(now_s, elapsed_s, budget_w, self.gpus, self.registry.sessions(), targets, clocks)

    def actuate(self, decision: Decision, now_s: float) -> None:
        """Write the decided limits and locks (lowering first) and hand each engine its directive."""
        apply_plan(plan_settings(self.gpus, decision, now_s, knobs=self._knobs), self._writers)
        by_id = {e.engine_id: e for e in self.engines}
        for session, directive in engine_directives(decision, self.sessions, self._ticks, DIRECTIVE_TTL_S):
            by_id[session.registration.engine_id].apply_limits(directive.max_num_seqs, directive.max_num_batched_tokens)
        self._ticks += 1

    def requested_mw(self) -> dict[int, int]:
        """Each GPU's requested limit, by index."""
        return {g.identity.index: g.requested_limit_mw for g in self.gpus}

    def _write_power_limit(self, write: SettingWrite) -> int:
        return self._by_index[write.gpu_index].write_power_limit(write)

    def _write_locked_clock(self, write: SettingWrite) -> int:
        return self._by_index[write.gpu_index].write_locked_clock(write)

    def _clock_view(self, g: GpuView) -> ClockView:
        return self._by_index[g.identity.index].clock_view()
