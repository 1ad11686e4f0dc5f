"""The power-limit actuator: budget-ordered writes of the decided limits, external caps respected, originals
recorded before the first write and restored on every exit path."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pals_daemon.actuators.base import Actuator, ActuatorHost
from pals_daemon.control.types import Decision
from pals_daemon.errors import GpuError
from pals_daemon.gpu.backend import GpuDevice, GpuReading
from pals_daemon.state import DaemonState, OriginalLimit, origin_notes
from pals_daemon.tick import POWER_LIMIT, plan_settings
from pals_daemon.units import mw_to_w, w_to_mw

if TYPE_CHECKING:
    from pals_daemon.server.daemon import GpuSlot

log = logging.getLogger(__name__)

# An enforced limit this far below the daemon's request is someone else's cap, not rounding (chosen value:
# NVML limits are whole milliwatts; drivers enforce the requested value exactly when nothing else caps).
DRIFT_TOLERANCE_MW = 1000


class PowerLimitActuator(Actuator):
    """nvmlDeviceSetPowerManagementLimit: the hard bound under the node budget."""

    knob = "power_limit"

    def records(self, state: DaemonState) -> Mapping[str, OriginalLimit]:
        """The original-limit records."""
        return state.original_limits

    def without_record(self, state: DaemonState, uuid: str) -> DaemonState:
        """Drop a GPU's original-limit record."""
        return state.without_original(uuid)

    def restore_device(self, device: GpuDevice, record: OriginalLimit) -> str:
        """Write the original limit back; returns a line for the log."""
        enforced = device.set_power_limit_mw(record.limit_mw)
        return f"restored to {record.limit_mw} mW (enforced {enforced} mW)"

    def original_of(self, host: ActuatorHost, g: GpuSlot) -> OriginalLimit:
        """A record of ``g``'s limit now, as its original (call before the daemon's first write to it)."""
        return OriginalLimit(g.identity.index, g.requested_limit_mw, host.boot_id, host.driver_version)

    async def start(self, host: ActuatorHost) -> None:
        """Enforce mode: undo limits a crashed run left, then record every GPU's limit (first record wins)."""
        if host.enforcing:
            # Records left by a run that did not stop cleanly: put those GPUs back before control starts.
            await self._restore_recorded_limits(host)
            for g in (g for g in host.gpus if g.has_reading):
                # First one wins: a record left by a crashed run keeps the limit found before that run.
                host.state = host.state.with_original(g.identity.uuid, self.original_of(host, g))
        elif host.state.original_limits:
            log.warning(
                "advise mode: %d GPU(s) still have limits recorded by an earlier enforcing run; "
                "run 'pals-daemon restore' to put them back",
                len(host.state.original_limits),
            )

    async def _restore_recorded_limits(self, host: ActuatorHost) -> None:
        """Start-up: write each managed GPU back to a recorded original left by an earlier run; keep the records.

        A record is applied only to the GPU with its UUID (from an earlier boot too: the same board); one whose
        GPU is not managed here is kept for 'pals-daemon restore' and never applied to another GPU. The records
        stay: this run writes again, and they hold the limits found before any run touched the GPUs.
        """
        by_uuid = {g.identity.uuid: g for g in host.gpus}
        for uuid, original in sorted(host.state.original_limits.items(), key=lambda kv: kv[1].gpu_index):
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
            notes = origin_notes(original, host.boot_id, host.driver_version)
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
            g.reading = with_enforced(g.reading, enforced, original.limit_mw)
            log.warning(
                "GPU %d: found at %d mW after an earlier run did not stop cleanly; restored to its original %d mW "
                "(enforced %d mW) before control starts",
                g.identity.index,
                found_mw,
                original.limit_mw,
                enforced,
            )

    async def restore_all(self, host: ActuatorHost) -> list[str]:
        """Put every GPU back to its recorded original limit; returns the problems (empty when all restored)."""
        problems = []
        managed = {g.identity.uuid for g in host.gpus}
        for uuid in sorted(set(host.state.original_limits) - managed):
            log.warning("original limit of GPU %s is not restored by this daemon (not managed here); kept", uuid)
        for g in host.gpus:
            original = host.state.original_limits.get(g.identity.uuid)
            if original is None:
                continue
            try:
                if g.requested_limit_mw != original.limit_mw or g.reading.enforced_limit_mw != original.limit_mw:
                    await g.worker.set_power_limit_mw(original.limit_mw)
                g.requested_limit_mw = original.limit_mw
                host.state = host.state.without_original(g.identity.uuid)
            except GpuError as exc:
                problems.append(str(exc))
                log.error(
                    "could not restore GPU %d to %d mW (record kept for 'pals-daemon restore'): %s",
                    g.identity.index,
                    original.limit_mw,
                    exc,
                )
        try:
            host.store.save(host.state)
        except OSError as exc:  # the GPUs are restored; a stale record only restores again
            problems.append(f"state not saved after the restore: {exc}")
        return problems

    def decide(self, host: ActuatorHost, decision: Decision) -> None:
        """Each GPU's decided limit (the request in force where the decision names none)."""
        for g in host.gpus:
            g.decided_limit_w = decision.gpu_limits_w.get(g.identity.index, mw_to_w(g.requested_limit_mw))

    def observe(self, host: ActuatorHost, g: GpuSlot, now_s: float) -> None:
        """Notice a limit someone else set, from the latest reading; log once per new value.

        Two cases. Someone wrote the management limit itself (the value read back is not the daemon's): the
        daemon owns that setting while it runs, as the budget is a hard limit, so apply writes its own value
        back. The enforced limit is below the daemon's request (another tool's or an out-of-band cap): the
        daemon does not fight it; the GPU's ceiling becomes that cap, so the controller gives the watts it
        cannot draw to the other GPUs, and the request stays under the cap, so lifting the cap cannot push the
        node over budget.
        """
        r, index = g.reading, g.identity.index
        if not host.enforcing:
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

    async def apply(self, host: ActuatorHost, decision: Decision, now_s: float) -> None:
        """Set the decided limits: every decrease first, then the increases, so the sum stays in budget.

        An enforced limit below the request (someone else's cap) is no reason to write: only a new decision
        or a management limit overwritten by someone else is.
        """
        # What to write and in which order: the tick pipeline's plan, shared with pals-replay.
        plan = plan_settings(host.gpus, decision, now_s, knobs=(POWER_LIMIT,))
        if not plan.writes:
            return
        by_index = {g.identity.index: g for g in host.gpus}
        if any(by_index[w.gpu_index].identity.uuid not in host.state.original_limits for w in plan.writes):
            # Never write a GPU whose original limit is not on disk.
            for w in plan.writes:
                g = by_index[w.gpu_index]
                host.state = host.state.with_original(g.identity.uuid, self.original_of(host, g))
            host.store.save(host.state)
        decreases = [(by_index[w.gpu_index], w.value) for w in plan.lowering]
        increases = [(by_index[w.gpu_index], w.value) for w in plan.raising]
        for batch in (decreases, increases):
            results = await asyncio.gather(
                *(g.worker.set_power_limit_mw(mw) for g, mw in batch), return_exceptions=True
            )
            failed = False
            for (g, mw), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    host.gpu_failed(g, result)
                    failed = True
                    continue
                g.requested_limit_mw = mw
                g.reading = with_enforced(g.reading, int(result), mw)
                self.observe(host, g, now_s)
            if failed and batch is decreases:
                # The increases were sized on these decreases: skip them, and lower the others now if the
                # GPU that refused leaves the node over budget (the next tick re-plans around it).
                if increases:
                    log.warning("a decrease failed: %d increase(s) deferred to the next tick", len(increases))
                await self._repair_budget(host, now_s)
                return

    async def _repair_budget(self, host: ActuatorHost, now_s: float) -> None:
        """Lower controlled GPUs (largest headroom first) until the limits in force fit the budget again."""
        budget_w = host.budget.effective_w(now_s)
        if budget_w is None:
            return
        excess_mw = sum(g.requested_limit_mw if g.controlled else g.accounted_limit_mw() for g in host.gpus)
        excess_mw -= w_to_mw(budget_w)
        cuts = []
        for g in sorted(
            (g for g in host.gpus if g.controlled),
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
                host.gpu_failed(g, result)
                continue
            g.requested_limit_mw = mw
            g.decided_limit_w = mw_to_w(mw)
            g.reading = with_enforced(g.reading, int(result), mw)
            self.observe(host, g, now_s)


def with_enforced(reading: GpuReading, enforced_mw: int, requested_mw: int) -> GpuReading:
    """``reading`` with the limits just written and read back."""
    return GpuReading(
        power_avg_mw=reading.power_avg_mw,
        power_instant_mw=reading.power_instant_mw,
        energy_mj=reading.energy_mj,
        enforced_limit_mw=enforced_mw,
        requested_limit_mw=requested_mw,
        sm_clock_mhz=reading.sm_clock_mhz,
        clock_event_reasons=reading.clock_event_reasons,
    )
