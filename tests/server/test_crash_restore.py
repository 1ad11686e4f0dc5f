"""Acceptance: nothing is left capped after kill -9, whichever way the daemon's exit is followed up.

The real ``pals-daemon`` process in enforce mode against the fake libnvidia-ml.so.1 (tests/fake_nvml): the
fake's state file shows the limits each GPU is left at, its call log every SetPowerManagementLimit. The
follow-ups are the ones a node sees: ``pals-daemon restore`` (systemd's ExecStopPost), a restart (systemd's
Restart=), a second crash before either, a state file naming a GPU that is not there.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from fake_nvml import FakeNvmlEnv
from fake_nvml.state import DEFAULT_DRIVER_VERSION, NVML_ERROR_NO_PERMISSION, fake_uuid
from test_daemon_subprocess import (  # the subprocess fixtures: one way to start the daemon for every test
    A100_ORIGINAL_MW,
    STOP_TIMEOUT_S,
    DaemonProcess,
    clean_env,
    ctl,
    empty_config,  # noqa: F401  (fixture)
    fake_limits,
    start_daemon,  # noqa: F401  (fixture)
    two_a100,  # noqa: F401  (fixture)
)

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.state import current_boot_id

# Short control period (a chosen test value): the restarted daemon re-caps within a few ticks.
PERIOD_S = "0.1"
# No metrics listener (port 0): tests running side by side would fight over the default port.
QUIET_FLAGS = ("--period-s", PERIOD_S, "--metrics-port", "0")
# Budget over the two A100s (2 x 400 W uncapped): the daemon must lower both.
BUDGET_W = 300
# Chosen bound on waiting for a restarted daemon to re-apply the budget (it does so on its first tick).
RECAP_TIMEOUT_S = 10.0


def start_running(start_daemon, fake: FakeNvmlEnv, mode: str = "enforce") -> DaemonProcess:  # noqa: F811
    """Start the daemon and wait until its control loop runs (its SIGTERM handler is installed by then)."""
    daemon = start_daemon("--backend", "nvml", "--mode", mode, *QUIET_FLAGS, env=fake.env)
    # The sockets answer before the loop starts; the start-up tick is tick 1, the loop's first tick is 2.
    deadline = time.monotonic() + RECAP_TIMEOUT_S
    with grpc.insecure_channel(f"unix:{daemon.admin_socket}") as channel:
        stub = pals_pb2_grpc.PowerAdminStub(channel)
        while stub.GetStatus(pals_pb2.GetStatusRequest(), timeout=5).controller.ticks < 2:
            assert time.monotonic() < deadline, f"control loop not running:\n{daemon.log()}"
            time.sleep(0.02)
    return daemon


def cap_under_budget(daemon: DaemonProcess, fake: FakeNvmlEnv, capsys: pytest.CaptureFixture[str]) -> list[int]:
    rc, _, err = ctl(capsys, daemon.admin_socket, "budget", "set", str(BUDGET_W))
    assert rc == 0, err
    lowered = fake_limits(fake)
    assert sum(lowered) <= BUDGET_W * 1000 and all(mw < A100_ORIGINAL_MW for mw in lowered), lowered
    return lowered


def kill9(daemon: DaemonProcess) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    assert daemon.proc.wait(STOP_TIMEOUT_S) == -signal.SIGKILL


def wait_capped(fake: FakeNvmlEnv) -> list[int]:
    deadline = time.monotonic() + RECAP_TIMEOUT_S
    while time.monotonic() < deadline:
        limits = fake_limits(fake)
        if sum(limits) <= BUDGET_W * 1000:
            return limits
        time.sleep(0.05)
    raise AssertionError(f"budget not re-applied within {RECAP_TIMEOUT_S} s: {fake_limits(fake)}")


def records(daemon: DaemonProcess) -> dict[str, dict]:
    return daemon.state()["original_limits"]


def assert_original_records(daemon: DaemonProcess) -> None:
    """Both A100s recorded at their ORIGINAL limit, stamped with this boot and the fake's driver."""
    assert records(daemon) == {
        fake_uuid(i): {
            "gpu_index": i,
            "limit_mw": A100_ORIGINAL_MW,
            "boot_id": current_boot_id(),
            "driver_version": DEFAULT_DRIVER_VERSION,
        }
        for i in (0, 1)
    }


def run_restore(config: Path, state_dir: Path, fake: FakeNvmlEnv) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pals_daemon.cli.daemon_main", "restore", "--backend", "nvml"]
    argv += ["--config", str(config), "--state-dir", str(state_dir)]
    return subprocess.run(argv, env=clean_env(fake.env), capture_output=True, text=True, timeout=30)


def set_calls_since(fake: FakeNvmlEnv, mark: int) -> list[tuple[int, int, int]]:
    """SetPowerManagementLimit calls logged after the first ``mark`` log entries, as (gpu, limit_mw, rc)."""
    return [
        (int(e.args[0]), int(e.args[1]), e.rc)
        for e in fake.log()[mark:]
        if e.function == "nvmlDeviceSetPowerManagementLimit"
    ]


def test_kill9_then_restore_puts_every_gpu_back(
    start_daemon,  # noqa: F811
    two_a100: FakeNvmlEnv,  # noqa: F811
    empty_config: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon = start_running(start_daemon, two_a100)
    lowered = cap_under_budget(daemon, two_a100, capsys)
    kill9(daemon)
    assert fake_limits(two_a100) == lowered  # nothing ran on the way out
    assert_original_records(daemon)
    assert (daemon.state_dir / "state.json").stat().st_mode & 0o777 == 0o600

    mark = len(two_a100.log())
    result = run_restore(empty_config, daemon.state_dir, two_a100)
    assert result.returncode == 0, result.stderr
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2
    assert sorted(set_calls_since(two_a100, mark)) == [(0, A100_ORIGINAL_MW, 0), (1, A100_ORIGINAL_MW, 0)]
    assert records(daemon) == {}


def test_kill9_then_restart_restores_before_control_and_keeps_the_original(
    start_daemon,  # noqa: F811
    two_a100: FakeNvmlEnv,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = start_running(start_daemon, two_a100)
    cap_under_budget(first, two_a100, capsys)
    kill9(first)

    mark = len(two_a100.log())
    second = start_running(start_daemon, two_a100)
    calls = set_calls_since(two_a100, mark)
    # Start-up wrote both GPUs back to the originals before any write of the control loop.
    assert calls[:2] == [(0, A100_ORIGINAL_MW, 0), (1, A100_ORIGINAL_MW, 0)], calls
    assert "restored to its original 400000 mW" in second.log()
    # The saved budget still binds: control caps again, and the record still holds the ORIGINAL limit.
    wait_capped(two_a100)
    assert any(mw < A100_ORIGINAL_MW for _, mw, _ in set_calls_since(two_a100, mark))
    assert_original_records(second)

    assert second.terminate() == 0, second.log()
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2
    assert records(second) == {}


def test_second_crash_before_restore_keeps_the_record(
    start_daemon,  # noqa: F811
    two_a100: FakeNvmlEnv,  # noqa: F811
    empty_config: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = start_running(start_daemon, two_a100)
    cap_under_budget(first, two_a100, capsys)
    kill9(first)
    second = start_running(start_daemon, two_a100)
    relowered = wait_capped(two_a100)
    kill9(second)
    # Left capped a second time: the record is still the limit found before the FIRST run.
    assert fake_limits(two_a100) == relowered
    assert_original_records(second)

    result = run_restore(empty_config, second.state_dir, two_a100)
    assert result.returncode == 0, result.stderr
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2
    assert records(second) == {}


def test_failed_restore_at_start_keeps_the_record_for_the_next_exit(
    start_daemon,  # noqa: F811
    two_a100: FakeNvmlEnv,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = start_running(start_daemon, two_a100)
    cap_under_budget(first, two_a100, capsys)
    kill9(first)
    fake = two_a100.read_state()
    fake.inject("nvmlDeviceSetPowerManagementLimit", NVML_ERROR_NO_PERMISSION, gpu=0, times=1)
    two_a100.write_state(fake)

    mark = len(two_a100.log())
    second = start_running(start_daemon, two_a100)
    calls = set_calls_since(two_a100, mark)
    assert calls[:2] == [(0, A100_ORIGINAL_MW, NVML_ERROR_NO_PERMISSION), (1, A100_ORIGINAL_MW, 0)], calls
    assert "GPU 0: cannot restore its original limit 400000 mW left by an earlier run (record kept)" in second.log()
    assert_original_records(second)  # GPU 0's record is still the original, not the limit it was found at
    assert second.terminate() == 0, second.log()
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2
    assert records(second) == {}


def test_record_of_an_absent_gpu_is_kept_and_never_applied_elsewhere(
    start_daemon,  # noqa: F811
    two_a100: FakeNvmlEnv,  # noqa: F811
    empty_config: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    # GPU 0 left at 250 W by a run in an earlier boot under another driver; a record for a board now gone
    # (same index 1 as a GPU present here, and a limit that board would accept).
    fake = two_a100.read_state()
    fake.gpus[0].limit_mw = 250_000
    two_a100.write_state(fake)
    gone = "GPU-0000dead-0000-4000-8000-000000000001"
    earlier = {"gpu_index": 0, "limit_mw": A100_ORIGINAL_MW, "boot_id": "earlier-boot", "driver_version": "535.1"}
    absent = {"gpu_index": 1, "limit_mw": 150_000, "boot_id": "earlier-boot", "driver_version": "535.1"}
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    doc = {"version": 2, "budget_w": None, "targets": {}, "original_limits": {fake_uuid(0): earlier, gone: absent}}
    (state_dir / "state.json").write_text(json.dumps(doc))
    (state_dir / "state.json").chmod(0o600)

    daemon = start_running(start_daemon, two_a100)
    # GPU 0 back by UUID despite the other boot; GPU 1 untouched: the absent board's record went nowhere.
    assert two_a100.set_limit_calls() == [(0, A100_ORIGINAL_MW, 0)]
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2
    log = daemon.log()
    assert "recorded under an earlier boot (earlier-boot" in log and "driver 535.1" in log
    assert f"GPU {gone} (index 1 then) by an earlier run: no such GPU is managed here; record kept" in log
    kept = records(daemon)
    assert kept[gone] == absent and kept[fake_uuid(0)] == earlier

    assert daemon.terminate() == 0, daemon.log()
    assert set(records(daemon)) == {gone}
    result = run_restore(empty_config, daemon.state_dir, two_a100)
    assert result.returncode == 1  # a record had to be kept: systemd shows the unit's stop as failed
    assert f"GPU {gone} (index 1) not found; record kept" in result.stderr
    assert set(records(daemon)) == {gone}
    assert all(mw != 150_000 for _, mw, _ in two_a100.set_limit_calls())
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2


def test_advise_mode_leaves_a_crashed_runs_caps_alone(
    start_daemon,  # noqa: F811
    two_a100: FakeNvmlEnv,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = start_running(start_daemon, two_a100)
    lowered = cap_under_budget(first, two_a100, capsys)
    kill9(first)
    mark = len(two_a100.log())
    advisor = start_running(start_daemon, two_a100, mode="advise")
    assert advisor.terminate() == 0, advisor.log()
    assert set_calls_since(two_a100, mark) == []  # advise mode never writes a GPU
    assert fake_limits(two_a100) == lowered
    assert "run 'pals-daemon restore'" in advisor.log()
    assert_original_records(advisor)


def test_untrusted_state_file_is_set_aside_and_the_daemon_starts_fresh(
    start_daemon,  # noqa: F811
    two_a100: FakeNvmlEnv,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Another user's file, linked in: its record would "restore" GPU 0 to 100 W.
    planted = tmp_path / "planted.json"
    bait = {"gpu_index": 0, "limit_mw": 100_000, "boot_id": None, "driver_version": None}
    planted.write_text(json.dumps({"version": 2, "original_limits": {fake_uuid(0): bait}}))
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    (state_dir / "state.json").symlink_to(planted)

    daemon = start_running(start_daemon, two_a100)
    assert two_a100.set_limit_calls() == []
    (aside,) = state_dir.glob("state.json.unsafe-*")
    assert aside.is_symlink()
    assert "ERROR" in daemon.log() and "is a symbolic link; set aside as" in daemon.log()
    # Fresh state: the records are of the limits found now, not the planted ones.
    assert {r["limit_mw"] for r in records(daemon).values()} == {A100_ORIGINAL_MW}
    assert daemon.terminate() == 0, daemon.log()
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2


def test_sigterm_during_start_up_still_restores(
    start_daemon,  # noqa: F811
    two_a100: FakeNvmlEnv,  # noqa: F811
) -> None:
    """SIGTERM as soon as the sockets answer (the start-up tick may already have capped): orderly stop, restored.

    The handler is installed at the start of start-up, not when the control loop begins; before that, a
    SIGTERM in this window killed the daemon (exit -15) with the GPUs left capped until ExecStopPost.
    """
    # Slow setters (a chosen 0.8 s, under the raised worker timeout) hold the start-up tick open, so the SIGTERM
    # surely lands in it: before the fix this test saw exit -15 every time.
    state = two_a100.read_state()
    state.slow("nvmlDeviceSetPowerManagementLimit", 800)
    two_a100.write_state(state)
    flags = ("--backend", "nvml", "--mode", "enforce", "--budget-w", str(BUDGET_W), "--gpu-timeout-s", "5")
    daemon = start_daemon(*flags, *QUIET_FLAGS, env=two_a100.env)  # returns once the admin socket answers
    with grpc.insecure_channel(f"unix:{daemon.admin_socket}") as channel:
        status = pals_pb2_grpc.PowerAdminStub(channel).GetStatus(pals_pb2.GetStatusRequest(), timeout=5)
    assert status.controller.ticks == 0  # still in the start-up tick
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(STOP_TIMEOUT_S) == 0, daemon.log()
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW, A100_ORIGINAL_MW]
    assert records(daemon) == {}
