"""A non-editable install runs: build the wheel, install it in a fresh venv, run the installed ``pals-daemon``
(sim backend) and ``palsctl`` from a directory outside the checkout.

The wheel is built from a copy of the package's sources (no stale build/ of the checkout can leak in). The
fresh venv gets only the wheel (``--no-deps``, no index); its dependencies come from the test venv's
site-packages through a .pth line, so nothing is downloaded. The test checks the daemon really imports the
installed copy and reads the profiles shipped inside it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import grpc
import pytest

from pals_daemon.api import pals_pb2, pals_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "pals_daemon", "profiles", "proto")
START_TIMEOUT_S = 30.0


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            # symlinks=True: pals_daemon/profiles and pals_daemon/proto stay links to ../profiles and ../proto.
            shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp / "dist"
    run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", dist)
    (wheel,) = dist.glob("pals_daemon-*.whl")
    return wheel


def make_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # Dependencies (grpcio, numpy, ...) from this test venv; appended after the fresh site-packages.
    (purelib / "_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_carries_profiles_and_proto(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("pals_daemon/profiles/") and n.endswith(".json"))
    profiles = ROOT / "profiles"
    in_checkout = sorted("pals_daemon/profiles/" + p.relative_to(profiles).as_posix() for p in profiles.rglob("*.json"))
    assert shipped == in_checkout and len(shipped) > 0
    assert "pals_daemon/proto/pals/v1/pals.proto" in names


def test_installed_wheel_runs_the_sim_daemon_outside_the_checkout(wheel: Path, tmp_path: Path, short_tmp: Path) -> None:
    venv = make_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python = venv / "bin" / "python"
    where = run(python, "-c", "import pals_daemon; print(pals_daemon.__file__)", cwd=elsewhere).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    proto = run(python, "-c", "from pals_daemon.resources import proto_path; print(proto_path())", cwd=elsewhere)
    proto_file = Path(proto.stdout.strip())
    assert proto_file.is_relative_to(venv)
    assert proto_file.read_text() == (ROOT / "proto" / "pals" / "v1" / "pals.proto").read_text()

    admin = short_tmp / "run" / "admin" / "admin.sock"
    log_path = tmp_path / "daemon.log"
    argv = [venv / "bin" / "pals-daemon", "--backend", "sim", "--config", "/dev/null", "--metrics-port", "0"]
    argv += ["--runtime-dir", short_tmp / "run", "--state-dir", tmp_path / "state", "--engine-socket-group", ""]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(a) for a in argv], cwd=elsewhere, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not admin.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        with grpc.insecure_channel(f"unix:{admin}") as channel:
            grpc.channel_ready_future(channel).result(timeout=START_TIMEOUT_S)
            status = pals_pb2_grpc.PowerAdminStub(channel).GetStatus(pals_pb2.GetStatusRequest(), timeout=5)
        assert len(status.gpus) == 4 and status.controller.backend == "sim"
        ctl = run(venv / "bin" / "palsctl", "--socket", admin, "status", cwd=elsewhere)
        assert "backend sim" in ctl.stdout
        n_profiles = len(list((ROOT / "profiles").rglob("*.json")))
        installed_profiles = venv.joinpath(*Path(where).parent.relative_to(venv).parts, "profiles")
        assert f"{n_profiles} profile(s) from {installed_profiles}" in log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(10)
    assert rc == 0, log_path.read_text()
