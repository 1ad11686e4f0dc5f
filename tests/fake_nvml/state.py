"""Read and write the fake NVML's state file, and parse its call log (format: see fake_nvml.c)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

# nvmlReturn_t values (nvml.h), for fault injection without importing pynvml.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_UNKNOWN = 999

# nvmlClocksEventReasonSwPowerCap (nvml.h); the fake adds it while power_mw exceeds the enforced limit.
CLOCK_EVENT_SW_POWER_CAP = 0x4
# nvmlClocksEventReasonApplicationsClocksSetting (nvml.h); the fake adds it while a lock clamps the SM clock.
CLOCK_EVENT_APPLICATIONS_CLOCKS = 0x2
# What nvmlSystemGetDriverVersion answers unless the state says otherwise (fake_nvml.c DEFAULT_DRIVER_VERSION).
DEFAULT_DRIVER_VERSION = "550.54.15"


@dataclass(frozen=True)
class Fault:
    """An injected error: the function returns ``code``; ``times`` > 0 clears it after that many calls."""

    code: int
    times: int = 0


@dataclass
class FakeGpu:
    """One fake GPU. Reported power is min(power_mw, enforced limit); enforced = min(limit, external)."""

    name: str
    uuid: str
    min_mw: int
    max_mw: int
    default_mw: int
    limit_mw: int
    # What the GPU would draw uncapped (the fake clips the reported average to the enforced limit).
    power_mw: int = 0
    # NVML_FI_DEV_POWER_INSTANT; None: the field reports NOT_SUPPORTED.
    instant_power_mw: int | None = None
    energy_mj: int = 0
    # Added to energy_mj after each GetTotalEnergyConsumption, so energy advances per read.
    energy_step_mj: int = 0
    sm_clock_mhz: int = 0
    clock_event_reasons: int = 0
    # Supported clocks: graphics max_sm_clock_mhz down to min_sm_clock_mhz in clock_step_mhz steps at the one
    # memory clock; max_sm_clock_mhz 0: the GPU lists no clocks and refuses locks (NOT_SUPPORTED).
    mem_clock_mhz: int = 0
    min_sm_clock_mhz: int = 0
    max_sm_clock_mhz: int = 0
    clock_step_mhz: int = 0
    # Applications clock target (0: the default, max_sm_clock_mhz).
    app_clock_mhz: int = 0
    # The locked SM clock range (None: unlocked); the clock in force is sm_clock_mhz clamped into it.
    locked_min_mhz: int | None = None
    locked_max_mhz: int | None = None
    # A cap set by another tool; the enforced limit is the lower of it and limit_mw.
    external_limit_mw: int | None = None
    # Function name -> fault, for this GPU only.
    faults: dict[str, Fault] = field(default_factory=dict)
    # Function name -> ms every call sleeps first (a slow or hung GPU), for this GPU only.
    delays: dict[str, int] = field(default_factory=dict)

    @property
    def enforced_mw(self) -> int:
        """The limit the fake reports as enforced."""
        if self.external_limit_mw is not None:
            return min(self.limit_mw, self.external_limit_mw)
        return self.limit_mw

    @property
    def clock_in_force_mhz(self) -> int:
        """The SM clock the fake reports: sm_clock_mhz clamped into the locked range."""
        mhz = self.sm_clock_mhz
        if self.locked_max_mhz is not None:
            mhz = min(mhz, self.locked_max_mhz)
        if self.locked_min_mhz is not None:
            mhz = max(mhz, self.locked_min_mhz)
        return mhz


# Named profiles. Limits from data/gpu_power_limits.csv rows H100-SXM5-80GB (200/700/700 W) and
# A100-SXM4-80GB (100/400/400 W); names as nvidia-smi prints them for those boards; max SM clocks from the
# same rows (1980 and 1410 MHz). Test values, modelled (no cited dump): the lowest supported clocks (345 and
# 210 MHz), the 15 MHz step and the memory clocks (2619 and 1593 MHz) follow the shape of an nvidia-smi -q -d
# SUPPORTED_CLOCKS listing; bench/device_clock_check.py records the real list on a lent GPU.
_PROFILES: dict[str, FakeGpu] = {
    "H100-SXM5": FakeGpu(
        name="NVIDIA H100 80GB HBM3",
        uuid="",
        min_mw=200_000,
        max_mw=700_000,
        default_mw=700_000,
        limit_mw=700_000,
        power_mw=350_000,
        instant_power_mw=360_000,
        sm_clock_mhz=1980,
        mem_clock_mhz=2619,
        min_sm_clock_mhz=345,
        max_sm_clock_mhz=1980,
        clock_step_mhz=15,
    ),
    "A100-SXM4": FakeGpu(
        name="NVIDIA A100-SXM4-80GB",
        uuid="",
        min_mw=100_000,
        max_mw=400_000,
        default_mw=400_000,
        limit_mw=400_000,
        power_mw=250_000,
        instant_power_mw=255_000,
        sm_clock_mhz=1410,
        mem_clock_mhz=1593,
        min_sm_clock_mhz=210,
        max_sm_clock_mhz=1410,
        clock_step_mhz=15,
    ),
}
PROFILE_NAMES = tuple(_PROFILES)


def fake_uuid(index: int) -> str:
    """A stable NVML-style UUID for GPU ``index``."""
    return f"GPU-fa4e0000-0000-4000-8000-{index:012x}"


def make_gpu(profile: str, index: int, **overrides: object) -> FakeGpu:
    """A fresh FakeGpu from a named profile ("H100-SXM5", "A100-SXM4"), with field overrides."""
    base = _PROFILES[profile]
    gpu = replace(base, uuid=fake_uuid(index), faults={}, delays={})
    return replace(gpu, **overrides)  # type: ignore[arg-type]


@dataclass
class FakeNvmlState:
    """The whole fake machine: its GPUs, the non-root switch and global faults (e.g. on nvmlInitWithFlags)."""

    gpus: list[FakeGpu]
    # Simulates a non-root caller: SetPowerManagementLimit returns NVML_ERROR_NO_PERMISSION.
    nonroot: bool = False
    faults: dict[str, Fault] = field(default_factory=dict)
    # nvmlSystemGetDriverVersion's answer.
    driver_version: str = DEFAULT_DRIVER_VERSION
    # Function name -> ms every call sleeps first, on every GPU (a GPU's own entry wins).
    delays: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, *profiles: str) -> FakeNvmlState:
        """A machine with one GPU per named profile, indexed in order."""
        return cls(gpus=[make_gpu(p, i) for i, p in enumerate(profiles)])

    def inject(self, function: str, code: int, gpu: int | None = None, times: int = 0) -> None:
        """Make ``function`` return ``code`` (for one GPU, or globally when ``gpu`` is None)."""
        target = self.faults if gpu is None else self.gpus[gpu].faults
        target[function] = Fault(code, times)

    def slow(self, function: str, delay_ms: int, gpu: int | None = None) -> None:
        """Make every call of ``function`` sleep ``delay_ms`` first (one GPU, or all when ``gpu`` is None)."""
        target = self.delays if gpu is None else self.gpus[gpu].delays
        target[function] = delay_ms

    def to_text(self) -> str:
        """Serialise in the fake's format."""
        lines = [
            "# fake NVML state (tests/fake_nvml/state.py)",
            f"count {len(self.gpus)}",
            f"nonroot {int(self.nonroot)}",
        ]
        if not self.driver_version or len(self.driver_version.split()) != 1 or len(self.driver_version) > 95:
            raise ValueError(f"driver_version must be one word of at most 95 characters: {self.driver_version!r}")
        lines.append(f"driver_version {self.driver_version}")
        lines += [_fault_line("fail", fn, f) for fn, f in self.faults.items()]
        lines += [f"delay {fn} {ms}" for fn, ms in self.delays.items()]
        for i, g in enumerate(self.gpus):
            for text in (g.name, g.uuid):
                if not text or "\n" in text or text != text.strip():
                    raise ValueError(f"GPU {i}: name/uuid must be one non-empty line: {text!r}")
            values = {
                "name": g.name,
                "uuid": g.uuid,
                "min_mw": g.min_mw,
                "max_mw": g.max_mw,
                "default_mw": g.default_mw,
                "limit_mw": g.limit_mw,
                "external_limit_mw": _opt(g.external_limit_mw),
                "power_mw": g.power_mw,
                "instant_power_mw": _opt(g.instant_power_mw),
                "energy_mj": g.energy_mj,
                "energy_step_mj": g.energy_step_mj,
                "sm_clock_mhz": g.sm_clock_mhz,
                "clock_event_reasons": g.clock_event_reasons,
                "mem_clock_mhz": g.mem_clock_mhz,
                "min_sm_clock_mhz": g.min_sm_clock_mhz,
                "max_sm_clock_mhz": g.max_sm_clock_mhz,
                "clock_step_mhz": g.clock_step_mhz,
                "app_clock_mhz": g.app_clock_mhz,
                "locked_min_mhz": _opt(g.locked_min_mhz),
                "locked_max_mhz": _opt(g.locked_max_mhz),
            }
            lines += [f"gpu {i} {key} {value}" for key, value in values.items()]
            lines += [_fault_line(f"gpu {i} fail", fn, f) for fn, f in g.faults.items()]
            lines += [f"gpu {i} delay {fn} {ms}" for fn, ms in g.delays.items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str) -> FakeNvmlState:
        """Parse the fake's format (as written by ``to_text`` or by the fake itself)."""
        count = None
        nonroot = False
        driver_version = DEFAULT_DRIVER_VERSION
        faults: dict[str, Fault] = {}
        raw: dict[int, dict[str, str]] = {}
        gpu_faults: dict[int, dict[str, Fault]] = {}
        delays: dict[str, int] = {}
        gpu_delays: dict[int, dict[str, int]] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            tok = line.split(maxsplit=3)
            if not tok or tok[0].startswith("#"):
                continue
            if tok[0] == "count":
                count = int(tok[1])
            elif tok[0] == "nonroot":
                nonroot = tok[1] != "0"
            elif tok[0] == "driver_version":
                driver_version = tok[1]
            elif tok[0] == "fail":
                faults[tok[1]] = Fault(*(int(t) for t in tok[2:]))
            elif tok[0] == "delay":
                delays[tok[1]] = int(tok[2])
            elif tok[0] == "gpu" and len(tok) == 4:
                index = int(tok[1])
                if tok[2] == "fail":
                    fn, *nums = tok[3].split()
                    gpu_faults.setdefault(index, {})[fn] = Fault(*(int(t) for t in nums))
                elif tok[2] == "delay":
                    fn, ms = tok[3].split()
                    gpu_delays.setdefault(index, {})[fn] = int(ms)
                else:
                    raw.setdefault(index, {})[tok[2]] = tok[3].strip()
            else:
                raise ValueError(f"line {lineno}: unknown entry {line!r}")
        if count is None:
            raise ValueError("no 'count' line")
        gpus = []
        for i in range(count):
            r = raw[i]
            gpus.append(
                FakeGpu(
                    name=r["name"],
                    uuid=r["uuid"],
                    min_mw=int(r["min_mw"]),
                    max_mw=int(r["max_mw"]),
                    default_mw=int(r["default_mw"]),
                    limit_mw=int(r["limit_mw"]),
                    power_mw=int(r.get("power_mw", "0")),
                    instant_power_mw=_parse_opt(r.get("instant_power_mw", "none")),
                    energy_mj=int(r.get("energy_mj", "0")),
                    energy_step_mj=int(r.get("energy_step_mj", "0")),
                    sm_clock_mhz=int(r.get("sm_clock_mhz", "0")),
                    clock_event_reasons=int(r.get("clock_event_reasons", "0"), 0),
                    external_limit_mw=_parse_opt(r.get("external_limit_mw", "none")),
                    mem_clock_mhz=int(r.get("mem_clock_mhz", "0")),
                    min_sm_clock_mhz=int(r.get("min_sm_clock_mhz", "0")),
                    max_sm_clock_mhz=int(r.get("max_sm_clock_mhz", "0")),
                    clock_step_mhz=int(r.get("clock_step_mhz", "0")),
                    app_clock_mhz=int(r.get("app_clock_mhz", "0")),
                    locked_min_mhz=_parse_opt(r.get("locked_min_mhz", "none")),
                    locked_max_mhz=_parse_opt(r.get("locked_max_mhz", "none")),
                    faults=gpu_faults.get(i, {}),
                    delays=gpu_delays.get(i, {}),
                )
            )
        return cls(gpus=gpus, nonroot=nonroot, faults=faults, driver_version=driver_version, delays=delays)

    def write(self, path: Path) -> None:
        """Write to ``path`` atomically (temporary file, rename) under the fake's lock (``<path>.lock``)."""
        with _locked(path, fcntl.LOCK_EX):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(self.to_text(), encoding="utf-8")
            os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> FakeNvmlState:
        """Read ``path`` under the fake's lock."""
        with _locked(path, fcntl.LOCK_SH):
            return cls.from_text(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def _locked(path: Path, mode: int) -> Iterator[None]:
    """The flock fake_nvml.c takes on ``<state>.lock`` around every read and rewrite of the state file."""
    with open(path.with_name(path.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, mode)
        yield


@dataclass(frozen=True)
class LogEntry:
    """One logged call: ``nvmlDeviceSetPowerManagementLimit 0 250000 rc=0`` -> (function, ("0", "250000"), 0)."""

    function: str
    args: tuple[str, ...]
    rc: int


def read_log(path: Path) -> list[LogEntry]:
    """Every call the fake logged, in order; [] when nothing was logged yet."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        function, *args, rc = line.split()
        if not rc.startswith("rc="):
            raise ValueError(f"malformed log line {line!r}")
        entries.append(LogEntry(function, tuple(args), int(rc[3:])))
    return entries


def set_limit_calls(path: Path) -> list[tuple[int, int, int]]:
    """The logged SetPowerManagementLimit calls as (gpu_index, limit_mw, rc)."""
    return [
        (int(e.args[0]), int(e.args[1]), e.rc)
        for e in read_log(path)
        if e.function == "nvmlDeviceSetPowerManagementLimit"
    ]


# The fake's setters of locked clocks (their log lines: "<function> <gpu> [<min> <max>] rc=<code>").
CLOCK_SETTERS = ("nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks")
SETTERS = ("nvmlDeviceSetPowerManagementLimit", *CLOCK_SETTERS)


def clock_calls(path: Path) -> list[tuple[str, int, tuple[int, ...], int]]:
    """The logged locked-clock calls as (function, gpu_index, (min_mhz, max_mhz) or (), rc)."""
    return [
        (e.function, int(e.args[0]), tuple(int(a) for a in e.args[1:]), e.rc)
        for e in read_log(path)
        if e.function in CLOCK_SETTERS
    ]


def _opt(value: int | None) -> str:
    return "none" if value is None else str(value)


def _parse_opt(text: str) -> int | None:
    return None if text == "none" else int(text)


def _fault_line(prefix: str, function: str, fault: Fault) -> str:
    suffix = f" {fault.times}" if fault.times else ""
    return f"{prefix} {function} {fault.code}{suffix}"
