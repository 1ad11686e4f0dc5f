"""Online profiling: sweep a live engine over (power cap, batch) points and write a ``pals.profile/v1`` file.

A job pins one engine: while it runs the controller does not choose that engine's caps and batch limit.
Every tick the daemon asks :meth:`Profiler.controller_input` for the controller's view (the pinned GPUs
appear as uncontrolled GPUs held at the point's cap, so the controller budgets the other GPUs around them,
and the pinned engine is left out), then :meth:`Profiler.override` adds the point's cap on all the engine's
GPUs and its batch as the engine's ``max_num_seqs``, and :meth:`Profiler.after_tick` advances the job.

Each point goes through three phases:

- ``draining``: until every one of the engine's GPUs enforces the cap and the engine runs no more requests
  than the batch (vLLM does not preempt to honour a lower ``max_num_seqs``; running requests finish first);
- ``settling``: ``settle_s`` more seconds (the driver's averaging, the engine's queue);
- ``holding``: ``hold_s`` seconds measured: throughput is the engine's decode tokens over the time its
  reports cover (as the daemon's own throughput figure), per-GPU power the energy-counter delta of each GPU
  over the hold divided by its length (not NVML's 1 s average), averaged over the engine's GPUs.

The budget: a job is refused when a point's cap on the engine's GPUs plus the other GPUs' current limits
would exceed the budget in force (every point must fit: a skipped point would leave a hole in the grid that
``load_profile`` requires to be full). If the budget is lowered while a job runs, the tick lowers the pinned
caps to fit and the job fails with a message saying so; the controller takes over at the next tick. On
cancel, failure, completion or daemon stop the controller takes over again (on stop the original limits are
restored as always).

Points are measured with the batch ascending (one drain from the engine's current batch at most) and the
caps in the order given within each batch. The points only describe the engine's capacity when its load
saturates the batch; a hold in which the engine ran fewer requests than the batch for more than half the
ticks adds a warning to the job. A hold in which the engine ran more requests than the batch (it ignored the
directive, or fell back to its own limits when one expired) is started again, at most ``MAX_POINT_RETRIES``
times per point, then the job fails.

The written profile uses ``method: "measured"`` (the schema's values are "measured" and "modelled"); "measured
online", the node, the engine, its GPUs and the date are in ``source``. It is written under the state
directory by default, not into the profiles directory: a profile for a model that already has one for the
same GPU kind and parallelism would clash there (``ProfileRegistry`` refuses two), so installing it is the
operator's decision.
"""

from __future__ import annotations

import datetime
import enum
import logging
import math
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pals_daemon.api import pals_pb2
from pals_daemon.control.types import ControllerInput, Decision, EngineDecision, EngineObservation
from pals_daemon.errors import InvalidRequestError, PalsError
from pals_daemon.model.profile import SCHEMA, ProfileError, dumps_profile, profile_from_dict
from pals_daemon.server import validate
from pals_daemon.tick import locked_clock_target
from pals_daemon.units import mj_to_j, mw_to_w, w_to_mw

if TYPE_CHECKING:
    from pals_daemon.server.daemon import Daemon, GpuSlot
    from pals_daemon.server.engines import EngineSession

log = logging.getLogger(__name__)

MIN_HOLD_S = 0.5
MAX_HOLD_S = 600.0
MAX_SETTLE_S = 600.0
DEFAULT_SETTLE_S = 2.0
MAX_POINTS = 200
# Give up waiting for a point's cap to be enforced and the batch to drain after this long (then measure
# anyway, with a warning): a driver that enforces another limit, or requests that never finish.
MIN_DRAIN_TIMEOUT_S = 60.0
# A point whose hold saw the engine run more requests than the batch (it did not apply the directive, or
# fell back to its own limits when a directive expired) is measured again, at most this many times.
MAX_POINT_RETRIES = 3
# A hold with fewer running requests than the batch in more than this fraction of its ticks gets a warning.
UNSATURATED_WARN_FRACTION = 0.5
# Watts of float slack when checking a point against the budget.
_EPS_W = 1e-6


class ProfileConflictError(PalsError):
    """A profile job cannot start or continue in the daemon's current state (FAILED_PRECONDITION)."""


class ProfileNotFoundError(PalsError):
    """The engine never had a profile job (NOT_FOUND)."""


class JobState(enum.Enum):
    """Where a job stands; values are the proto's ProfileState."""

    RUNNING = pals_pb2.PROFILE_STATE_RUNNING
    DONE = pals_pb2.PROFILE_STATE_DONE
    FAILED = pals_pb2.PROFILE_STATE_FAILED
    CANCELLED = pals_pb2.PROFILE_STATE_CANCELLED


class Phase(enum.Enum):
    """The phase of the point being measured."""

    DRAINING = "draining"
    SETTLING = "settling"
    HOLDING = "holding"


@dataclass(frozen=True)
class PointResult:
    """One measured point: per-GPU cap and batch -> engine throughput and mean per-GPU power."""

    cap_w: float
    batch: int
    tokens_per_s: float
    gpu_power_w: float
    clock_mhz: int | None = None  # the locked SM clock ceiling; None: unlocked


@dataclass(frozen=True)
class ProfileSpec:
    """A validated StartProfile request."""

    engine_id: str
    caps_w: tuple[float, ...]
    batches: tuple[int, ...]
    hold_s: float
    settle_s: float
    output_path: Path
    parallelism: str
    # Locked SM clock ceilings swept at the highest cap (snapped to supported clocks, highest first); () none.
    clocks_mhz: tuple[int, ...] = ()

    @property
    def points(self) -> tuple[tuple[float, int, int | None], ...]:
        """(cap W, batch, lock MHz or None) in sweep order: batch ascending outside; inside, the caps as given
        unlocked, then the clocks at the highest cap (one drain per batch; the clock points' unlocked reference
        at that cap is the batch's own unlocked point)."""
        out: list[tuple[float, int, int | None]] = []
        for batch in sorted(self.batches):
            out += [(cap, batch, None) for cap in self.caps_w]
            out += [(max(self.caps_w), batch, clock) for clock in self.clocks_mhz]
        return tuple(out)


@dataclass
class _Hold:
    """Accumulators of the point being held."""

    start_s: float
    energy_start_mj: dict[int, int]
    decode_tokens: int = 0
    window_s: float = 0.0
    ticks: int = 0
    unsaturated_ticks: int = 0


@dataclass
class ProfileJob:
    """One engine's sweep and its results so far."""

    spec: ProfileSpec
    session: EngineSession
    gpu_indices: tuple[int, ...]
    gpu_name: str
    started_s: float
    state: JobState = JobState.RUNNING
    index: int = 0
    phase: Phase = Phase.DRAINING
    phase_start_s: float = 0.0
    hold: _Hold | None = None
    results: list[PointResult] = field(default_factory=list)
    retries: int = 0
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    finished_s: float | None = None

    @property
    def running(self) -> bool:
        """True while the job pins the engine."""
        return self.state is JobState.RUNNING

    @property
    def point(self) -> tuple[float, int]:
        """The (cap W, batch) being applied or measured."""
        cap_w, batch, _ = self.spec.points[min(self.index, len(self.spec.points) - 1)]
        return cap_w, batch

    @property
    def clock_mhz(self) -> int | None:
        """The locked SM clock ceiling of the point being applied or measured (None: unlocked)."""
        return self.spec.points[min(self.index, len(self.spec.points) - 1)][2]

    def finish(self, state: JobState, now_s: float, error: str = "") -> None:
        """Leave RUNNING (the engine is the controller's again from the next tick)."""
        if not self.running:
            return
        self.state = state
        self.error = error
        self.finished_s = now_s
        if state is JobState.FAILED:
            log.error("profile of %s failed: %s", self.spec.engine_id, error)
        else:
            log.info("profile of %s %s%s", self.spec.engine_id, state.name.lower(), f": {error}" if error else "")

    def remaining_s(self, now_s: float) -> float:
        """A rough estimate of the seconds left (draining time unknown, counted as zero)."""
        if not self.running:
            return 0.0
        per_point = self.spec.settle_s + self.spec.hold_s
        left = (len(self.spec.points) - self.index - 1) * per_point
        if self.phase is Phase.HOLDING and self.hold is not None:
            left += max(0.0, self.spec.hold_s - (now_s - self.hold.start_s))
        elif self.phase is Phase.SETTLING:
            left += self.spec.hold_s + max(0.0, self.spec.settle_s - (now_s - self.phase_start_s))
        else:
            left += per_point
        return left


class Profiler:
    """The daemon's profile jobs (at most one running per engine) and their hooks into the control tick."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        # The running or last job of each engine.
        self.jobs: dict[str, ProfileJob] = {}

    # ------------------------------------------------------------------ admin operations

    def start(self, request: pals_pb2.StartProfileRequest) -> ProfileJob:
        """Validate and start a job; InvalidRequestError or ProfileConflictError (nothing started) otherwise."""
        d = self.daemon
        engine_id = validate.engine_id(request.engine_id)
        session = d.engines.get(engine_id)
        if session is None:
            raise InvalidRequestError(f"engine {engine_id!r} is not connected")
        reg = session.registration
        if not reg.gpu_indices:
            raise InvalidRequestError(f"engine {engine_id!r} has no GPUs")
        slots = {g.identity.index: g for g in d.gpus}
        missing = [i for i in reg.gpu_indices if i not in slots]
        if missing:
            raise InvalidRequestError(f"engine {engine_id!r} runs on GPUs {missing} that this daemon does not manage")
        engine_slots = [slots[i] for i in reg.gpu_indices]
        caps = tuple(validate.finite(c, f"caps_w[{k}]", 0.0, 1e5) for k, c in enumerate(request.caps_w))
        for cap in caps:
            for g in engine_slots:
                lo, hi = mw_to_w(g.constraints.min_limit_mw), mw_to_w(g.constraints.max_limit_mw)
                if not lo <= cap <= hi:
                    raise InvalidRequestError(
                        f"cap {cap:g} W is outside GPU {g.identity.index}'s power limit range [{lo:g}, {hi:g}] W"
                    )
        batches = tuple(int(b) for b in request.batches)
        for b in batches:
            if not 1 <= b <= reg.max_num_seqs:
                raise InvalidRequestError(
                    f"batch {b} is outside [1, {reg.max_num_seqs}] (the engine's configured max_num_seqs)"
                )
        _distinct(caps, "caps_w", "W")
        _distinct(batches, "batches", "")
        clocks = self._clocks(request.clocks_mhz, engine_slots)
        n_points = (len(caps) + len(clocks)) * len(batches)
        if n_points > MAX_POINTS:
            raise InvalidRequestError(
                f"({len(caps)} caps + {len(clocks)} clocks) x {len(batches)} batches = {n_points} points; "
                f"at most {MAX_POINTS}"
            )
        hold_s = validate.finite(request.hold_s, "hold_s", MIN_HOLD_S, MAX_HOLD_S)
        settle_s = (
            validate.finite(request.settle_s, "settle_s", 0.0, MAX_SETTLE_S)
            if request.HasField("settle_s")
            else DEFAULT_SETTLE_S
        )
        parallelism = request.parallelism.strip() or f"tp{len(reg.gpu_indices)}"
        if len(parallelism) > 64 or not parallelism.isprintable():
            raise InvalidRequestError("parallelism must be at most 64 printable characters")
        gpu_name = engine_slots[0].identity.name or "unknown-gpu"
        output = self._output_path(request.output_path, engine_id, gpu_name)
        spec = ProfileSpec(engine_id, caps, batches, hold_s, settle_s, output, parallelism, clocks)

        # The node's state: after the request itself is known to be well formed.
        if not d.enforcing:
            raise ProfileConflictError(
                "online profiling needs enforce mode: it sets power limits and batch limits, "
                "which advise mode never does"
            )
        current = self.jobs.get(engine_id)
        if current is not None and current.running:
            raise ProfileConflictError(
                f"a profile job is already running for engine {engine_id!r} "
                f"(point {current.index + 1}/{len(current.spec.points)}); cancel it first"
            )
        for other in self.jobs.values():
            if other.running and other.spec.output_path == output:
                raise ProfileConflictError(f"engine {other.spec.engine_id!r}'s running job writes {output} too")
        faulty = [g.identity.index for g in engine_slots if not g.controlled]
        if faulty:
            raise ProfileConflictError(f"GPU(s) {faulty} of engine {engine_id!r} are no longer controlled")
        if clocks:
            off = [(g.identity.index, d.clocks.of(g.identity.index)) for g in engine_slots]
            notes = [f"GPU {i}: {st.note or 'no supported clocks'}" for i, st in off if not st.controllable]
            if notes:
                raise ProfileConflictError(f"a clock sweep needs the clock knob on every GPU; {'; '.join(notes)}")
        self._check_budget(spec, reg.gpu_indices)

        now = d.clock.now()
        job = ProfileJob(spec, session, tuple(reg.gpu_indices), gpu_name, started_s=now, phase_start_s=now)
        self.jobs[engine_id] = job
        log.info(
            "profiling %s: caps %s W x batches %s, settle %g s, hold %g s -> %s",
            engine_id,
            list(caps),
            sorted(batches),
            settle_s,
            hold_s,
            output,
        )
        return job

    def _clocks(self, requested: Sequence[int], engine_slots: Sequence[GpuSlot]) -> tuple[int, ...]:
        """The requested clocks snapped down to a clock every GPU supports, highest first; InvalidRequestError
        for one outside a GPU's range, at or above its top clock (unlocked points measure that), or a repeat."""
        if not requested:
            return ()
        infos = [(g.identity.index, self.daemon.clocks.of(g.identity.index).info) for g in engine_slots]
        out = []
        for k, mhz in enumerate(requested):
            snapped = int(mhz)
            for i, info in infos:
                if info is None:
                    continue  # no clock list: refused below as a GPU without the clock knob
                if not info.min_mhz <= mhz < info.max_mhz:
                    raise InvalidRequestError(
                        f"clocks_mhz[{k}] = {mhz} MHz is outside GPU {i}'s lockable range [{info.min_mhz}, "
                        f"{info.max_mhz}) MHz (the top clock is what the unlocked points measure)"
                    )
                snapped = min(snapped, locked_clock_target(info, int(mhz)) or info.max_mhz)
            out.append(snapped)
        if len(set(out)) != len(out):
            raise InvalidRequestError(f"clocks_mhz repeats a clock once snapped to supported clocks: {out}")
        return tuple(sorted(out, reverse=True))

    def get(self, engine_id: str) -> ProfileJob:
        """The engine's running or last job (ProfileNotFoundError if none)."""
        validate.engine_id(engine_id)
        job = self.jobs.get(engine_id)
        if job is None:
            raise ProfileNotFoundError(f"engine {engine_id!r} has no profile job")
        return job

    def cancel(self, engine_id: str, reason: str = "cancelled by the operator") -> ProfileJob:
        """Stop the engine's running job (a finished job is returned unchanged)."""
        job = self.get(engine_id)
        job.finish(JobState.CANCELLED, self.daemon.clock.now(), reason)
        return job

    def stop(self, reason: str = "daemon stopped") -> None:
        """Cancel every running job (the daemon is shutting down)."""
        now = self.daemon.clock.now()
        for job in self.jobs.values():
            job.finish(JobState.CANCELLED, now, reason)

    def running_jobs(self) -> list[ProfileJob]:
        """The jobs pinning an engine now."""
        return [j for j in self.jobs.values() if j.running]

    # ------------------------------------------------------------------ hooks into the tick

    def controller_input(self, inp: ControllerInput) -> ControllerInput:
        """The controller's view: pinned GPUs as uncontrolled at the point's cap, pinned engines left out."""
        jobs = self.running_jobs()
        if not jobs:
            return inp
        pinned_caps = {i: job.point[0] for job in jobs for i in job.gpu_indices}
        pinned_engines = {job.spec.engine_id for job in jobs}
        gpus = tuple(
            replace(g, controlled=False, enforced_limit_w=pinned_caps[g.index], requested_limit_w=pinned_caps[g.index])
            if g.controlled and g.index in pinned_caps
            else g
            for g in inp.gpus
        )
        engines = tuple(e for e in inp.engines if e.engine_id not in pinned_engines)
        return replace(inp, gpus=gpus, engines=engines)

    def override(self, decision: Decision, inp: ControllerInput) -> Decision:
        """Add the pinned engines' caps and batch limits to the controller's decision; the budget still holds.

        ``inp`` is the tick's real input (not the controller's view). When the budget cannot hold a point, the
        pinned caps are lowered to fit and the job fails.
        """
        jobs = self.running_jobs()
        if not jobs:
            return decision
        gpus = {g.index: g for g in inp.gpus}
        observed = {e.engine_id: e for e in inp.engines}
        limits = dict(decision.gpu_limits_w)
        engines = dict(decision.engines)
        changed = decision.changed
        notes = []
        for job in jobs:
            cap_w, batch = job.point
            for i in job.gpu_indices:
                g = gpus.get(i)
                if g is None or not g.controlled:
                    continue
                limits[i] = cap_w
                changed = changed or abs(g.requested_limit_w - cap_w) > 0.5
            obs = observed.get(job.spec.engine_id)
            engines[job.spec.engine_id] = EngineDecision(
                engine_id=job.spec.engine_id,
                max_num_seqs=batch,
                max_num_batched_tokens=_batched_tokens(job.session, batch),
                predicted_tokens_per_s=0.0,
                predicted_power_w=0.0,
                has_profile=self._has_profile(job),
            )
            changed = changed or (obs is not None and obs.current_max_num_seqs != batch)
            notes.append(f"profiling {job.spec.engine_id}: point {job.index + 1}/{len(job.spec.points)}")
        budget_w = inp.budget_w
        if budget_w is not None:
            fixed_w = sum(g.enforced_limit_w for g in inp.gpus if not g.controlled)
            excess = sum(limits.values()) + fixed_w - budget_w
            if excess > _EPS_W:
                now = self.daemon.clock.now()
                for job in jobs:
                    own = [i for i in job.gpu_indices if i in limits and gpus.get(i) is not None]
                    for i in sorted(own, key=lambda k: limits[k] - gpus[k].min_limit_w, reverse=True):
                        if excess <= _EPS_W:
                            break
                        new = max(gpus[i].min_limit_w, math.floor(limits[i] - excess))
                        excess -= limits[i] - new
                        limits[i] = float(new)
                    cap_w, batch = job.point
                    job.finish(
                        JobState.FAILED,
                        now,
                        f"the budget in force ({budget_w:.0f} W) cannot hold point {job.index + 1} "
                        f"({cap_w:g} W x {len(job.gpu_indices)} GPUs, batch {batch}) with the other GPUs' "
                        "limits; pinned caps lowered to fit, profile abandoned",
                    )
                changed = True
                notes.append("profile abandoned: budget")
        reason = "; ".join([*notes, decision.reason]) if decision.reason else "; ".join(notes)
        # The profiled GPUs run at the point's lock (unlocked points: the driver's default clocks); the others
        # keep the controller's clock ceilings.
        pinned = {i for job in jobs for i in job.gpu_indices}
        clocks = {i: mhz for i, mhz in decision.gpu_locked_clocks_mhz.items() if i not in pinned}
        for job in jobs:
            if job.running and job.clock_mhz is not None:
                clocks.update({i: job.clock_mhz for i in job.gpu_indices})
        return Decision(
            gpu_limits_w=limits, engines=engines, changed=changed, reason=reason, gpu_locked_clocks_mhz=clocks
        )

    def after_tick(self, now_s: float, observations: Sequence[EngineObservation]) -> None:
        """Advance every running job by one tick (GPU readings and limits are this tick's)."""
        by_engine = {o.engine_id: o for o in observations}
        for job in self.running_jobs():
            try:
                self._advance(job, now_s, by_engine.get(job.spec.engine_id))
            except (OSError, ProfileError) as exc:
                job.finish(JobState.FAILED, now_s, f"could not write the profile: {exc}")

    def _advance(self, job: ProfileJob, now_s: float, obs: EngineObservation | None) -> None:
        d = self.daemon
        engine_id = job.spec.engine_id
        if d.engines.get(engine_id) is not job.session:
            job.finish(JobState.FAILED, now_s, f"engine {engine_id!r} disconnected")
            return
        slots = {g.identity.index: g for g in d.gpus}
        for i in job.gpu_indices:
            if not slots[i].controlled:
                job.finish(JobState.FAILED, now_s, f"GPU {i} is no longer controlled: {slots[i].fault}")
                return
        cap_w, batch = job.point
        if job.phase is Phase.DRAINING:
            wanted = [_clamped_mw(slots[i], cap_w) for i in job.gpu_indices]
            for i, mw in zip(job.gpu_indices, wanted, strict=True):
                ceiling_mw = slots[i].ceiling_mw(now_s)
                if ceiling_mw < mw:
                    # Someone else caps this GPU below the point: measuring would label the wrong cap.
                    job.finish(
                        JobState.FAILED,
                        now_s,
                        f"GPU {i} is capped at {mw_to_w(ceiling_mw):g} W by someone else; "
                        f"the point at {cap_w:g} W cannot be measured",
                    )
                    return
            enforced = all(
                slots[i].requested_limit_mw == mw and slots[i].reading.enforced_limit_mw == mw
                for i, mw in zip(job.gpu_indices, wanted, strict=True)
            ) and all(d.clocks.of(i).requested_max_mhz == job.clock_mhz for i in job.gpu_indices)
            drained = job.session.num_running <= batch
            timeout_s = max(MIN_DRAIN_TIMEOUT_S, 10 * job.spec.settle_s)
            if not (enforced and drained) and now_s - job.phase_start_s >= timeout_s:
                why = "the cap is not enforced" if not enforced else "running requests did not drain to the batch"
                job.warnings.append(f"point {cap_w:g} W, batch {batch}: measured although {why} after {timeout_s:g} s")
            elif not (enforced and drained):
                return
            job.phase, job.phase_start_s = Phase.SETTLING, now_s
        if job.phase is Phase.SETTLING:
            if now_s - job.phase_start_s < job.spec.settle_s:
                return
            job.phase, job.phase_start_s = Phase.HOLDING, now_s
            # The readings were taken at the start of this tick; telemetry from the next tick on counts.
            job.hold = _Hold(now_s, {i: slots[i].reading.energy_mj for i in job.gpu_indices})
            return
        hold = job.hold
        assert hold is not None
        running = max(job.session.num_running, obs.num_running if obs is not None else 0)
        if running > batch:
            job.retries += 1
            message = (
                f"point {cap_w:g} W, batch {batch}: the engine ran {running} requests during the hold "
                "(it did not apply the batch limit, or its directive expired)"
            )
            if job.retries > MAX_POINT_RETRIES:
                job.finish(JobState.FAILED, now_s, f"{message}; gave up after {MAX_POINT_RETRIES} retries")
                return
            job.warnings.append(f"{message}; measuring it again")
            job.hold = None
            job.phase, job.phase_start_s = Phase.DRAINING, now_s
            return
        if obs is not None:
            hold.decode_tokens += obs.decode_tokens
            hold.window_s += obs.window_s
            hold.ticks += 1
            hold.unsaturated_ticks += int(obs.num_running < batch)
        held_s = now_s - hold.start_s
        if held_s < job.spec.hold_s:
            return
        if hold.decode_tokens <= 0 or hold.window_s <= 0:
            job.finish(
                JobState.FAILED,
                now_s,
                f"no decode tokens while holding point {cap_w:g} W, batch {batch}: "
                "profiling needs the engine serving a load that saturates the batch",
            )
            return
        powers = []
        for i in job.gpu_indices:
            delta_mj = slots[i].reading.energy_mj - hold.energy_start_mj[i]
            if delta_mj <= 0:
                job.finish(JobState.FAILED, now_s, f"GPU {i}'s energy counter did not advance during the hold")
                return
            powers.append(mj_to_j(delta_mj) / held_s)
        result = PointResult(cap_w, batch, hold.decode_tokens / hold.window_s, sum(powers) / len(powers), job.clock_mhz)
        job.results.append(result)
        if hold.ticks and hold.unsaturated_ticks / hold.ticks > UNSATURATED_WARN_FRACTION:
            job.warnings.append(
                f"point {cap_w:g} W, batch {batch}: the engine ran fewer requests than the batch in "
                f"{hold.unsaturated_ticks}/{hold.ticks} ticks (load not saturating)"
            )
        log.info(
            "profile %s point %d/%d: %g W, batch %d, clock %s -> %.1f tokens/s, %.1f W per GPU",
            engine_id,
            job.index + 1,
            len(job.spec.points),
            cap_w,
            batch,
            "unlocked" if job.clock_mhz is None else f"{job.clock_mhz} MHz",
            result.tokens_per_s,
            result.gpu_power_w,
        )
        job.index += 1
        job.retries = 0
        job.hold = None
        job.phase, job.phase_start_s = Phase.DRAINING, now_s
        if job.index >= len(job.spec.points):
            self._write(job, now_s)
            job.finish(JobState.DONE, now_s)

    # ------------------------------------------------------------------ output

    def _output_path(self, requested: str, engine_id: str, gpu_name: str) -> Path:
        if not requested:
            return Path(self.daemon.config.state_dir) / "profiles" / f"{_slug(engine_id)}-{_slug(gpu_name)}.json"
        if "\0" in requested or not requested.isprintable() or len(requested) > 4096:
            raise InvalidRequestError("output_path must be a printable path")
        path = Path(requested)
        if not path.is_absolute() or path.suffix != ".json":
            raise InvalidRequestError(f"output_path {requested!r} must be an absolute path ending in .json")
        if not path.parent.is_dir():
            raise InvalidRequestError(f"output_path's directory {str(path.parent)!r} does not exist")
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise InvalidRequestError(f"output_path {requested!r} exists and is not a regular file")
        return path

    def _write(self, job: ProfileJob, now_s: float) -> None:
        """Build the profile, validate it with the loader's rules, write it atomically."""
        spec = job.spec
        d = self.daemon
        reg = job.session.registration
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        node = f"{socket.gethostname()} ({self.daemon.backend.name} backend)"
        data = {
            "schema": SCHEMA,
            "model": reg.model,
            "aliases": [],
            "gpu": job.gpu_name,
            "num_gpus": len(job.gpu_indices),
            "parallelism": spec.parallelism,
            "source": (
                f"measured online by pals-daemon on node {node}, engine {spec.engine_id} "
                f"(GPUs {list(job.gpu_indices)}), {date}"
            ),
            "method": "measured",
            "notes": (
                f"online sweep: settle {spec.settle_s:g} s and hold {spec.hold_s:g} s per point; throughput = "
                "engine decode tokens / reported window time; power = mean per-GPU energy-counter delta / hold"
                + (f"; warnings: {' | '.join(job.warnings)}" if job.warnings else "")
            ),
            "points": [_point_dict(p) for p in job.results if p.clock_mhz is None],
        }
        locked = [p for p in job.results if p.clock_mhz is not None]
        if locked:
            # The top clock's points are the unlocked ones at the clocks' cap (an unlocked GPU runs there).
            top_mhz = min(info.max_mhz for info in (d.clocks.of(i).info for i in job.gpu_indices) if info)
            cap_w = max(spec.caps_w)
            top = [replace(p, clock_mhz=top_mhz) for p in job.results if p.clock_mhz is None and p.cap_w == cap_w]
            data["clock_points"] = [_point_dict(p) for p in top + locked]
            data["notes"] += (
                f"; clock_points: the SM clock locked at {list(spec.clocks_mhz)} MHz at {cap_w:g} W; those at "
                f"{top_mhz} MHz (the top clock) repeat the unlocked points at that cap"
            )
        profile = profile_from_dict(data, origin=f"profile of {spec.engine_id}")
        _write_atomic(spec.output_path, dumps_profile(profile))
        log.info("profile of %s written to %s", spec.engine_id, spec.output_path)

    def _has_profile(self, job: ProfileJob) -> bool:
        controller = self.daemon.controller
        gpu_kind = getattr(controller.config, "gpu_kind", None)
        return controller.registry.find(job.session.registration.model, gpu_kind) is not None

    def _check_budget(self, spec: ProfileSpec, engine_gpus: Sequence[int]) -> None:
        d = self.daemon
        now = d.clock.now()
        budgets = [b for b in (d.budget.effective_w(now), d.budget.target_w) if b is not None]
        if not budgets:
            return
        budget_w = min(budgets)
        others_w = sum(
            mw_to_w(g.requested_limit_mw if g.controlled else g.reading.enforced_limit_mw)
            for g in d.gpus
            if g.identity.index not in engine_gpus
        )
        too_high = [c for c in spec.caps_w if c * len(engine_gpus) + others_w > budget_w + _EPS_W]
        if too_high:
            raise ProfileConflictError(
                f"caps {sorted(too_high)} W x {len(engine_gpus)} GPUs + {others_w:.0f} W of the other GPUs' "
                f"limits exceed the budget of {budget_w:.0f} W; lower the caps or raise the budget"
            )

    # ------------------------------------------------------------------ status

    def job_proto(self, job: ProfileJob) -> pals_pb2.ProfileJob:
        """The job as the API's ProfileJob."""
        now = self.daemon.clock.now()
        end = job.finished_s if job.finished_s is not None else now
        out = pals_pb2.ProfileJob(
            engine_id=job.spec.engine_id,
            state=job.state.value,
            points_done=len(job.results),
            points_total=len(job.spec.points),
            error=job.error,
            output_path=str(job.spec.output_path),
            elapsed_s=max(0.0, end - job.started_s),
            estimated_remaining_s=job.remaining_s(now),
            warnings=job.warnings,
        )
        if job.running:
            cap_w, batch = job.point
            out.current.CopyFrom(pals_pb2.ProfilePointResult(cap_w=cap_w, batch=batch, clock_mhz=job.clock_mhz))
            out.phase = job.phase.value
        for p in job.results:
            out.points.add(
                cap_w=p.cap_w,
                batch=p.batch,
                tokens_per_s=p.tokens_per_s,
                gpu_power_w=p.gpu_power_w,
                clock_mhz=p.clock_mhz,
            )
        return out


def _point_dict(p: PointResult) -> dict[str, object]:
    """A measured point as the profile's JSON object."""
    out: dict[str, object] = {"cap_w": int(p.cap_w) if float(p.cap_w).is_integer() else p.cap_w, "batch": p.batch}
    if p.clock_mhz is not None:
        out["clock_mhz"] = p.clock_mhz
    out |= {"tokens_per_s": round(p.tokens_per_s, 3), "gpu_power_w": round(p.gpu_power_w, 3)}
    return out


def _distinct(values: Sequence[float], name: str, unit: str) -> None:
    if len(set(values)) != len(values):
        raise InvalidRequestError(f"{name} lists a value twice: {list(values)}")
    if len(values) < 2:
        raise InvalidRequestError(
            f"{name} needs at least 2 values (a profile is a full grid of at least 2 caps x 2 batches), "
            f"got {list(values)}{' ' + unit if unit and values else ''}"
        )


def _batched_tokens(session: EngineSession, max_num_seqs: int) -> int:
    """The step token budget scaled with the batch limit, as the controller scales it."""
    reg = session.registration
    configured = reg.max_num_batched_tokens
    if configured < 1:
        return configured
    scaled = configured * max_num_seqs // max(1, reg.max_num_seqs)
    return int(min(max(scaled, max_num_seqs), configured))


def _clamped_mw(slot: GpuSlot, cap_w: float) -> int:
    """The limit the daemon writes for ``cap_w`` (as ``PowerLimitActuator.apply`` rounds and clamps it)."""
    c = slot.constraints
    return min(max(w_to_mw(cap_w), c.min_limit_mw), c.max_limit_mw)


def _slug(text: str) -> str:
    """A file-name-safe lower-case form: 'NVIDIA A100-SXM4-80GB' -> 'a100-sxm4-80gb'."""
    slug = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")
    slug = slug.removeprefix("nvidia-")
    return slug or "unknown"


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory, fsync'd, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # a profile is not secret (the daemon's umask is 0077)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
