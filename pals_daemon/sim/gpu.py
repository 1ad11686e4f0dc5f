"""Simulated GPUs: power limits with a settling delay, locked SM clocks, a power history, NVML-like readings
and faults.

A ``SimGpu`` implements the ``GpuDevice`` protocol for the daemon (``constraints``/``read``/
``set_power_limit_mw``) and has an engine side for the simulated engine that drives it
(``effective_limit_w``/``record_activity``/``set_horizon``). The two sides may be called from different
threads: all state is behind one lock. Time is simulated seconds; the device side reads it from the
``clock`` callable given at construction, the engine side gets it as arguments.
"""

from __future__ import annotations

import bisect
import numbers
import threading
from collections import deque
from collections.abc import Callable, Iterable

from pals_daemon.errors import GpuInvalidArgumentError
from pals_daemon.gpu.backend import (
    CLOCK_EVENT_APPLICATIONS_CLOCKS_SETTING,
    CLOCK_EVENT_SW_POWER_CAP,
    ClockInfo,
    GpuDevice,
    GpuIdentity,
    GpuReading,
    PowerConstraints,
)
from pals_daemon.sim.hardware import HardwareProfile, hardware_profile
from pals_daemon.units import MJ_PER_J, mw_to_w, w_to_mw

# Modelled (no published figure): how long a newly requested power limit takes to act on the power draw.
# NVIDIA does not document the settling time of the board's power controller; we take 0.2 s.
DEFAULT_CAP_DELAY_S = 0.2

# NVML clock-event reason "GPU idle" (nvml.h: nvmlClocksEventReasonGpuIdle = 0x0000000000000001).
CLOCK_EVENT_GPU_IDLE = 0x1

# Width of the trailing power average, like nvmlDeviceGetPowerUsage on Ampere (except GA100) and newer.
POWER_AVG_WINDOW_S = 1.0

SET_POWER_LIMIT = "set_power_limit_mw"
SET_LOCKED_CLOCKS = "set_locked_clocks_mhz"
RESET_LOCKED_CLOCKS = "reset_locked_clocks"
_DEVICE_METHODS = ("constraints", "read", SET_POWER_LIMIT, "clock_info", SET_LOCKED_CLOCKS, RESET_LOCKED_CLOCKS)
# Modelled (no cited dump): the lowest supported SM clock per profile and the 15 MHz step, the shape of an
# nvidia-smi -q -d SUPPORTED_CLOCKS listing; the top clock is the profile's max_sm_clock_mhz (cited there).
# bench/device_clock_check.py records the real list on a lent GPU.
MIN_SM_CLOCK_MHZ = {"A100-SXM4": 210, "H100-SXM5": 345, "H200-SXM": 345}  # H200: the H100's (same die)
SM_CLOCK_STEP_MHZ = 15
# Segments kept before folding old ones into the energy counter (bounds memory in long runs).
_FOLD_THRESHOLD = 512
# Watts of slack when deciding that a demand exceeds a limit (float noise, not physics).
_EPS_W = 1e-9


class SimGpu:
    """A simulated GPU: implements ``GpuDevice``; the engine side records what the GPU does."""

    def __init__(
        self,
        identity: GpuIdentity,
        hardware: HardwareProfile,
        clock: Callable[[], float],
        cap_delay_s: float = DEFAULT_CAP_DELAY_S,
        *,
        initial_limit_w: float | None = None,
        initial_energy_mj: int = 0,
    ) -> None:
        if cap_delay_s < 0:
            raise ValueError(f"cap_delay_s must be >= 0, got {cap_delay_s!r}")
        self.identity = identity
        self.hardware = hardware
        self.cap_delay_s = float(cap_delay_s)
        # Every setter call, in order, valid or not (the recording fake the tests assert on): power limits as
        # (name, mW), locks as (name, max MHz), resets as (name, 0).
        self.calls: list[tuple[str, int]] = []
        # The locked SM clock range (min, max) MHz; None: unlocked.
        self._locked_mhz: tuple[int, int] | None = None
        self._clock = clock
        self._lock = threading.Lock()
        created_s = float(clock())
        self._created_s = created_s
        limit_w = hardware.default_limit_w if initial_limit_w is None else float(initial_limit_w)
        if not hardware.min_limit_w <= limit_w <= hardware.max_limit_w:
            raise ValueError(f"initial_limit_w {limit_w} W outside the {hardware.name} range")
        self._requested_mw = w_to_mw(limit_w)
        self._external_mw: int | None = None
        # (time the limit starts acting, limit W), sorted by time; the first entry is from creation.
        self._limit_times: list[float] = [created_s]
        self._limit_values_w: list[float] = [mw_to_w(self._requested_mw)]
        # Busy segments [t0, t1, power_w, sm_clock_mhz, binding], time-ordered, non-overlapping.
        self._segments: deque[list] = deque()
        self._last_end_s = created_s
        # Energy folded from the past: joules up to _committed_s.
        self._committed_s = created_s
        self._committed_j = initial_energy_mj / MJ_PER_J
        self._last_energy_mj = int(initial_energy_mj)
        # Engine-side horizon: with an engine attached, readings never look past the time it has simulated.
        self._attached = False
        self._horizon_s = created_s
        self._fault: BaseException | None = None
        self._fault_times: int | None = None
        self._fault_methods: frozenset[str] | None = None

    # ---- GpuDevice --------------------------------------------------------------------------------------

    def constraints(self) -> PowerConstraints:
        """Limit range and default limit of the hardware profile, in mW."""
        with self._lock:
            self._maybe_fail("constraints")
            return self._constraints()

    def read(self) -> GpuReading:
        """Sample power (instant and 1-s average), energy, limits, SM clock and clock-event reasons."""
        with self._lock:
            self._maybe_fail("read")
            t = self._read_time()
            self._fold(t - POWER_AVG_WINDOW_S)
            energy_j = self._energy_j(t)
            # NVML's counter is monotonic; never let float noise (or late activity) move it back.
            energy_mj = max(self._last_energy_mj, int(energy_j * MJ_PER_J))
            self._last_energy_mj = energy_mj
            start = max(t - POWER_AVG_WINDOW_S, self._created_s, self._committed_s)
            if t > start:
                avg_w = (energy_j - self._energy_j(start)) / (t - start)
            else:
                avg_w = self._state_before(t)[0]
            power_w, clock_mhz, reasons = self._state_before(t)
            # The clock in force is the lower of the locked clock and the clock the cap leaves. While busy, the
            # engine records the clock and power the truth gives under the lock (ModelTruth.decode_step); idle
            # segments keep the top clock, which the lock holds down here.
            if self._locked_mhz is not None and clock_mhz > self._locked_mhz[1]:
                clock_mhz = self._locked_mhz[1]
                reasons |= CLOCK_EVENT_APPLICATIONS_CLOCKS_SETTING
            return GpuReading(
                power_avg_mw=w_to_mw(avg_w),
                power_instant_mw=w_to_mw(power_w),
                energy_mj=energy_mj,
                enforced_limit_mw=self._enforced_mw(),
                requested_limit_mw=self._requested_mw,
                sm_clock_mhz=int(clock_mhz),
                clock_event_reasons=reasons,
            )

    def set_power_limit_mw(self, limit_mw: int) -> int:
        """Request ``limit_mw``; it acts on power ``cap_delay_s`` later. Returns the enforced limit (mW)."""
        with self._lock:
            self.calls.append((SET_POWER_LIMIT, limit_mw))
            self._maybe_fail(SET_POWER_LIMIT)
            if isinstance(limit_mw, bool) or not isinstance(limit_mw, numbers.Integral):
                raise GpuInvalidArgumentError(
                    f"power limit must be an integer number of mW, got {limit_mw!r}", self.identity.index
                )
            limit_mw = int(limit_mw)
            c = self._constraints()
            if not c.contains(limit_mw):
                raise GpuInvalidArgumentError(
                    f"power limit {limit_mw} mW outside [{c.min_limit_mw}, {c.max_limit_mw}] mW",
                    self.identity.index,
                )
            self._requested_mw = limit_mw
            self._schedule_limit(float(self._clock()))
            # The enforced-limit register changes at once (as NVML reads it back); the power follows later.
            return self._enforced_mw()

    def clock_info(self) -> ClockInfo:
        """Supported SM clocks: the profile's top clock down to its modelled lowest one in 15 MHz steps."""
        with self._lock:
            self._maybe_fail("clock_info")
            return self._clock_info()

    def set_locked_clocks_mhz(self, min_mhz: int, max_mhz: int) -> int:
        """Lock the SM clock into [min_mhz, max_mhz] (checked like NVML); returns the clock in force after it."""
        with self._lock:
            self.calls.append((SET_LOCKED_CLOCKS, max_mhz))
            self._maybe_fail(SET_LOCKED_CLOCKS)
            info = self._clock_info()
            for value in (min_mhz, max_mhz):
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    index = self.identity.index
                    raise GpuInvalidArgumentError(f"clock must be an integer of MHz, got {value!r}", index)
            if not info.min_mhz <= min_mhz <= max_mhz <= info.max_mhz:
                raise GpuInvalidArgumentError(
                    f"locked clocks [{min_mhz}, {max_mhz}] MHz not an ordered range within "
                    f"[{info.min_mhz}, {info.max_mhz}] MHz",
                    self.identity.index,
                )
            self._locked_mhz = (int(min_mhz), int(max_mhz))
            return min(self.hardware.max_sm_clock_mhz, int(max_mhz))

    def reset_locked_clocks(self) -> int:
        """Unlock the SM clock; returns the clock in force after it (the top clock: the sim idles at it)."""
        with self._lock:
            self.calls.append((RESET_LOCKED_CLOCKS, 0))
            self._maybe_fail(RESET_LOCKED_CLOCKS)
            self._locked_mhz = None
            return self.hardware.max_sm_clock_mhz

    def locked_clock_max_mhz(self) -> int | None:
        """Engine/truth side: the locked clock ceiling in force (None: unlocked)."""
        with self._lock:
            return None if self._locked_mhz is None else self._locked_mhz[1]

    # ---- test and fault hooks ---------------------------------------------------------------------------

    def inject_fault(
        self,
        exc: BaseException | None,
        *,
        times: int | None = None,
        methods: Iterable[str] | None = None,
    ) -> None:
        """Make device calls raise ``exc``: the next ``times`` calls (None: all until cleared); None clears.

        ``methods`` restricts the fault to some of "constraints", "read", "set_power_limit_mw", "clock_info",
        "set_locked_clocks_mhz", "reset_locked_clocks".
        """
        with self._lock:
            if exc is not None and times is not None and times < 1:
                raise ValueError(f"times must be >= 1 or None, got {times!r}")
            chosen = None if methods is None else frozenset(methods)
            if chosen is not None and not chosen <= set(_DEVICE_METHODS):
                raise ValueError(f"unknown methods {sorted(chosen - set(_DEVICE_METHODS))}")
            self._fault = exc
            self._fault_times = None if exc is None else times
            self._fault_methods = None if exc is None else chosen

    def set_external_limit_w(self, limit_w: float | None) -> None:
        """Simulate a limit set by someone else (another tool, the BMC): the driver enforces the lower one."""
        with self._lock:
            self._external_mw = None if limit_w is None else w_to_mw(limit_w)
            self._schedule_limit(float(self._clock()))

    # ---- engine side ------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Called by the engine that drives this GPU: readings then stop at the engine's horizon."""
        with self._lock:
            self._attached = True

    def set_horizon(self, t_s: float) -> None:
        """The engine has simulated this GPU's activity up to ``t_s`` (monotonic; earlier values ignored)."""
        with self._lock:
            self._horizon_s = max(self._horizon_s, float(t_s))

    def effective_limit_w(self, t_s: float) -> float:
        """The limit acting on power at time ``t_s`` (requests act ``cap_delay_s`` after being made)."""
        with self._lock:
            return self._limit_at(t_s)

    def next_limit_change_s(self, t_s: float) -> float | None:
        """The first time after ``t_s`` at which the acting limit changes, or None if none is pending."""
        with self._lock:
            i = bisect.bisect_right(self._limit_times, t_s)
            return self._limit_times[i] if i < len(self._limit_times) else None

    def record_activity(
        self,
        t_start_s: float,
        t_end_s: float,
        power_w: float,
        sm_clock_mhz: float,
        demand_power_w: float | None = None,
    ) -> None:
        """Record a busy interval: the GPU draws ``power_w`` (clamped to the acting limit) from start to end.

        ``demand_power_w`` is what the work would draw uncapped; the SW-power-cap reason is set wherever it
        exceeds the acting limit (or, without it, wherever ``power_w`` had to be clamped). Gaps between
        intervals are idle. Intervals must come in time order; any overlap with the past is dropped.
        """
        with self._lock:
            t0 = max(float(t_start_s), self._last_end_s, self._committed_s)
            t1 = float(t_end_s)
            if t1 <= t0:
                return
            demand = power_w if demand_power_w is None else demand_power_w
            # Split where the acting limit changes so that power never exceeds the limit in force.
            i = bisect.bisect_right(self._limit_times, t0)
            cuts = [t0]
            while i < len(self._limit_times) and self._limit_times[i] < t1:
                cuts.append(self._limit_times[i])
                i += 1
            cuts.append(t1)
            for a, b in zip(cuts, cuts[1:], strict=False):
                if b <= a:
                    continue
                limit_w = self._limit_at(a)
                self._append(a, b, min(power_w, limit_w), sm_clock_mhz, demand > limit_w + _EPS_W)
            self._last_end_s = t1
            if len(self._segments) > _FOLD_THRESHOLD:
                self._fold(min(self._read_time(), self._last_end_s) - POWER_AVG_WINDOW_S)

    def energy_j(self, t_s: float) -> float:
        """Exact energy (J, counter offset included) integrated up to ``t_s``; for tests and reports."""
        with self._lock:
            return self._energy_j(t_s)

    # ---- internals (lock held) --------------------------------------------------------------------------

    def _constraints(self) -> PowerConstraints:
        hw = self.hardware
        return PowerConstraints(
            min_limit_mw=w_to_mw(hw.min_limit_w),
            max_limit_mw=w_to_mw(hw.max_limit_w),
            default_limit_mw=w_to_mw(hw.default_limit_w),
        )

    def _clock_info(self) -> ClockInfo:
        top = self.hardware.max_sm_clock_mhz
        low = MIN_SM_CLOCK_MHZ.get(self.hardware.name, top)
        return ClockInfo(tuple(range(top, low - 1, -SM_CLOCK_STEP_MHZ)), app_clock_mhz=top, default_app_clock_mhz=top)

    def _maybe_fail(self, method: str) -> None:
        exc = self._fault
        if exc is None or (self._fault_methods is not None and method not in self._fault_methods):
            return
        if self._fault_times is not None:
            self._fault_times -= 1
            if self._fault_times <= 0:
                self._fault = None
                self._fault_times = None
                self._fault_methods = None
        raise exc

    def _enforced_mw(self) -> int:
        if self._external_mw is None:
            return self._requested_mw
        return min(self._requested_mw, self._external_mw)

    def _schedule_limit(self, now_s: float) -> None:
        target_w = mw_to_w(self._enforced_mw())
        t_eff = now_s + self.cap_delay_s
        # A newer request supersedes pending ones that would act at or after it.
        while len(self._limit_times) > 1 and self._limit_times[-1] >= t_eff:
            self._limit_times.pop()
            self._limit_values_w.pop()
        if self._limit_values_w[-1] == target_w:
            return
        self._limit_times.append(t_eff)
        self._limit_values_w.append(target_w)

    def _limit_at(self, t_s: float) -> float:
        i = bisect.bisect_right(self._limit_times, t_s) - 1
        return self._limit_values_w[max(i, 0)]

    def _read_time(self) -> float:
        t = float(self._clock())
        return min(t, self._horizon_s) if self._attached else t

    def _append(self, t0: float, t1: float, power_w: float, clock_mhz: float, binding: bool) -> None:
        if self._segments:
            last = self._segments[-1]
            if last[1] == t0 and last[2] == power_w and last[3] == clock_mhz and last[4] == binding:
                last[1] = t1
                return
        self._segments.append([t0, t1, power_w, clock_mhz, binding])

    def _fold(self, cutoff_s: float) -> None:
        """Fold everything before ``cutoff_s`` into the committed energy."""
        if cutoff_s <= self._committed_s:
            return
        idle_w = self.hardware.idle_power_w
        segs = self._segments
        while segs and segs[0][0] < cutoff_s:
            t0, t1, p = segs[0][0], segs[0][1], segs[0][2]
            self._committed_j += idle_w * max(0.0, t0 - self._committed_s)
            end = min(t1, cutoff_s)
            self._committed_j += p * (end - t0)
            self._committed_s = end
            if t1 <= cutoff_s:
                segs.popleft()
            else:
                segs[0][0] = cutoff_s
                return
        self._committed_j += idle_w * max(0.0, cutoff_s - self._committed_s)
        self._committed_s = max(self._committed_s, cutoff_s)
        # Drop limit history that can no longer matter (keep the entry in force at the cutoff).
        k = bisect.bisect_right(self._limit_times, self._committed_s) - 1
        if k > 0:
            del self._limit_times[:k]
            del self._limit_values_w[:k]

    def _energy_j(self, t_s: float) -> float:
        if t_s <= self._committed_s:
            # Before the fold point only the total is kept; readings never ask for it except at creation.
            return self._committed_j
        idle_w = self.hardware.idle_power_w
        e = self._committed_j
        cursor = self._committed_s
        for t0, t1, p, _clk, _b in self._segments:
            if t0 >= t_s:
                break
            e += idle_w * max(0.0, t0 - cursor)
            end = min(t1, t_s)
            e += p * (end - t0)
            cursor = end
        e += idle_w * max(0.0, t_s - cursor)
        return e

    def _state_before(self, t_s: float) -> tuple[float, float, int]:
        """(power W, SM clock MHz, reasons) just before ``t_s``: a step ending exactly at t_s still counts."""
        for t0, t1, p, clk, binding in self._segments:
            if t0 >= t_s:
                break
            if t1 >= t_s:
                return p, clk, CLOCK_EVENT_SW_POWER_CAP if binding else 0
        return self.hardware.idle_power_w, float(self.hardware.max_sm_clock_mhz), CLOCK_EVENT_GPU_IDLE


# Reported as the driver version of simulated GPUs; labelled so no one mistakes it for a real driver.
SIM_DRIVER_VERSION = "sim-0"


class SimBackend:
    """A ``GpuBackend`` over a fixed list of simulated GPUs."""

    name = "sim"

    def __init__(self, gpus: Iterable[SimGpu], open_error: BaseException | None = None) -> None:
        self.gpus = sorted(gpus, key=lambda g: g.identity.index)
        # Raised by open() when set (e.g. GpuLibraryError), to test a failed initialisation.
        self.open_error = open_error
        self.is_open = False

    def open(self) -> list[GpuDevice]:
        """Return every GPU, ordered by index."""
        if self.open_error is not None:
            raise self.open_error
        self.is_open = True
        return list(self.gpus)

    def close(self) -> None:
        """Mark the session closed (idempotent)."""
        self.is_open = False

    def driver_version(self) -> str:
        """A fixed label: simulated GPUs have no driver."""
        return SIM_DRIVER_VERSION


def sim_uuid(index: int, tag: str = "sim") -> str:
    """A deterministic fake GPU UUID for ``index``, e.g. ``GPU-sim-00000003-0000-0000-0000-000000000000``."""
    return f"GPU-{tag}-{index:08d}-0000-0000-0000-000000000000"


def make_sim_gpus(
    kind: str,
    count: int,
    clock: Callable[[], float],
    cap_delay_s: float = DEFAULT_CAP_DELAY_S,
    *,
    first_index: int = 0,
    uuid_tag: str = "sim",
) -> list[SimGpu]:
    """``count`` simulated GPUs of hardware profile ``kind`` with indices from ``first_index``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count!r}")
    hw = hardware_profile(kind)
    return [
        SimGpu(GpuIdentity(i, sim_uuid(i, uuid_tag), hw.nvml_name or hw.name), hw, clock, cap_delay_s)
        for i in range(first_index, first_index + count)
    ]


__all__ = [
    "CLOCK_EVENT_GPU_IDLE",
    "DEFAULT_CAP_DELAY_S",
    "POWER_AVG_WINDOW_S",
    "SimBackend",
    "SimGpu",
    "make_sim_gpus",
    "sim_uuid",
]
