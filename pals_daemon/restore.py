"""``pals-daemon restore``: put every GPU back to the settings recorded in the state file, knob by knob.

systemd runs it as ExecStopPost after any exit of the daemon (SIGKILL and watchdog included), so it must
work with no daemon running: it opens the backend itself, restores through each actuator (power limits, then
locked clocks), and drops each record it restored. A record is applied only to the GPU with its UUID: one from
an earlier boot still names the same board (and is applied, with a note), one whose GPU is absent is kept and
reported, never applied to another GPU. Clock records are reset even where ``[clocks] enabled = false``: a
clock a crashed run left locked is undone whatever the switch says now.
"""

from __future__ import annotations

import logging

from pals_daemon.actuators import all_actuators
from pals_daemon.errors import GpuError, PalsError
from pals_daemon.gpu.backend import GpuBackend
from pals_daemon.state import StateStore, current_boot_id, origin_notes

log = logging.getLogger(__name__)


def restore_originals(backend: GpuBackend, store: StateStore) -> list[str]:
    """Restore every recorded original setting; returns the problems (empty when everything was restored)."""
    state = store.load()
    actuators = all_actuators()
    if not any(a.records(state) for a in actuators):
        return []
    problems = []
    try:
        devices = {d.identity.uuid: d for d in backend.open()}
    except PalsError as exc:
        return [f"cannot open GPUs: {exc}"]
    try:
        boot_id = current_boot_id()
        try:
            driver_version: str | None = backend.driver_version()
        except GpuError as exc:
            log.warning("cannot read the driver version: %s", exc)
            driver_version = None
        for actuator in actuators:
            for uuid, original in sorted(actuator.records(state).items(), key=lambda kv: kv[1].gpu_index):
                device = devices.get(uuid)
                if device is None:
                    problems.append(f"GPU {uuid} (index {original.gpu_index}) not found; record kept ({actuator.knob})")
                    continue
                notes = origin_notes(original, boot_id, driver_version)
                if notes:
                    log.warning("GPU %s: %s record %s; applied by UUID", uuid, actuator.knob, "; ".join(notes))
                try:
                    done = actuator.restore_device(device, original)
                except GpuError as exc:
                    problems.append(f"GPU {original.gpu_index} ({uuid}): {exc}; record kept ({actuator.knob})")
                    continue
                log.info("GPU %d (%s) %s", device.identity.index, uuid, done)
                state = actuator.without_record(state, uuid)
                store.save(state)
    finally:
        backend.close()
    return problems
