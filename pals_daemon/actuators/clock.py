"""The locked-clock actuator: a per-GPU SM clock ceiling (nvmlDeviceSetGpuLockedClocks), beside the power cap.

On Hopper, LLM decode draws far below the power limit, so a cap at or above the minimum limit rarely binds;
the clock does. The controller puts a ceiling per GPU into its decision (``Decision.gpu_locked_clocks_mhz``;
absent or None: unlocked). The daemon locks the range [lowest supported clock, ceiling] (the driver may still
clock lower, e.g. when idle), snapped down to a supported clock; a ceiling at the top clock is written as
"unlocked" (a reset), not as a lock. The clock never bounds power: the power limit stays the hard bound.

Safety, as for power limits: a GPU's record ("clocks at the driver default") is on disk before its first lock
and dropped only once its clocks were reset, so every exit path resets them. Each GPU is in one of these states:

* controllable: the daemon may lock it;
* off, with a note saying why: ``[clocks] enabled = false``; the GPU lists no clocks or refuses a lock
  (NOT_SUPPORTED: cap-only control); no permission; or someone else's clock setting.

Someone else's setting: NVML offers no getter of locked clocks. What it offers is the clock-event reason
nvmlClocksEventReasonApplicationsClocksSetting (0x2), active while an applications-clock or locked-clock
setting holds the clock down, and the applications clock target against its default (nvmlDeviceGetClock
APP_CLOCK_TARGET / APP_CLOCK_DEFAULT). The daemon treats the reason bit seen while it holds no lock on the GPU,
or a changed applications clock, as an operator's setting; and an SM clock above the daemon's own ceiling as its
lock reset or replaced by someone else. Either way it stops locking that GPU for the rest of the run and never
resets it (its record is dropped without a write). Limits, stated: a lock that does not hold the clock down
(an idle GPU, a ceiling above the clock the GPU runs at) shows no reason bit and is not seen; and a reset after
a crash (start-up, ``pals-daemon restore``) cannot tell a lock set meanwhile by an operator from the daemon's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pals_daemon.actuators.base import Actuator, ActuatorHost
from pals_daemon.control.types import Decision
from pals_daemon.errors import (
    GpuError,
    GpuFatalError,
    GpuInvalidArgumentError,
    GpuNotSupportedError,
    GpuPermissionError,
)
from pals_daemon.gpu.backend import CLOCK_EVENT_APPLICATIONS_CLOCKS_SETTING, ClockInfo, GpuDevice
from pals_daemon.state import DaemonState, OriginalClock, origin_notes
from pals_daemon.tick import locked_clock_target

if TYPE_CHECKING:
    from pals_daemon.server.daemon import GpuSlot

log = logging.getLogger(__name__)

# An SM clock this far above the daemon's own ceiling means its lock is gone (chosen: two 15 MHz clock steps,
# so a read racing the lock's settling is not mistaken for it).
LOCK_TOLERANCE_MHZ = 30
DISABLED_NOTE = "clock control disabled ([clocks] enabled = false)"
# Errors after which the GPU keeps cap-only control: retrying cannot help.
_CAP_ONLY_ERRORS = (GpuNotSupportedError, GpuPermissionError, GpuInvalidArgumentError)


@dataclass
class ClockGpu:
    """The clock knob of one GPU."""

    info: ClockInfo | None = None
    # Why the daemon does not lock this GPU's clock; "" while it may.
    note: str = ""
    # The ceiling the daemon locked (None: it holds no lock on this GPU).
    requested_max_mhz: int | None = None
    # The controller's ceiling this tick (None: unlocked), snapped to a supported clock.
    decided_max_mhz: int | None = None
    # Someone else's clock setting was seen on this GPU.
    external: bool = False

    @property
    def controllable(self) -> bool:
        """True when the daemon may lock this GPU's clock."""
        return self.info is not None and not self.note


class LockedClockActuator(Actuator):
    """nvmlDeviceSetGpuLockedClocks / nvmlDeviceResetGpuLockedClocks: a per-GPU SM clock ceiling."""

    knob = "locked_clock"

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        # By GPU index.
        self.gpus: dict[int, ClockGpu] = {}

    def records(self, state: DaemonState) -> Mapping[str, OriginalClock]:
        """The clock records."""
        return state.original_clocks

    def without_record(self, state: DaemonState, uuid: str) -> DaemonState:
        """Drop a GPU's clock record."""
        return state.without_original_clock(uuid)

    def restore_device(self, device: GpuDevice, record: OriginalClock) -> str:
        """Reset the locked clocks; returns a line for the log."""
        in_force = device.reset_locked_clocks()
        return f"locked clocks reset (SM clock {in_force} MHz)"

    def of(self, index: int) -> ClockGpu:
        """The clock state of GPU ``index`` (a blank one for a GPU the actuator never saw)."""
        return self.gpus.get(index) or ClockGpu(note="not started")

    async def start(self, host: ActuatorHost) -> None:
        """Read each GPU's clocks; enforce mode: reset clocks a crashed run left locked; detect others' settings."""
        for g in host.gpus:
            st = self.gpus[g.identity.index] = ClockGpu()
            if not self.enabled:
                st.note = DISABLED_NOTE
            elif not g.has_reading:
                st.note = "GPU failed at start-up"
            else:
                try:
                    st.info = await g.worker.clock_info()
                except GpuError as exc:
                    st.note = f"supported clocks unreadable, cap-only control: {exc}"
                    log.warning("GPU %d: %s", g.identity.index, st.note)
            record = host.state.original_clocks.get(g.identity.uuid)
            if record is not None and host.enforcing:
                # Left locked by a run that did not stop cleanly: reset before control starts (even when the
                # knob is now disabled). The record goes once reset: this run records again before locking.
                await self._reset_leftover(host, g, record)
            elif record is not None:
                # Advise mode writes nothing: the leftover lock stays (and is not taken for an operator's).
                st.note = st.note or "clocks left locked by an earlier enforcing run; run 'pals-daemon restore'"
            elif st.info is not None and (reason := _external_setting(st.info, g.reading.clock_event_reasons)):
                self._mark_external(g, st, reason)
        if not host.enforcing and host.state.original_clocks:
            log.warning(
                "advise mode: %d GPU(s) still have clocks locked by an earlier enforcing run; "
                "run 'pals-daemon restore' to reset them",
                len(host.state.original_clocks),
            )
        managed = {g.identity.uuid for g in host.gpus}
        for uuid in sorted(set(host.state.original_clocks) - managed):
            log.warning("clocks of GPU %s locked by an earlier run: not managed here; record kept", uuid)

    async def _reset_leftover(self, host: ActuatorHost, g: GpuSlot, record: OriginalClock) -> None:
        notes = origin_notes(record, host.boot_id, host.driver_version)
        if notes:
            log.warning("GPU %d: clock record %s; applied by UUID", g.identity.index, "; ".join(notes))
        try:
            in_force = await g.worker.reset_locked_clocks()
        except GpuError as exc:
            log.error("GPU %d: cannot reset clocks locked by an earlier run (record kept): %s", g.identity.index, exc)
            self.gpus[g.identity.index].note = f"clocks left locked by an earlier run could not be reset: {exc}"
            return
        host.state = host.state.without_original_clock(g.identity.uuid)
        host.store.save(host.state)
        log.warning(
            "GPU %d: clocks left locked by an earlier run that did not stop cleanly; reset (SM clock %d MHz)",
            g.identity.index,
            in_force,
        )

    def _mark_external(self, g: GpuSlot, st: ClockGpu, reason: str) -> None:
        if not st.external:
            log.warning("GPU %d: %s; the daemon leaves this GPU's clocks alone (cap-only control)", g.identity.index,
                        reason)
        st.external = True
        st.note = f"clocks set by someone else ({reason}); left alone"

    def observe(self, host: ActuatorHost, g: GpuSlot, now_s: float) -> None:
        """Notice someone else's clock setting, or the daemon's lock reset or replaced."""
        st = self.gpus.get(g.identity.index)
        if st is None or not st.controllable:  # off for another reason (or already marked): nothing to guard
            return
        r = g.reading
        if st.requested_max_mhz is None:
            if r.clock_event_reasons & CLOCK_EVENT_APPLICATIONS_CLOCKS_SETTING:
                self._mark_external(g, st, "applications-clocks-setting reason active while the daemon holds no lock")
        elif r.sm_clock_mhz > st.requested_max_mhz + LOCK_TOLERANCE_MHZ:
            self._mark_external(
                g, st, f"SM clock {r.sm_clock_mhz} MHz above the daemon's {st.requested_max_mhz} MHz lock"
            )
            # The operator's setting wins: no reset at exit, so the record goes (nothing of ours to undo).
            st.requested_max_mhz = None
            if g.identity.uuid in host.state.original_clocks:
                host.state = host.state.without_original_clock(g.identity.uuid)
                host.store.save(host.state)

    def decide(self, host: ActuatorHost, decision: Decision) -> None:
        """Each GPU's decided ceiling, snapped down to a supported clock; the top clock counts as unlocked."""
        for g in host.gpus:
            st = self.gpus.get(g.identity.index)
            if st is not None:
                st.decided_max_mhz = self._target(st, decision.gpu_locked_clocks_mhz.get(g.identity.index))

    @staticmethod
    def _target(st: ClockGpu, want_mhz: int | None) -> int | None:
        return None if st.info is None else locked_clock_target(st.info, want_mhz)

    async def apply(self, host: ActuatorHost, decision: Decision, now_s: float) -> None:
        """Lock (or reset) each controllable GPU whose decided ceiling differs from the one in force."""
        changes = []
        for g in host.gpus:
            st = self.gpus.get(g.identity.index)
            if st is None or not st.controllable or not g.controlled:
                continue
            target = self._target(st, decision.gpu_locked_clocks_mhz.get(g.identity.index))
            if target != st.requested_max_mhz:
                changes.append((g, st, target))
        if not changes:
            return
        recorded = host.state.original_clocks
        new = [g for g, _, target in changes if target is not None and g.identity.uuid not in recorded]
        if new:
            # Never lock a GPU whose clock record is not on disk.
            for g in new:
                host.state = host.state.with_original_clock(
                    g.identity.uuid, OriginalClock(g.identity.index, host.boot_id, host.driver_version)
                )
            host.store.save(host.state)
        results = await asyncio.gather(
            *(
                g.worker.reset_locked_clocks()
                if target is None
                else g.worker.set_locked_clocks_mhz(st.info.min_mhz, target)  # type: ignore[union-attr]
                for g, st, target in changes
            ),
            return_exceptions=True,
        )
        dirty = False
        for (g, st, target), result in zip(changes, results, strict=True):
            if isinstance(result, BaseException):
                dirty |= self._failed(host, g, st, target, result)
                continue
            st.requested_max_mhz = target
            if target is None:
                host.state = host.state.without_original_clock(g.identity.uuid)
                dirty = True
        if dirty:
            host.store.save(host.state)

    def _failed(self, host: ActuatorHost, g: GpuSlot, st: ClockGpu, target: int | None, exc: BaseException) -> bool:
        """Handle a failed lock/reset; True when the state changed (to be saved)."""
        what = "reset the locked clocks" if target is None else f"lock the SM clock at {target} MHz"
        if isinstance(exc, _CAP_ONLY_ERRORS):
            st.note = f"cannot {what}: {exc}; cap-only control"
            log.error("GPU %d: %s", g.identity.index, st.note)
            if st.requested_max_mhz is None and g.identity.uuid in host.state.original_clocks:
                # Nothing was locked: the record has nothing to undo.
                host.state = host.state.without_original_clock(g.identity.uuid)
                return True
            return False
        if isinstance(exc, GpuFatalError):
            host.gpu_failed(g, exc)
        else:
            log.warning("GPU %d: cannot %s (retrying next tick): %s", g.identity.index, what, exc)
        return False

    async def restore_all(self, host: ActuatorHost) -> list[str]:
        """Reset the clocks of every managed GPU the daemon locked; returns the problems (records kept)."""
        problems = []
        by_uuid = {g.identity.uuid: g for g in host.gpus}
        for uuid in sorted(host.state.original_clocks):
            g = by_uuid.get(uuid)
            if g is None:
                log.warning("clocks of GPU %s are not reset by this daemon (not managed here); record kept", uuid)
                continue
            try:
                await g.worker.reset_locked_clocks()
            except GpuError as exc:
                problems.append(str(exc))
                log.error("could not reset the clocks of GPU %d (record kept for 'pals-daemon restore'): %s",
                          g.identity.index, exc)
                continue
            host.state = host.state.without_original_clock(uuid)
            st = self.gpus.get(g.identity.index)
            if st is not None:
                st.requested_max_mhz = None
        try:
            host.store.save(host.state)
        except OSError as exc:  # the GPUs are restored; a stale record only restores again
            problems.append(f"state not saved after the restore: {exc}")
        return problems


def _external_setting(info: ClockInfo, reasons: int) -> str:
    """Why the clocks look set by someone else at start-up ("" when they do not)."""
    if reasons & CLOCK_EVENT_APPLICATIONS_CLOCKS_SETTING:
        return "applications-clocks-setting reason active at start-up"
    if info.app_clock_mhz is not None and info.default_app_clock_mhz is not None:
        if info.app_clock_mhz != info.default_app_clock_mhz:
            return f"applications clock {info.app_clock_mhz} MHz, default {info.default_app_clock_mhz} MHz"
    return ""
