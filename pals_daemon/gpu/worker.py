"""One serial worker thread per GPU: NVML calls block, so they never run on the event loop.

Serial per GPU keeps calls to one device ordered (a set is never overtaken by an older read) while a hung
GPU delays only its own worker. A call that exceeds ``timeout_s`` raises GpuTransientError; the thread may
still be stuck, so the worker is marked wedged and refuses further calls until the daemon drops the GPU.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from pals_daemon.errors import GpuError, GpuFatalError, GpuTransientError
from pals_daemon.gpu.backend import ClockInfo, GpuDevice, GpuReading, PowerConstraints

T = TypeVar("T")


class GpuWorker:
    """Async facade over one GpuDevice, running its calls on a dedicated thread."""

    def __init__(self, device: GpuDevice, timeout_s: float = 5.0) -> None:
        self.device = device
        self.index = device.identity.index
        self.timeout_s = timeout_s
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gpu{self.index}")
        self._wedged = False

    @property
    def wedged(self) -> bool:
        """True once a call timed out: the thread may still be stuck in the driver, so nothing more is sent."""
        return self._wedged

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._wedged:
            raise GpuFatalError("a previous call never returned; GPU no longer used", self.index)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, fn)
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError as exc:
            self._wedged = True
            raise GpuTransientError(f"call timed out after {self.timeout_s} s", self.index) from exc
        except GpuError:
            raise
        except Exception as exc:  # a backend bug must not kill the control loop
            raise GpuTransientError(f"unexpected {type(exc).__name__}: {exc}", self.index) from exc

    async def constraints(self) -> PowerConstraints:
        """The device's limit range."""
        return await self._call(self.device.constraints)

    async def read(self) -> GpuReading:
        """A power/energy/limit sample."""
        return await self._call(self.device.read)

    async def set_power_limit_mw(self, limit_mw: int) -> int:
        """Set the limit; returns the enforced limit read back."""
        return await self._call(lambda: self.device.set_power_limit_mw(limit_mw))

    async def clock_info(self) -> ClockInfo:
        """Supported SM clocks and application clocks."""
        return await self._call(self.device.clock_info)

    async def set_locked_clocks_mhz(self, min_mhz: int, max_mhz: int) -> int:
        """Lock the SM clock into [min_mhz, max_mhz]; returns the SM clock read back."""
        return await self._call(lambda: self.device.set_locked_clocks_mhz(min_mhz, max_mhz))

    async def reset_locked_clocks(self) -> int:
        """Reset locked SM clocks to the driver default; returns the SM clock read back."""
        return await self._call(self.device.reset_locked_clocks)

    def call_blocking(self, fn: Callable[[GpuDevice], T]) -> T:
        """Run ``fn(device)`` on the worker from synchronous code (shutdown paths), waiting for it."""
        if self._wedged:
            raise GpuFatalError("a previous call never returned; GPU no longer used", self.index)
        return self._executor.submit(fn, self.device).result(timeout=self.timeout_s)

    def close(self) -> None:
        """Stop the thread without waiting for a stuck call."""
        self._executor.shutdown(wait=False, cancel_futures=True)
