"""The small interface every hardware knob implements, and what it needs from the daemon.

An actuator owns one setting of every GPU: it reads the setting in force from each tick's reading
(``observe``), takes the controller's per-GPU choice (``decide``) and writes it in enforce mode (``apply``),
records the setting found before the daemon's first write in the state file before that write, and puts it
back on every exit path: ``restore_all`` on a clean stop, ``start`` after a crash, ``restore_device`` from
``pals-daemon restore`` with no daemon running. A new knob (memory clocks, workload power profiles) is one new
subclass added to ``all_actuators``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from pals_daemon.control.types import Decision
from pals_daemon.gpu.backend import GpuDevice
from pals_daemon.state import DaemonState, StateStore

if TYPE_CHECKING:
    from pals_daemon.control.budget import BudgetSchedule
    from pals_daemon.server.daemon import GpuSlot


class ActuatorHost(Protocol):
    """The daemon, as the actuators see it."""

    gpus: list[GpuSlot]
    state: DaemonState
    store: StateStore
    budget: BudgetSchedule
    boot_id: str | None
    driver_version: str | None

    @property
    def enforcing(self) -> bool:
        """True in enforce mode: only then does an actuator write."""
        ...

    def gpu_failed(self, g: GpuSlot, exc: BaseException) -> None:
        """A call on ``g`` failed: retry later, or stop controlling the GPU when the error is fatal."""
        ...


class Actuator(abc.ABC):
    """One hardware knob of every GPU."""

    # Short name for logs and problems ("power_limit", "locked_clock").
    knob: str = ""

    @abc.abstractmethod
    async def start(self, host: ActuatorHost) -> None:
        """Start-up, after the GPUs were read: restore what a crashed run left (enforce mode), record originals."""

    def observe(self, host: ActuatorHost, g: GpuSlot, now_s: float) -> None:  # noqa: B027 - optional hook
        """A new reading of ``g`` arrived: notice a setting someone else made."""

    def decide(self, host: ActuatorHost, decision: Decision) -> None:  # noqa: B027 - optional hook
        """Note the controller's choice (shown in status in both modes; written only by ``apply``)."""

    @abc.abstractmethod
    async def apply(self, host: ActuatorHost, decision: Decision, now_s: float) -> None:
        """Enforce mode: write the decided setting, its original recorded on disk before the first write."""

    @abc.abstractmethod
    async def restore_all(self, host: ActuatorHost) -> list[str]:
        """Put every managed GPU back to its recorded original; returns the problems (records kept for them)."""

    @abc.abstractmethod
    def records(self, state: DaemonState) -> Mapping[str, Any]:
        """This knob's original-setting records in ``state``, keyed by GPU UUID (each has ``gpu_index``)."""

    @abc.abstractmethod
    def without_record(self, state: DaemonState, uuid: str) -> DaemonState:
        """``state`` without the record of GPU ``uuid`` (after it was restored)."""

    @abc.abstractmethod
    def restore_device(self, device: GpuDevice, record: Any) -> str:
        """Blocking, without a daemon (``pals-daemon restore``): put ``device`` back; returns what was done.

        Raises GpuError when the device refuses (the caller keeps the record).
        """
