"""The real ``pals-daemon`` process (python -m pals_daemon.cli.daemon_main), driven with palsctl and signals.

palsctl runs in this process (``palsctl.main([...])``) so that its output can be read with capsys; the
NVML cases run the daemon against the fake libnvidia-ml.so.1 (tests/fake_nvml) through its environment.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from fake_nvml import FakeNvmlEnv, FakeNvmlState

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.cli import palsctl

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
A100_ORIGINAL_MW = 400_000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a daemon: no systemd sockets, no PALS_* settings leaking in from the caller."""
    env = dict(os.environ if base is None else base)
    for key in list(env):
        if key.startswith("PALS_") or key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            del env[key]
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    runtime_dir: Path
    state_dir: Path
    log_path: Path

    @property
    def admin_socket(self) -> Path:
        return self.runtime_dir / "admin" / "admin.sock"

    @property
    def engine_socket(self) -> Path:
        return self.runtime_dir / "engine.sock"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def state(self) -> dict:
        return json.loads((self.state_dir / "state.json").read_text())

    def wait_ready(self) -> None:
        """Until PowerAdmin answers on the admin socket (fails at once if the process exits)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if self.admin_socket.exists():
                with grpc.insecure_channel(f"unix:{self.admin_socket}") as channel:
                    try:
                        pals_pb2_grpc.PowerAdminStub(channel).GetStatus(pals_pb2.GetStatusRequest(), timeout=0.5)
                        return
                    except grpc.RpcError:
                        pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready after {START_TIMEOUT_S} s:\n{self.log()}")

    def terminate(self) -> int:
        """SIGTERM and the exit status (AssertionError if it takes longer than STOP_TIMEOUT_S)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running {STOP_TIMEOUT_S} s after SIGTERM:\n{self.log()}") from None


@pytest.fixture
def empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "pals.toml"
    path.write_text("")
    return path


@pytest.fixture
def start_daemon(short_tmp: Path, tmp_path: Path, empty_config: Path) -> Iterator:
    started: list[DaemonProcess] = []

    def start(
        *flags: str, env: dict[str, str] | None = None, program: tuple[str, ...] = ("-m", "pals_daemon.cli.daemon_main")
    ) -> DaemonProcess:
        runtime_dir = short_tmp / "run"
        state_dir = tmp_path / "state"
        log_path = tmp_path / f"daemon{len(started)}.log"
        argv = [
            sys.executable,
            *program,
            "--config",
            str(empty_config),
            "--runtime-dir",
            str(runtime_dir),
            "--state-dir",
            str(state_dir),
            "--engine-socket-group",
            "",
            *flags,
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=clean_env(env))
        daemon = DaemonProcess(proc, runtime_dir, state_dir, log_path)
        started.append(daemon)
        daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def ctl(capsys: pytest.CaptureFixture[str], socket_path: Path, *args: str) -> tuple[int, str, str]:
    """Run palsctl in this process; (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = palsctl.main(["--socket", str(socket_path), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


# ------------------------------------------------------------------------------------------ sim backend


def test_sim_daemon_end_to_end_with_palsctl(start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    daemon = start_daemon("--backend", "sim", "--metrics-port", str(port), "--period-s", "0.2")
    sock = daemon.admin_socket

    rc, out, err = ctl(capsys, sock, "status")
    assert rc == 0, err
    gpu_rows = [line for line in out.splitlines() if "100-400" in line]
    assert len(gpu_rows) == 4, out
    assert "mode enforce" in out and "backend sim" in out
    assert "budget none" in out

    rc, out, err = ctl(capsys, sock, "budget", "set", "1000")
    assert rc == 0, err
    assert out.startswith("budget 1000 W"), out
    assert "pals_node_power_budget_watts 1000.0" in scrape(port).splitlines()

    rc, out, err = ctl(capsys, sock, "status", "--json")
    assert rc == 0, err
    status = json.loads(out)
    assert status["budget"]["budget_w"] == 1000.0
    assert status["budget"]["sum_enforced_limits_w"] <= 1000.0
    assert sum(g["enforced_limit_w"] for g in status["gpus"]) <= 1000.0
    assert len(daemon.state()["original_limits"]) == 4

    for bad in ("nan", "-5", "10", "abc"):
        rc, out, err = ctl(capsys, sock, "budget", "set", bad)
        assert rc != 0, bad
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("palsctl:"), (bad, err)
        assert out == ""
    rc, out, err = ctl(capsys, sock, "budget", "get")
    assert rc == 0, err
    assert out.startswith("budget 1000 W"), out
    assert daemon.state()["budget_w"] == 1000.0

    rc, out, err = ctl(capsys, sock, "target", "set", "e1", "--tokens-per-s", "500")
    assert rc == 0, err
    assert json.loads(out) == {"tokens_per_s": 500.0}
    assert daemon.state()["targets"]["e1"]["tokens_per_s"] == 500.0
    rc, out, err = ctl(capsys, sock, "target", "set", "e1", "--tokens-per-s", "-1")
    assert rc != 0
    assert err.startswith("palsctl: INVALID_ARGUMENT") and len(err.splitlines()) == 1, err
    assert daemon.state()["targets"]["e1"]["tokens_per_s"] == 500.0

    rc, out, err = ctl(capsys, sock, "watch", "--count", "2")
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 2, out
    # Each line: the snapshot's time, then the tick.
    assert all(line.split()[1] == "tick" and "budget 1000 W" in line for line in lines)
    ticks = [int(line.split()[2]) for line in lines]
    assert ticks[1] > ticks[0]

    assert daemon.terminate() == 0, daemon.log()
    assert not daemon.admin_socket.exists()
    assert not daemon.engine_socket.exists()
    assert daemon.state()["original_limits"] == {}
    with pytest.raises(OSError):
        scrape(port)


# ------------------------------------------------------------------------------------------ NVML backend


@pytest.fixture
def two_a100(fake_nvml_env: FakeNvmlEnv) -> FakeNvmlEnv:
    fake_nvml_env.write_state(FakeNvmlState.of("A100-SXM4", "A100-SXM4"))
    return fake_nvml_env


def fake_limits(fake: FakeNvmlEnv) -> list[int]:
    return [g.limit_mw for g in fake.read_state().gpus]


def test_nvml_daemon_restores_limits_on_sigterm(
    start_daemon, two_a100: FakeNvmlEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = start_daemon("--backend", "nvml", "--metrics-port", "0", env=two_a100.env)
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2
    assert two_a100.set_limit_calls() == []

    rc, out, err = ctl(capsys, daemon.admin_socket, "budget", "set", "300")
    assert rc == 0, err
    limits = fake_limits(two_a100)
    assert sum(limits) <= 300_000, limits
    assert all(limit < A100_ORIGINAL_MW for limit in limits)
    originals = daemon.state()["original_limits"]
    assert sorted(o["limit_mw"] for o in originals.values()) == [A100_ORIGINAL_MW] * 2

    assert daemon.terminate() == 0, daemon.log()
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2
    calls = two_a100.set_limit_calls()
    for index in (0, 1):
        mine = [(limit, rc) for gpu, limit, rc in calls if gpu == index]
        assert mine[-1] == (A100_ORIGINAL_MW, 0), calls
        assert any(limit < A100_ORIGINAL_MW for limit, _ in mine)
    assert daemon.state()["original_limits"] == {}
    assert not daemon.admin_socket.exists()


def test_nvml_restore_after_sigkill(
    start_daemon, two_a100: FakeNvmlEnv, empty_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = start_daemon("--backend", "nvml", "--metrics-port", "0", env=two_a100.env)
    rc, out, err = ctl(capsys, daemon.admin_socket, "budget", "set", "300")
    assert rc == 0, err
    lowered = fake_limits(two_a100)
    assert sum(lowered) <= 300_000

    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(STOP_TIMEOUT_S)
    # Nothing ran on the way out: the limits stay lowered and the record of the originals stays on disk.
    assert fake_limits(two_a100) == lowered
    originals = daemon.state()["original_limits"]
    assert sorted((o["gpu_index"], o["limit_mw"]) for o in originals.values()) == [
        (0, A100_ORIGINAL_MW),
        (1, A100_ORIGINAL_MW),
    ]

    restore = [
        sys.executable,
        "-m",
        "pals_daemon.cli.daemon_main",
        "restore",
        "--backend",
        "nvml",
        "--config",
        str(empty_config),
        "--state-dir",
        str(daemon.state_dir),
    ]
    env = clean_env(two_a100.env)
    first = subprocess.run(restore, env=env, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2
    assert daemon.state()["original_limits"] == {}
    assert daemon.state()["budget_w"] == 300.0
    calls = two_a100.set_limit_calls()

    second = subprocess.run(restore, env=env, capture_output=True, text=True, timeout=30)
    assert second.returncode == 0, second.stderr
    assert two_a100.set_limit_calls() == calls  # nothing recorded, nothing written
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2


# ------------------------------------------------------------------------------------------ configuration


def test_config_errors_are_all_reported_with_exit_2(empty_config: Path, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "pals_daemon.cli.daemon_main", "--config", str(empty_config)]
    argv += ["--backend", "cuda", "--period-s", "-1", "--state-dir", str(tmp_path / "state")]
    result = subprocess.run(argv, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "backend: 'cuda' is not one of nvml, sim" in result.stderr
    assert "period_s: must be a finite number > 0" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "state").exists()
