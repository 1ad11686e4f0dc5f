"""Compile fake_nvml.c into a ``libnvidia-ml.so.1`` that pynvml can load."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_nvml.c")
# The soname pynvml asks the dynamic loader for on Linux (pynvml._LoadNvmlLibrary: CDLL("libnvidia-ml.so.1")).
LIB_NAME = "libnvidia-ml.so.1"
# -Werror: a warning in the fake is a bug in the fake.
CFLAGS = ("-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", f"-Wl,-soname,{LIB_NAME}")


class FakeNvmlBuildError(RuntimeError):
    """The fake NVML library could not be compiled (no C compiler, or a compile error)."""


def build_fake_nvml(out_dir: Path | str) -> Path:
    """Compile the fake into ``out_dir/libnvidia-ml.so.1`` (skipped when an identical build is there)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / LIB_NAME
    stamp = out_dir / (LIB_NAME + ".sha256")
    digest = hashlib.sha256(SOURCE.read_bytes() + "\0".join(CFLAGS).encode()).hexdigest()
    if lib.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return lib
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise FakeNvmlBuildError("no C compiler (gcc/cc, or $CC) to build the fake NVML library")
    # Build to a temporary name and rename, so a concurrent reader never loads half a library.
    fd, tmp = tempfile.mkstemp(prefix=LIB_NAME + ".", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lpthread"], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise FakeNvmlBuildError(f"{cc} failed ({proc.returncode}):\n{proc.stderr}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stamp.write_text(digest + "\n")
    return lib
