"""Typed errors of pals-daemon: every failure a caller may handle has its own class."""

from __future__ import annotations


class PalsError(Exception):
    """Base class of every error pals-daemon raises on purpose."""


class ConfigError(PalsError):
    """The configuration is invalid; ``problems`` lists every problem found, not only the first."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


class InvalidRequestError(PalsError):
    """A request (budget, targets, telemetry) failed validation; nothing was changed."""


class StateError(PalsError):
    """The persisted state file is unsafe or unreadable (wrong owner, mode, symlink, corrupt)."""


class SocketInUseError(PalsError):
    """Another live daemon answers on a socket path this daemon was asked to bind."""


class UnsafeSocketDirError(PalsError):
    """A socket's directory is a symlink, owned by another user or writable by others: not used."""


class GpuError(PalsError):
    """A GPU operation failed. ``gpu_index`` names the GPU when known."""

    def __init__(self, message: str, gpu_index: int | None = None) -> None:
        self.gpu_index = gpu_index
        prefix = f"GPU {gpu_index}: " if gpu_index is not None else ""
        super().__init__(prefix + message)


class GpuInvalidArgumentError(GpuError):
    """The driver refused a value (e.g. a power limit outside the constraints)."""


class GpuTransientError(GpuError):
    """A GPU call failed in a way worth retrying on the next tick (timeout, busy)."""


class GpuFatalError(GpuError):
    """The GPU cannot be controlled any more: stop controlling it, alarm, keep the others."""


class GpuPermissionError(GpuFatalError):
    """The driver refused the call for lack of privilege (NVML_ERROR_NO_PERMISSION)."""


class GpuNotSupportedError(GpuFatalError):
    """The GPU does not support the call (NVML_ERROR_NOT_SUPPORTED)."""


class GpuLostError(GpuFatalError):
    """The GPU fell off the bus or stopped answering (NVML_ERROR_GPU_IS_LOST)."""


class GpuResetRequiredError(GpuFatalError):
    """The GPU needs a reset before it can be used again (NVML_ERROR_RESET_REQUIRED)."""


class GpuLibraryError(GpuFatalError):
    """The GPU management library is missing or failed to initialise."""
