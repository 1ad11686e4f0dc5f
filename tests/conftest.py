"""Shared fixtures: the fake libnvidia-ml.so.1 (tests/fake_nvml), built once per session, and short temp dirs."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is not a package: put it on sys.path so `fake_nvml` imports from any test directory.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from fake_nvml import FakeNvmlEnv, build_fake_nvml, make_env, point_pynvml_at  # noqa: E402


@pytest.fixture(scope="session")
def fake_nvml_lib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory holding the compiled fake libnvidia-ml.so.1 (one compile per session)."""
    return build_fake_nvml(tmp_path_factory.mktemp("fake_nvml_lib")).parent


@pytest.fixture
def fake_nvml_env(tmp_path: Path, fake_nvml_lib_dir: Path) -> FakeNvmlEnv:
    """A fresh fake machine (two H100-SXM5) for this test; ``.env`` runs a subprocess against it."""
    return make_env(fake_nvml_lib_dir, tmp_path)


@pytest.fixture
def fake_pynvml(fake_nvml_env: FakeNvmlEnv) -> Iterator[FakeNvmlEnv]:
    """``fake_nvml_env`` with this process's pynvml pointed at the fake for the test's duration."""
    with point_pynvml_at(fake_nvml_env):
        yield fake_nvml_env


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh directory directly under /tmp: AF_UNIX socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pals-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dirs(short_tmp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """(runtime dir for a daemon's sockets, its state dir); no systemd; the process umask put back afterwards
    (Runner.start sets 0077 for the whole process). tests/server overrides it with its harness's ``Dirs``."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    umask = os.umask(0o022)
    os.umask(umask)
    yield short_tmp / "run", tmp_path / "state"
    os.umask(umask)
