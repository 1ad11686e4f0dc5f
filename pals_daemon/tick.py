"""One control tick, observe -> decide -> actuate, shared by the live daemon and pals-replay.

Both run the same steps on different nodes, so a decision depends only on what the node reports:

- observe: :func:`observe` turns GPU views (:class:`GpuView`: the daemon's ``GpuSlot``, the replay's
  ``ReplayGpu``) and engine sessions (``server.engines.EngineSession``, fed by the engines' reports) into
  the ``ControllerInput``;
- decide: the caller's policy (the daemon's ``Controller.step``, a replay policy's ``decide``);
- actuate: :func:`plan_settings` says which per-GPU settings to write, clamped to each GPU's range and
  ceiling, uncontrolled GPUs skipped, every lowering write in a phase before any raising one (so the sum of
  limits stays within a budget while they land); :func:`engine_directives` says which engine gets which
  batch limits. The node executes the plan with its own writers: the daemon through its power-limit
  actuator (``actuators/power.py``: a phase's writes concurrently on the async GPU workers, a failed lowering
  phase defers the raising one), the replay through :func:`apply_plan`.

A knob is one per-GPU setting (:class:`Knob`): the power limit (:class:`PowerLimitKnob`) and the locked SM
clock (:class:`LockedClockKnob`, on a node that offers it: :class:`ClockKnobView`). The replay writes both
through :func:`apply_plan`; the daemon's locked-clock actuator (``actuators/clock.py``) plans its own writes,
with the same target rule (:func:`locked_clock_target`), since it also keeps the clock record on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pals_daemon.api import pals_pb2
from pals_daemon.control.types import ControllerInput, Decision, EngineObservation, EngineTargets, GpuObservation
from pals_daemon.gpu.backend import ClockInfo, GpuIdentity, GpuReading, PowerConstraints
from pals_daemon.units import mj_to_j, mw_to_w, w_to_mw

if TYPE_CHECKING:
    from pals_daemon.server.engines import EngineSession


class GpuView(Protocol):
    """What the pipeline needs to know about one GPU at a tick (the daemon's ``GpuSlot`` is one)."""

    identity: GpuIdentity
    constraints: PowerConstraints
    # The latest reading (taken at the start of the tick).
    reading: GpuReading
    # What the node last requested (the driver's requested limit until its first write).
    requested_limit_mw: int
    # False once the node stopped controlling the GPU (fatal error): nothing is written to it.
    controlled: bool

    def ceiling_mw(self, now_s: float) -> int:
        """The highest limit worth asking for (the maximum, or an external cap seen below it)."""
        ...

    def accounted_limit_mw(self) -> int:
        """What the GPU may draw while not controlled (the budget counts it at this)."""
        ...


# ---------------------------------------------------------------------------------------------- observe


@dataclass(frozen=True)
class ClockView:
    """The locked-clock knob of one GPU as the controller sees it (a node without the knob: all off)."""

    controllable: bool = False
    min_mhz: int = 0
    max_mhz: int = 0
    # The ceiling the node holds locked (None: unlocked).
    locked_mhz: int | None = None


NO_CLOCK = ClockView()


def gpu_observation(g: GpuView, now_s: float, clock: ClockView = NO_CLOCK) -> GpuObservation:
    """One GPU as the controller sees it."""
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
        clock_control=clock.controllable,
        min_clock_mhz=clock.min_mhz,
        max_clock_mhz=clock.max_mhz,
        locked_clock_mhz=clock.locked_mhz,
    )


def observe_engines(
    sessions: Iterable[EngineSession], managed_gpus: Collection[int], elapsed_s: float
) -> tuple[EngineObservation, ...]:
    """Take every session's telemetry window (each starts a new one), in registration order.

    An engine on a GPU the node does not manage is left out: its telemetry cannot steer those limits.
    """
    managed = frozenset(managed_gpus)
    out = []
    for session in sessions:
        obs = session.take_observation(elapsed_s)
        if managed.issuperset(obs.gpu_indices):
            out.append(obs)
    return tuple(out)


def observe(
    now_s: float,
    elapsed_s: float,
    budget_w: float | None,
    gpus: Sequence[GpuView],
    sessions: Iterable[EngineSession],
    targets: Mapping[str, EngineTargets],
    clocks: Callable[[GpuView], ClockView] | None = None,
) -> ControllerInput:
    """The tick's ControllerInput: GPUs (already read), the engines' windows, targets and the budget in force.

    ``clocks`` gives each GPU's clock knob (None: the node has none, every GPU reports it off).
    """
    return ControllerInput(
        now_s=now_s,
        budget_w=budget_w,
        gpus=tuple(gpu_observation(g, now_s, clocks(g) if clocks else NO_CLOCK) for g in gpus),
        engines=observe_engines(sessions, {g.identity.index for g in gpus}, elapsed_s),
        targets=dict(targets),
    )


# ---------------------------------------------------------------------------------------------- actuate


@dataclass(frozen=True)
class SettingWrite:
    """One write of one knob on one GPU, in the knob's device unit (mW for the power limit)."""

    gpu_index: int
    knob: str
    value: int


@dataclass(frozen=True)
class ActuationPlan:
    """The writes of one tick in phases: every lowering write, then every raising one."""

    lowering: tuple[SettingWrite, ...] = ()
    raising: tuple[SettingWrite, ...] = ()

    @property
    def phases(self) -> tuple[tuple[SettingWrite, ...], ...]:
        """The non-empty phases in the order they must run."""
        return tuple(p for p in (self.lowering, self.raising) if p)

    @property
    def writes(self) -> tuple[SettingWrite, ...]:
        """Every write, in order."""
        return self.lowering + self.raising


class Knob(Protocol):
    """One per-GPU setting: what the decision wants written on a GPU, and whether that write lowers power."""

    name: str

    def wanted(self, g: GpuView, decision: Decision, now_s: float) -> tuple[int, bool] | None:
        """(value to write, True when it lowers the GPU's power), or None when nothing needs writing."""
        ...


class PowerLimitKnob:
    """The power limit (mW): clamped to [minimum, ceiling]; written when the decision moves it or when someone
    else overwrote the management limit (the daemon owns it while it runs: the budget is a hard limit)."""

    name = "power_limit_mw"

    def wanted(self, g: GpuView, decision: Decision, now_s: float) -> tuple[int, bool] | None:
        """The clamped limit to write, or None."""
        if g.identity.index not in decision.gpu_limits_w:
            return None
        target_mw = w_to_mw(decision.gpu_limits_w[g.identity.index])
        target_mw = min(max(target_mw, g.constraints.min_limit_mw), g.ceiling_mw(now_s))
        # An enforced limit below the request (someone else's cap) is no reason to write on its own.
        if target_mw == g.requested_limit_mw and g.reading.requested_limit_mw == g.requested_limit_mw:
            return None
        # Lowering when below whatever may be in force now: the node's request, the driver's, the enforced one.
        in_force_mw = max(g.requested_limit_mw, g.reading.requested_limit_mw, g.reading.enforced_limit_mw)
        return target_mw, target_mw < in_force_mw


POWER_LIMIT = PowerLimitKnob()
DEFAULT_KNOBS: tuple[Knob, ...] = (POWER_LIMIT,)


class ClockKnobView(GpuView, Protocol):
    """A GPU view whose node offers the locked-clock knob: the supported clocks and the ceiling locked now."""

    # None: the knob is off on this GPU (no clock list, NOT_SUPPORTED, disabled): nothing is written.
    clock_info: ClockInfo | None
    locked_clock_mhz: int | None


def locked_clock_target(info: ClockInfo, want_mhz: int | None) -> int | None:
    """The ceiling to lock for a decided one: snapped down to a supported clock; None or the top clock: unlocked."""
    if want_mhz is None:
        return None
    mhz = info.snap_down(int(want_mhz))
    return None if mhz >= info.max_mhz else mhz


class LockedClockKnob:
    """The locked SM clock ceiling (MHz; 0 = reset to unlocked): written when the decided ceiling, snapped as
    the daemon's actuator snaps it, differs from the one held. A lower ceiling lowers power (lowering phase)."""

    name = "locked_clock_mhz"

    def wanted(self, g: GpuView, decision: Decision, now_s: float) -> tuple[int, bool] | None:
        """The ceiling to lock (0: unlock), or None."""
        info: ClockInfo | None = getattr(g, "clock_info", None)
        if info is None:
            return None
        held: int | None = getattr(g, "locked_clock_mhz", None)
        target = locked_clock_target(info, decision.gpu_locked_clocks_mhz.get(g.identity.index))
        if target == held:
            return None
        lowers = target is not None and (held is None or target < held)
        return (0 if target is None else target), lowers


LOCKED_CLOCK = LockedClockKnob()


def plan_settings(
    gpus: Sequence[GpuView], decision: Decision, now_s: float, knobs: Sequence[Knob] = DEFAULT_KNOBS
) -> ActuationPlan:
    """The writes the decision needs, uncontrolled GPUs skipped, lowering before raising (GPU order within)."""
    lowering: list[SettingWrite] = []
    raising: list[SettingWrite] = []
    for g in gpus:
        if not g.controlled:
            continue
        for knob in knobs:
            want = knob.wanted(g, decision, now_s)
            if want is None:
                continue
            value, lowers = want
            (lowering if lowers else raising).append(SettingWrite(g.identity.index, knob.name, value))
    return ActuationPlan(tuple(lowering), tuple(raising))


# Writes one setting and returns the value read back (sync; the daemon's async workers run their own loop).
SettingWriter = Callable[[SettingWrite], int]


def apply_plan(plan: ActuationPlan, writers: Mapping[str, SettingWriter]) -> list[tuple[SettingWrite, int]]:
    """Run a plan phase by phase with synchronous writers; returns each write with its read-back.

    A writer's exception propagates: the raising phase never runs after a failed lowering write (the raising
    writes were sized on the lowering ones), as in the daemon. A knob without a writer is refused before
    anything is written (a plan is never half applied for want of a writer).
    """
    missing = sorted({w.knob for w in plan.writes} - set(writers))
    if missing:
        raise ValueError(f"no writer for knob(s) {missing}")
    done = []
    for phase in plan.phases:
        for w in phase:
            done.append((w, writers[w.knob](w)))
    return done


def engine_directives(
    decision: Decision, sessions: Iterable[EngineSession], sequence: int, ttl_s: float
) -> list[tuple[EngineSession, pals_pb2.Directive]]:
    """The directive each session gets from the decision (sessions without a decision get none).

    Records the limits on the session: the next window's observation reports them as the ones in force.
    The ttl is relative, in the node's clock (a simulated engine runs on the same clock).
    """
    out = []
    for session in sessions:
        d = decision.engines.get(session.registration.engine_id)
        if d is None:
            continue
        session.current_max_num_seqs = d.max_num_seqs
        session.current_max_num_batched_tokens = d.max_num_batched_tokens
        directive = pals_pb2.Directive(
            sequence=sequence,
            max_num_seqs=d.max_num_seqs,
            max_num_batched_tokens=d.max_num_batched_tokens,
            ttl_ms=max(1, int(ttl_s * 1000)),
        )
        out.append((session, directive))
    return out
