"""The narrow GPU interface every backend implements (nvml, sim).

All calls are blocking and are made from one serial worker thread per GPU (see worker.py); a device object
never needs to be thread-safe against itself. Units are in the names: milliwatts, millijoules, MHz.
Errors are the typed ``pals_daemon.errors.Gpu*Error`` classes, never a backend's own exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# NVML clock-event (throttle) reason bit for the software power cap (nvml.h:
# nvmlClocksEventReasonSwPowerCap = 0x0000000000000004).
CLOCK_EVENT_SW_POWER_CAP = 0x4
# NVML clock-event reason bit "clocks are set to application-specific values" (nvml.h:
# nvmlClocksEventReasonApplicationsClocksSetting = 0x0000000000000002). NVML has no getter for locked clocks;
# this bit is how a clock setting made by someone else (nvidia-smi -lgc / -ac) shows while it holds the
# clock down (see pals_daemon/actuators/clock.py).
CLOCK_EVENT_APPLICATIONS_CLOCKS_SETTING = 0x2


@dataclass(frozen=True)
class GpuIdentity:
    """Which GPU: NVML index, UUID and marketing name."""

    index: int
    uuid: str
    name: str


@dataclass(frozen=True)
class PowerConstraints:
    """The power limits the driver accepts (inclusive) and its default limit, in milliwatts."""

    min_limit_mw: int
    max_limit_mw: int
    default_limit_mw: int

    def contains(self, limit_mw: int) -> bool:
        """True when ``limit_mw`` is a limit the driver accepts."""
        return self.min_limit_mw <= limit_mw <= self.max_limit_mw


@dataclass(frozen=True)
class GpuReading:
    """One sample of a GPU's power state."""

    # NVML's averaged power (GetPowerUsage: a 1 s average on Ampere except GA100, and newer).
    power_avg_mw: int
    # Instantaneous power (field NVML_FI_DEV_POWER_INSTANT); None where unsupported.
    power_instant_mw: int | None
    # Total energy since driver load (GetTotalEnergyConsumption); monotonic.
    energy_mj: int
    # The limit the driver enforces now (GetEnforcedPowerLimit), whoever set it.
    enforced_limit_mw: int
    # The limit requested through the management API (GetPowerManagementLimit).
    requested_limit_mw: int
    sm_clock_mhz: int
    # Clock-event reasons bitmask (GetCurrentClocksEventReasons).
    clock_event_reasons: int

    @property
    def power_capped(self) -> bool:
        """True when the software power cap is holding the clocks down."""
        return bool(self.clock_event_reasons & CLOCK_EVENT_SW_POWER_CAP)


@dataclass(frozen=True)
class ClockInfo:
    """What a GPU's SM clock can be locked to (MHz), read once at start-up."""

    # Supported graphics clocks at the highest supported memory clock, highest first
    # (GetSupportedMemoryClocks / GetSupportedGraphicsClocks).
    supported_sm_clocks_mhz: tuple[int, ...]
    # The applications clock target and its default (GetClock(GRAPHICS, APP_CLOCK_TARGET / APP_CLOCK_DEFAULT));
    # None where the driver does not report them.
    app_clock_mhz: int | None = None
    default_app_clock_mhz: int | None = None

    @property
    def min_mhz(self) -> int:
        """The lowest supported clock."""
        return min(self.supported_sm_clocks_mhz)

    @property
    def max_mhz(self) -> int:
        """The highest supported clock."""
        return max(self.supported_sm_clocks_mhz)

    def snap_down(self, mhz: int) -> int:
        """The highest supported clock at or below ``mhz`` (the lowest supported one when ``mhz`` is below all)."""
        below = [c for c in self.supported_sm_clocks_mhz if c <= mhz]
        return max(below) if below else self.min_mhz


class GpuDevice(Protocol):
    """One GPU. Blocking calls; called from that GPU's serial worker only."""

    identity: GpuIdentity

    def constraints(self) -> PowerConstraints:
        """Limit range and default limit."""
        ...

    def read(self) -> GpuReading:
        """Sample power, energy, limits, clock and clock-event reasons."""
        ...

    def set_power_limit_mw(self, limit_mw: int) -> int:
        """Request ``limit_mw`` and return the enforced limit read back afterwards."""
        ...

    def clock_info(self) -> ClockInfo:
        """Supported SM clocks and application clocks (GpuNotSupportedError where the GPU cannot tell)."""
        ...

    def set_locked_clocks_mhz(self, min_mhz: int, max_mhz: int) -> int:
        """Lock the SM clock into [min_mhz, max_mhz] (root); returns the SM clock read back afterwards."""
        ...

    def reset_locked_clocks(self) -> int:
        """Undo any locked SM clocks (back to the driver's default); returns the SM clock read back."""
        ...


class GpuBackend(Protocol):
    """Discovers GPUs and owns the library session."""

    name: str

    def open(self) -> list[GpuDevice]:
        """Initialise the library and return every GPU, ordered by index."""
        ...

    def close(self) -> None:
        """Release the library session (idempotent)."""
        ...

    def driver_version(self) -> str:
        """The GPU driver's version (e.g. "550.54.15"), recorded with each saved original limit; after open()."""
        ...
