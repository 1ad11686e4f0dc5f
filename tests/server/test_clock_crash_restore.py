"""Acceptance: clocks AND limits back at their originals whichever way the daemon exits (SIGTERM, kill -9 +
``pals-daemon restore``, kill -9 + restart, two crashes); an unsupported clock call leaves that GPU on cap-only
control and says so; advise mode calls no setter.

The real daemon process in enforce mode on two fake H100s (tests/fake_nvml) through pynvml's real ctypes
path, started through tests/server/clock_shim.py: the SLO-driven controller that will choose clocks is not
built yet, so the shim adds a fixed SM clock ceiling to every decision of the real controller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from clock_shim import ENV as LOCK_ENV
from fake_nvml import FakeNvmlEnv, FakeNvmlState
from fake_nvml.state import NVML_ERROR_NOT_SUPPORTED, fake_uuid
from test_crash_restore import kill9, run_restore
from test_daemon_subprocess import (
    DaemonProcess,
    ctl,
    empty_config,  # noqa: F401  (fixture)
    start_daemon,  # noqa: F401  (fixture)
)

from pals_daemon.api import pals_pb2, pals_pb2_grpc

SHIM = Path(__file__).with_name("clock_shim.py")
# A supported clock of the fake H100 (1980 - 38 x 15 MHz), and the floor of every lock.
LOCK_MHZ = 1410
H100_MIN_MHZ = 345
H100_ORIGINAL_MW = 700_000
# Over the two H100s (2 x 700 W uncapped): the daemon must lower both limits too.
BUDGET_W = 600
FLAGS = ("--backend", "nvml", "--period-s", "0.1", "--metrics-port", "0")
# Chosen bound on waiting for a (re)started daemon to lock and cap (it does so on its first ticks).
SETTLE_TIMEOUT_S = 10.0
LOCK = "nvmlDeviceSetGpuLockedClocks"
RESET = "nvmlDeviceResetGpuLockedClocks"
ORIGINAL = [(H100_ORIGINAL_MW, None, None)] * 2


@pytest.fixture
def two_h100(fake_nvml_env: FakeNvmlEnv) -> FakeNvmlEnv:
    fake_nvml_env.write_state(FakeNvmlState.of("H100-SXM5", "H100-SXM5"))
    return fake_nvml_env


@pytest.fixture
def start_shim(start_daemon) -> Callable[..., DaemonProcess]:  # noqa: F811
    """Start the daemon through the shim, locking every GPU at LOCK_MHZ."""

    def start(fake: FakeNvmlEnv, *flags: str) -> DaemonProcess:
        return start_daemon(*FLAGS, *flags, env={**fake.env, LOCK_ENV: str(LOCK_MHZ)}, program=(str(SHIM),))

    return start


def gpus(fake: FakeNvmlEnv) -> list[tuple[int, int | None, int | None]]:
    """(limit mW, locked min MHz, locked max MHz) per GPU, as the fake driver holds them."""
    return [(g.limit_mw, g.locked_min_mhz, g.locked_max_mhz) for g in fake.read_state().gpus]


def settled(daemon: DaemonProcess, fake: FakeNvmlEnv, capsys: pytest.CaptureFixture[str]) -> None:
    """Set the budget and wait until both GPUs are capped under it and locked at LOCK_MHZ."""
    rc, _, err = ctl(capsys, daemon.admin_socket, "budget", "set", str(BUDGET_W))
    assert rc == 0, err
    wait_settled(fake, daemon)


def wait_settled(fake: FakeNvmlEnv, daemon: DaemonProcess) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        now = gpus(fake)
        locked = all((lo, hi) == (H100_MIN_MHZ, LOCK_MHZ) for _, lo, hi in now)
        if locked and sum(mw for mw, _, _ in now) <= BUDGET_W * 1000:
            return
        time.sleep(0.05)
    raise AssertionError(f"not capped and locked within {SETTLE_TIMEOUT_S} s: {gpus(fake)}\n{daemon.log()}")


def assert_records(daemon: DaemonProcess) -> None:
    """Both GPUs recorded: the ORIGINAL limit, and clocks at the driver default."""
    state = daemon.state()
    assert {u: r["limit_mw"] for u, r in state["original_limits"].items()} == {
        fake_uuid(i): H100_ORIGINAL_MW for i in (0, 1)
    }
    assert {u: r["gpu_index"] for u, r in state["original_clocks"].items()} == {fake_uuid(i): i for i in (0, 1)}


def assert_no_records(daemon: DaemonProcess) -> None:
    state = daemon.state()
    assert state["original_limits"] == {} and state["original_clocks"] == {}


def restored(daemon: DaemonProcess, config: Path, fake: FakeNvmlEnv) -> None:
    """``pals-daemon restore`` after the daemon died: exit 0, every GPU at its original, no record left."""
    result = run_restore(config, daemon.state_dir, fake)
    assert result.returncode == 0, result.stderr
    assert gpus(fake) == ORIGINAL
    assert_no_records(daemon)


def test_sigterm_puts_back_clocks_and_limits(
    start_shim, two_h100: FakeNvmlEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = start_shim(two_h100)
    settled(daemon, two_h100, capsys)
    assert_records(daemon)
    assert daemon.terminate() == 0, daemon.log()
    assert gpus(two_h100) == ORIGINAL
    assert_no_records(daemon)


def test_kill9_then_restore_puts_back_clocks_and_limits(
    start_shim,
    two_h100: FakeNvmlEnv,
    empty_config: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon = start_shim(two_h100)
    settled(daemon, two_h100, capsys)
    kill9(daemon)
    assert all((lo, hi) == (H100_MIN_MHZ, LOCK_MHZ) for _, lo, hi in gpus(two_h100))  # nothing ran on the way out
    assert_records(daemon)
    mark = len(two_h100.log())
    restored(daemon, empty_config, two_h100)
    resets = sorted(e.args[0] for e in two_h100.log()[mark:] if e.function == RESET and e.rc == 0)
    assert resets == ["0", "1"]


def test_kill9_then_restart_resets_before_control_then_sigterm(
    start_shim, two_h100: FakeNvmlEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    first = start_shim(two_h100)
    settled(first, two_h100, capsys)
    kill9(first)
    mark = len(two_h100.log())
    second = start_shim(two_h100)
    wait_settled(two_h100, second)  # the saved budget still binds; the clocks are locked again
    calls = [(e.function, e.args[0]) for e in two_h100.log()[mark:] if e.function in (LOCK, RESET)]
    # Start-up reset both leftover locks before the control loop locked again (not taken for an operator's).
    assert sorted(calls[:2]) == [(RESET, "0"), (RESET, "1")] and sorted(calls[2:4]) == [(LOCK, "0"), (LOCK, "1")]
    assert "clocks left locked by an earlier run that did not stop cleanly; reset" in second.log()
    assert_records(second)  # the limit record still holds the ORIGINAL limit
    assert second.terminate() == 0, second.log()
    assert gpus(two_h100) == ORIGINAL
    assert_no_records(second)


def test_two_crashes_then_restore(
    start_shim,
    two_h100: FakeNvmlEnv,
    empty_config: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = start_shim(two_h100)
    settled(first, two_h100, capsys)
    kill9(first)
    second = start_shim(two_h100)
    wait_settled(two_h100, second)
    kill9(second)
    assert_records(second)  # still the state found before the FIRST run
    restored(second, empty_config, two_h100)


def test_unsupported_clock_call_leaves_that_gpu_cap_only_and_says_so(
    start_shim, two_h100: FakeNvmlEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    state = two_h100.read_state()
    state.inject(LOCK, NVML_ERROR_NOT_SUPPORTED, gpu=1)
    two_h100.write_state(state)
    daemon = start_shim(two_h100)
    rc, _, err = ctl(capsys, daemon.admin_socket, "budget", "set", str(BUDGET_W))
    assert rc == 0, err
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    with grpc.insecure_channel(f"unix:{daemon.admin_socket}") as channel:
        stub = pals_pb2_grpc.PowerAdminStub(channel)
        while True:
            g0, g1 = stub.GetStatus(pals_pb2.GetStatusRequest(), timeout=5).gpus
            if g0.HasField("locked_clock_requested_mhz") and not g1.clock_control:
                break
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
    assert "NOT_SUPPORTED" in g1.clock_control_note and g1.controlled
    # Cap-only on GPU 1: its limit still obeys the budget.
    assert sum(mw for mw, _, _ in gpus(two_h100)) <= BUDGET_W * 1000
    rc, out, _ = ctl(capsys, daemon.admin_socket, "status")
    assert rc == 0
    lines = out.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.rstrip().endswith("clock control"))
    line = lines[header + 2]  # the clock table's row of GPU 1
    assert line.split()[0] == "1" and line.split()[1] == "none"
    assert "no: cannot lock the SM clock" in line and "cap-only control" in line
    assert "GPU 1: cannot lock the SM clock at 1410 MHz" in daemon.log()
    assert daemon.terminate() == 0, daemon.log()
    assert gpus(two_h100) == ORIGINAL
    assert_no_records(daemon)


def test_advise_mode_calls_no_setter(start_shim, two_h100: FakeNvmlEnv, capsys: pytest.CaptureFixture[str]) -> None:
    daemon = start_shim(two_h100, "--mode", "advise")
    rc, _, err = ctl(capsys, daemon.admin_socket, "budget", "set", str(BUDGET_W))
    assert rc == 0, err
    with grpc.insecure_channel(f"unix:{daemon.admin_socket}") as channel:
        stub = pals_pb2_grpc.PowerAdminStub(channel)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while not stub.GetStatus(pals_pb2.GetStatusRequest(), timeout=5).gpus[0].HasField("locked_clock_decided_mhz"):
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
    assert daemon.terminate() == 0, daemon.log()
    assert [e for e in two_h100.log() if e.function.startswith("nvmlDeviceSet") or e.function == RESET] == []
    assert gpus(two_h100) == ORIGINAL
