"""``pals-daemon restore``: put every GPU back to the limit recorded in the state file.

systemd runs it as ExecStopPost after any exit of the daemon (SIGKILL and watchdog included), so it must
work with no daemon running: it opens the backend itself, restores, and drops each record it restored.
A record is applied only to the GPU with its UUID: one from an earlier boot still names the same board (and
is applied, with a note), one whose GPU is absent is kept and reported, never applied to another GPU.
"""

from __future__ import annotations

import logging

from pals_daemon.cluster.plan import exit_limits_mw
from pals_daemon.errors import GpuError, PalsError
from pals_daemon.gpu.backend import GpuBackend, GpuDevice
from pals_daemon.state import DaemonState, StateStore, current_boot_id, origin_notes

log = logging.getLogger(__name__)


def restore_originals(backend: GpuBackend, store: StateStore, cluster_mode: bool = False) -> list[str]:
    """Restore every recorded original limit; returns the problems (empty when everything was restored).

    ``cluster_mode``: each GPU gets at most its share of the budget in force (the node's last cluster grant,
    ``exit_limits_mw``) and its record is kept while that is below the original (README "Running a fleet").
    """
    state = store.load()
    if not state.original_limits:
        return []
    problems = []
    try:
        devices = {d.identity.uuid: d for d in backend.open()}
    except PalsError as exc:
        return [f"cannot open GPUs: {exc}"]
    try:
        targets = _targets_mw(devices, state, cluster_mode)
        boot_id = current_boot_id()
        try:
            driver_version: str | None = backend.driver_version()
        except GpuError as exc:
            log.warning("cannot read the driver version: %s", exc)
            driver_version = None
        for uuid, original in sorted(state.original_limits.items(), key=lambda kv: kv[1].gpu_index):
            device = devices.get(uuid)
            if device is None:
                problems.append(f"GPU {uuid} (index {original.gpu_index}) not found; record kept")
                continue
            notes = origin_notes(original, boot_id, driver_version)
            if notes:
                log.warning("GPU %s: record %s; applied by UUID", uuid, "; ".join(notes))
            target_mw = targets.get(uuid, original.limit_mw)
            try:
                enforced = device.set_power_limit_mw(target_mw)
            except GpuError as exc:
                problems.append(f"GPU {original.gpu_index} ({uuid}): {exc}; record kept")
                continue
            log.info(
                "GPU %d (%s) restored to %d mW (original %d mW; enforced %d mW)",
                device.identity.index,
                uuid,
                target_mw,
                original.limit_mw,
                enforced,
            )
            if target_mw != original.limit_mw:
                continue  # held within the cluster grant: the original stays on record
            state = state.without_original(uuid)
            store.save(state)
    finally:
        backend.close()
    return problems


def _targets_mw(devices: dict[str, GpuDevice], state: DaemonState, cluster_mode: bool) -> dict[str, int]:
    """Per recorded GPU present here: its original, or in cluster mode its share of the persisted budget."""
    present = [(uuid, devices[uuid]) for uuid in sorted(state.original_limits) if uuid in devices]
    originals = [state.original_limits[uuid].limit_mw for uuid, _ in present]
    if not cluster_mode or state.budget_w is None:
        return {uuid: o for (uuid, _), o in zip(present, originals, strict=True)}
    try:
        constraints = [d.constraints() for _, d in present]
    except GpuError as exc:
        log.error("cannot read the GPUs' limit ranges (%s): leaving the originals", exc)
        return {uuid: o for (uuid, _), o in zip(present, originals, strict=True)}
    limits = exit_limits_mw(
        [c.min_limit_mw for c in constraints], [c.max_limit_mw for c in constraints], originals, state.budget_w
    )
    return {uuid: mw for (uuid, _), mw in zip(present, limits, strict=True)}
