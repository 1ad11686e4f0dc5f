"""A fake libnvidia-ml.so.1 (C) that runs pynvml's real ctypes path without a GPU, and its test helpers.

In-process (pytest): use the fixtures in tests/conftest.py. ``fake_nvml_env`` gives a FakeNvmlEnv (a
built library, a state file holding two H100-SXM5 GPUs, a log path, an env dict); ``fake_pynvml`` also points
this process's pynvml at the fake (``pynvml.nvmlLib = CDLL(lib)``, since pynvml only loads the library while
nvmlLib is None) and sets FAKE_NVML_STATE/FAKE_NVML_LOG, undoing both afterwards::

    def test_x(fake_pynvml):
        fake_pynvml.write_state(FakeNvmlState.of("H100-SXM5", "A100-SXM4"))
        devices = NvmlBackend().open()
        ...
        assert fake_pynvml.set_limit_calls() == [(0, 250_000, 0)]

Subprocess (e.g. a daemon that is SIGTERMed): run it with ``env=fake_nvml_env.env``; its LD_LIBRARY_PATH puts
the fake ahead of any real libnvidia-ml.so.1, and the state file is shared (flock) with this process, so
``fake_nvml_env.read_state()`` shows the limits the subprocess left behind.

tests/conftest.py puts tests/ on sys.path, so ``from fake_nvml import ...`` works from any test directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .build import LIB_NAME, FakeNvmlBuildError, build_fake_nvml
from .state import FakeGpu, FakeNvmlState, Fault, LogEntry, clock_calls, make_gpu, read_log, set_limit_calls

__all__ = [
    "LIB_NAME",
    "FakeGpu",
    "FakeNvmlBuildError",
    "FakeNvmlEnv",
    "FakeNvmlState",
    "Fault",
    "LogEntry",
    "build_fake_nvml",
    "clock_calls",
    "make_env",
    "make_gpu",
    "point_pynvml_at",
    "read_log",
    "set_limit_calls",
]


@dataclass(frozen=True)
class FakeNvmlEnv:
    """Where one test's fake machine lives, and the environment that makes a process use it."""

    lib_dir: Path
    state_path: Path
    log_path: Path
    # os.environ plus LD_LIBRARY_PATH, FAKE_NVML_STATE, FAKE_NVML_LOG: pass as a subprocess's env.
    env: dict[str, str]

    @property
    def lib_path(self) -> Path:
        """The fake library file."""
        return self.lib_dir / LIB_NAME

    def write_state(self, state: FakeNvmlState) -> None:
        """Replace the fake machine's state."""
        state.write(self.state_path)

    def read_state(self) -> FakeNvmlState:
        """The fake machine's state now (as the last call left it)."""
        return FakeNvmlState.read(self.state_path)

    def log(self) -> list[LogEntry]:
        """Every logged call (setters, init, shutdown), in order."""
        return read_log(self.log_path)

    def set_limit_calls(self) -> list[tuple[int, int, int]]:
        """The logged SetPowerManagementLimit calls as (gpu_index, limit_mw, rc)."""
        return set_limit_calls(self.log_path)

    def clock_calls(self) -> list[tuple[str, int, tuple[int, ...], int]]:
        """The logged Set/ResetGpuLockedClocks calls as (function, gpu_index, (min, max) or (), rc)."""
        return clock_calls(self.log_path)


def make_env(lib_dir: Path, work_dir: Path, state: FakeNvmlState | None = None) -> FakeNvmlEnv:
    """A FakeNvmlEnv in ``work_dir`` using the library in ``lib_dir``; state defaults to two H100-SXM5."""
    state_path = work_dir / "fake_nvml_state.txt"
    log_path = work_dir / "fake_nvml_calls.log"
    (state or FakeNvmlState.of("H100-SXM5", "H100-SXM5")).write(state_path)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib_dir), env.get("LD_LIBRARY_PATH")) if p)
    env["FAKE_NVML_STATE"] = str(state_path)
    env["FAKE_NVML_LOG"] = str(log_path)
    return FakeNvmlEnv(lib_dir=lib_dir, state_path=state_path, log_path=log_path, env=env)


@contextlib.contextmanager
def point_pynvml_at(fake: FakeNvmlEnv) -> Iterator[ctypes.CDLL]:
    """Within the block, this process's pynvml calls the fake; pynvml's own state is restored afterwards."""
    import pynvml

    lib = ctypes.CDLL(str(fake.lib_path))
    saved_env = {k: os.environ.get(k) for k in ("FAKE_NVML_STATE", "FAKE_NVML_LOG")}
    saved = (pynvml.nvmlLib, dict(pynvml._nvmlGetFunctionPointer_cache), pynvml._nvmlLib_refcount)
    os.environ["FAKE_NVML_STATE"] = str(fake.state_path)
    os.environ["FAKE_NVML_LOG"] = str(fake.log_path)
    lib.fakeNvmlReset()
    # pynvml caches function pointers by name: drop them, or calls would go to the previous library.
    pynvml._nvmlGetFunctionPointer_cache.clear()
    pynvml.nvmlLib = lib
    pynvml._nvmlLib_refcount = 0
    try:
        yield lib
    finally:
        lib.fakeNvmlReset()
        pynvml.nvmlLib, cache, pynvml._nvmlLib_refcount = saved
        pynvml._nvmlGetFunctionPointer_cache.clear()
        pynvml._nvmlGetFunctionPointer_cache.update(cache)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
