"""The NVML backend: power caps, locked SM clocks and power/energy readings through nvidia-ml-py (``pynvml``).

Every pynvml call goes through ``_call``, which turns pynvml's errors into the typed errors of
``pals_daemon.errors`` through one table (``_ERROR_TABLE``) and tags them with the GPU index: no pynvml
exception leaves this module. Calls block; the daemon makes them from one serial worker per GPU (worker.py).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Sequence
from typing import Any

import pynvml

from pals_daemon.errors import (
    GpuError,
    GpuInvalidArgumentError,
    GpuLibraryError,
    GpuLostError,
    GpuNotSupportedError,
    GpuPermissionError,
    GpuResetRequiredError,
    GpuTransientError,
)
from pals_daemon.gpu.backend import ClockInfo, GpuDevice, GpuIdentity, GpuReading, PowerConstraints

# NVML return code -> typed error; the only such table. Values are nvmlReturn_t from nvml.h (pynvml mirrors
# them as NVML_ERROR_*). A code not listed here (TIMEOUT 10, IN_USE 19, UNKNOWN 999, ...) is worth retrying:
# GpuTransientError.
_ERROR_TABLE: dict[int, type[GpuError]] = {
    pynvml.NVML_ERROR_INVALID_ARGUMENT: GpuInvalidArgumentError,  # 2
    pynvml.NVML_ERROR_NOT_SUPPORTED: GpuNotSupportedError,  # 3
    pynvml.NVML_ERROR_NO_PERMISSION: GpuPermissionError,  # 4
    pynvml.NVML_ERROR_GPU_IS_LOST: GpuLostError,  # 15
    pynvml.NVML_ERROR_RESET_REQUIRED: GpuResetRequiredError,  # 16
    # The library itself is unusable; retrying cannot help.
    pynvml.NVML_ERROR_UNINITIALIZED: GpuLibraryError,  # 1
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: GpuLibraryError,  # 9
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: GpuLibraryError,  # 12
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: GpuLibraryError,  # 13
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: GpuLibraryError,  # 18: library and kernel module differ
}
_ERROR_NAMES: dict[int, str] = {getattr(pynvml, name): name for name in dir(pynvml) if name.startswith("NVML_ERROR_")}

# #define NVML_FI_DEV_POWER_INSTANT 186 (nvml.h); defined here as older pynvml releases lack it.
FI_DEV_POWER_INSTANT = 186
# nvmlValueType_t (nvml.h) -> the nvmlValue_t union member holding the value.
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
# Newest name first: nvmlDeviceGetCurrentClocksThrottleReasons was renamed ...EventReasons (driver 535) and
# is deprecated; an older driver lacks the new symbol.
_CLOCK_REASON_FUNCTIONS = tuple(
    name
    for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
    if hasattr(pynvml, name)
)


# Optional getters: a driver without them answers one of these, which means "not reported", not a failure.
_ABSENT = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND})


def _mhz(value: object, what: str, gpu_index: int) -> int:
    """``value`` as a clock in MHz: a positive int (bool excluded), else GpuInvalidArgumentError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) <= 0:
        raise GpuInvalidArgumentError(f"{what} must be a positive integer of MHz, got {value!r}", gpu_index)
    return int(value)


def _error(code: int, op: str, gpu_index: int | None) -> GpuError:
    """The typed error for NVML return ``code`` from ``op``."""
    cls = _ERROR_TABLE.get(code, GpuTransientError)
    return cls(f"{op}: {_ERROR_NAMES.get(code, 'NVML error')} ({code})", gpu_index)


def _call(op: str, gpu_index: int | None, *args: Any, tolerate: frozenset[int] = frozenset()) -> Any:
    """``pynvml.<op>(*args)`` with errors translated; returns None for a code in ``tolerate``."""
    try:
        return getattr(pynvml, op)(*args)
    except pynvml.NVMLError as exc:
        code = int(exc.value)
        if code in tolerate:
            return None
        raise _error(code, op, gpu_index) from exc
    except pynvml.NVMLLibraryMismatchError as exc:
        raise GpuLibraryError(f"{op}: {exc}", gpu_index) from exc


def _to_str(value: str | bytes) -> str:
    """pynvml returns str on Python 3 (convertStrBytes), bytes in older releases."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class NvmlDevice:
    """One GPU behind NVML."""

    def __init__(self, identity: GpuIdentity, handle: Any) -> None:
        self.identity = identity
        self._handle = handle
        self._constraints: PowerConstraints | None = None
        self._clock_info: ClockInfo | None = None
        self._reason_functions = _CLOCK_REASON_FUNCTIONS

    def _call(self, op: str, *args: Any, tolerate: frozenset[int] = frozenset()) -> Any:
        return _call(op, self.identity.index, self._handle, *args, tolerate=tolerate)

    def constraints(self) -> PowerConstraints:
        """Limit range and default limit (mW), queried from the driver and cached for set_power_limit_mw."""
        min_mw, max_mw = self._call("nvmlDeviceGetPowerManagementLimitConstraints")
        default_mw = self._call("nvmlDeviceGetPowerManagementDefaultLimit")
        self._constraints = PowerConstraints(int(min_mw), int(max_mw), int(default_mw))
        return self._constraints

    def read(self) -> GpuReading:
        """Sample power, energy, limits, SM clock and clock-event reasons (any failure raises)."""
        return GpuReading(
            power_avg_mw=int(self._call("nvmlDeviceGetPowerUsage")),
            power_instant_mw=self._instant_power_mw(),
            energy_mj=int(self._call("nvmlDeviceGetTotalEnergyConsumption")),
            enforced_limit_mw=int(self._call("nvmlDeviceGetEnforcedPowerLimit")),
            requested_limit_mw=int(self._call("nvmlDeviceGetPowerManagementLimit")),
            sm_clock_mhz=int(self._call("nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_SM)),
            clock_event_reasons=self._clock_event_reasons(),
        )

    def set_power_limit_mw(self, limit_mw: int) -> int:
        """Request ``limit_mw`` (checked against the constraints first) and return the enforced limit."""
        index = self.identity.index
        # bool is an int subclass; True must not become a 1 mW cap.
        if isinstance(limit_mw, bool) or not isinstance(limit_mw, numbers.Integral):
            raise GpuInvalidArgumentError(f"power limit must be an integer of mW, got {limit_mw!r}", index)
        limit_mw = int(limit_mw)
        constraints = self._constraints or self.constraints()
        if not constraints.contains(limit_mw):
            raise GpuInvalidArgumentError(
                f"power limit {limit_mw} mW outside [{constraints.min_limit_mw}, {constraints.max_limit_mw}] mW",
                index,
            )
        self._call("nvmlDeviceSetPowerManagementLimit", limit_mw)
        # Another tool's lower cap wins: report what the driver enforces, not what was asked.
        return int(self._call("nvmlDeviceGetEnforcedPowerLimit"))

    def clock_info(self) -> ClockInfo:
        """Supported SM clocks at the highest memory clock, and the applications clocks (cached for the setter).

        GpuNotSupportedError where the driver lists no clocks (the GPU then keeps cap-only control).
        """
        index = self.identity.index
        memory_mhz = [int(c) for c in self._call("nvmlDeviceGetSupportedMemoryClocks")]
        if not memory_mhz:
            raise GpuNotSupportedError("the driver lists no supported memory clocks", index)
        graphics_mhz = self._call("nvmlDeviceGetSupportedGraphicsClocks", max(memory_mhz))
        supported = tuple(sorted({int(c) for c in graphics_mhz if int(c) > 0}, reverse=True))
        if not supported:
            raise GpuNotSupportedError("the driver lists no supported graphics clocks", index)
        app = self._call("nvmlDeviceGetClock", pynvml.NVML_CLOCK_GRAPHICS, pynvml.NVML_CLOCK_ID_APP_CLOCK_TARGET,
                         tolerate=_ABSENT)
        default = self._call("nvmlDeviceGetClock", pynvml.NVML_CLOCK_GRAPHICS,
                             pynvml.NVML_CLOCK_ID_APP_CLOCK_DEFAULT, tolerate=_ABSENT)
        self._clock_info = ClockInfo(
            supported_sm_clocks_mhz=supported,
            app_clock_mhz=None if app is None else int(app),
            default_app_clock_mhz=None if default is None else int(default),
        )
        return self._clock_info

    def set_locked_clocks_mhz(self, min_mhz: int, max_mhz: int) -> int:
        """nvmlDeviceSetGpuLockedClocks after checking the range against the supported clocks; returns the SM
        clock read back (the clock in force; NVML offers no getter of the locked range itself)."""
        index = self.identity.index
        low, high = _mhz(min_mhz, "min clock", index), _mhz(max_mhz, "max clock", index)
        info = self._clock_info or self.clock_info()
        if not info.min_mhz <= low <= high <= info.max_mhz:
            raise GpuInvalidArgumentError(
                f"locked clocks [{low}, {high}] MHz not an ordered range within [{info.min_mhz}, {info.max_mhz}] MHz",
                index,
            )
        self._call("nvmlDeviceSetGpuLockedClocks", low, high)
        return int(self._call("nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_SM))

    def reset_locked_clocks(self) -> int:
        """nvmlDeviceResetGpuLockedClocks; returns the SM clock read back."""
        self._call("nvmlDeviceResetGpuLockedClocks")
        return int(self._call("nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_SM))

    def _instant_power_mw(self) -> int | None:
        # Unsupported (per field, or the whole call on an old driver) is None, not an error.
        values = self._call(
            "nvmlDeviceGetFieldValues",
            [FI_DEV_POWER_INSTANT],
            tolerate=frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND}),
        )
        if values is None or len(values) != 1 or int(values[0].nvmlReturn) != pynvml.NVML_SUCCESS:
            return None
        member = _VALUE_MEMBERS.get(int(values[0].valueType))
        if member is None:
            return None
        return int(round(getattr(values[0].value, member)))

    def _clock_event_reasons(self) -> int:
        not_found = frozenset({pynvml.NVML_ERROR_FUNCTION_NOT_FOUND})
        while self._reason_functions:
            op = self._reason_functions[0]
            last = len(self._reason_functions) == 1
            reasons = self._call(op, tolerate=frozenset() if last else not_found)
            if reasons is not None:
                return int(reasons)
            # The driver lacks this name: use the older one from now on.
            self._reason_functions = self._reason_functions[1:]
        raise GpuLibraryError("pynvml offers no clock-event-reasons function", self.identity.index)


class NvmlBackend:
    """Owns the NVML session and discovers GPUs, optionally only those at ``gpu_indices``."""

    name = "nvml"

    def __init__(self, gpu_indices: Sequence[int] | None = None) -> None:
        self._gpu_indices = None if gpu_indices is None else list(gpu_indices)
        self._devices: list[GpuDevice] | None = None

    def open(self) -> list[GpuDevice]:
        """nvmlInit and return the selected GPUs ordered by index (the same list again while open)."""
        if self._devices is not None:
            return list(self._devices)
        _call("nvmlInit", None)
        try:
            count = int(_call("nvmlDeviceGetCount", None))
            devices: list[GpuDevice] = [self._device(i) for i in self._select(count)]
        except BaseException:
            # Leave NVML as we found it; the original error is the one worth reporting.
            with contextlib.suppress(GpuError):
                _call("nvmlShutdown", None)
            raise
        self._devices = devices
        return list(devices)

    def close(self) -> None:
        """nvmlShutdown once; later calls do nothing. Devices from open() stop working."""
        if self._devices is None:
            return
        self._devices = None
        _call("nvmlShutdown", None)

    def driver_version(self) -> str:
        """nvmlSystemGetDriverVersion (needs an open session)."""
        return _to_str(_call("nvmlSystemGetDriverVersion", None))

    def _select(self, count: int) -> list[int]:
        if self._gpu_indices is None:
            return list(range(count))
        seen: set[int] = set()
        for index in self._gpu_indices:
            if isinstance(index, bool) or not isinstance(index, int):
                raise GpuInvalidArgumentError(f"GPU index must be an int, got {index!r}")
            if not 0 <= index < count:
                present = f"indices 0..{count - 1}" if count else "no GPU"
                raise GpuInvalidArgumentError(f"no such GPU: NVML reports {present}", index)
            if index in seen:
                raise GpuInvalidArgumentError("GPU index listed twice", index)
            seen.add(index)
        return sorted(seen)

    def _device(self, index: int) -> NvmlDevice:
        handle = _call("nvmlDeviceGetHandleByIndex", index, index)
        identity = GpuIdentity(
            index=index,
            uuid=_to_str(_call("nvmlDeviceGetUUID", index, handle)),
            name=_to_str(_call("nvmlDeviceGetName", index, handle)),
        )
        return NvmlDevice(identity, handle)
