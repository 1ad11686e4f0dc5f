"""Issue 10 B4: apply before persist. With the state filesystem full or read-only, a budget cut still takes
effect on the GPUs; the failed save is logged, shown in the status and the metrics, and retried every tick
until it succeeds. A budget ramp is saved and resumed by a restart; save()'s temporary files left by a kill -9
are removed at the next start.

The full and read-only filesystems are real: a 256 KiB tmpfs mounted for the test (filled up, or remounted
read-only). Where this process may not mount (not root, or no CAP_SYS_ADMIN), the same failures are injected
into StateStore.save instead (the OSError the kernel would raise), and the assertions are the same.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import Dirs, drive, running
from prometheus_client import generate_latest

from pals_daemon.api import pals_pb2
from pals_daemon.state import StateStore

TMPFS_BYTES = 256 << 10


class StateDisk:
    """The state directory's filesystem, which the test can fill up, make read-only, and free again."""

    def __init__(self, root: Path, mounted: bool) -> None:
        self.root = root
        self.mounted = mounted
        self.injected: OSError | None = None  # used when not mounted
        self._filler = root / "filler"

    def fill(self) -> None:
        if not self.mounted:
            self.injected = OSError(errno.ENOSPC, "No space left on device")
            return
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)

    def read_only(self) -> None:
        if not self.mounted:
            self.injected = OSError(errno.EROFS, "Read-only file system")
            return
        subprocess.run(["mount", "-o", "remount,ro", str(self.root)], check=True, capture_output=True)

    def free(self) -> None:
        self.injected = None
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,rw", str(self.root)], check=True, capture_output=True)
            self._filler.unlink(missing_ok=True)


@pytest.fixture
def state_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StateDisk]:
    root = tmp_path / "statefs"
    root.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0700", "tmpfs", str(root)], capture_output=True
        ).returncode
        == 0
    )
    disk = StateDisk(root, mounted)
    if not mounted:
        real_save = StateStore.save

        def save(self: StateStore, state) -> None:  # the kernel's answer on a full / read-only filesystem
            if disk.injected is not None and self.directory.is_relative_to(root):
                raise disk.injected
            real_save(self, state)

        monkeypatch.setattr(StateStore, "save", save)
    try:
        yield disk
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)


def metric(node, name: str) -> float:
    for line in generate_latest(node.runner.metrics.registry).decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_budget_cut_takes_effect_when_the_state_cannot_be_saved(
    fault: str, dirs: Dirs, state_disk: StateDisk, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir = state_disk.root / "state"

    async def body() -> None:
        async with running(dirs, state_dir=str(state_dir), budget_w=1200.0) as node:
            assert sum(node.enforced_mw()) <= 1_200_000
            state_disk.fill() if fault == "full" else state_disk.read_only()
            with caplog.at_level(logging.ERROR):
                reply = await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=800.0), timeout=1.0)
            assert reply.budget_w == 800.0
            # In force on the GPUs at once, whatever the disk said.
            assert sum(node.enforced_mw()) <= 800_000
            status = await node.admin.GetStatus(pals_pb2.GetStatusRequest())
            assert status.controller.state_save_error != ""
            assert status.controller.state_save_failures >= 1
            assert metric(node, "pals_state_save_failing") == 1.0
            assert any("cannot save the state" in r.getMessage() for r in caplog.records)
            # Retried at every tick: more failures while the disk stays bad...
            failures = status.controller.state_save_failures
            await node.runner.daemon.tick()
            assert node.runner.daemon.persist.failures > failures
            # ...and saved once it is fixed.
            state_disk.free()
            await node.runner.daemon.tick()
            status = await node.admin.GetStatus(pals_pb2.GetStatusRequest())
            assert status.controller.state_save_error == ""
            assert metric(node, "pals_state_save_failing") == 0.0
            assert json.loads((state_dir / "state.json").read_text())["budget_w"] == 800.0

    drive(body())


def test_a_restart_resumes_a_budget_ramp(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=1000.0, ramp_s=60.0))
            saved = json.loads(node.state_path.read_text())
            assert saved["budget_w"] == 1000.0
            assert saved["budget_ramp"]["ramp_s"] == 60.0
            assert saved["budget_ramp"]["start_w"] == pytest.approx(1600.0)  # 4 x 400 W: the node's maximum
        async with running(dirs) as node:
            budget = (await node.admin.GetStatus(pals_pb2.GetStatusRequest())).budget
            # Where the ramp is now, not its end: ~1600 W with ~60 s left.
            assert budget.budget_w == 1000.0
            assert 1500.0 < budget.effective_budget_w <= 1600.0
            assert 50.0 < budget.ramp_remaining_s <= 60.0
            # A budget set without a ramp clears the saved one.
            await node.admin.SetBudget(pals_pb2.SetBudgetRequest(budget_w=900.0))
            assert json.loads(node.state_path.read_text())["budget_ramp"] is None
        async with running(dirs) as node:
            budget = (await node.admin.GetStatus(pals_pb2.GetStatusRequest())).budget
            assert budget.effective_budget_w == 900.0 and budget.ramp_remaining_s == 0.0

    drive(body())


def test_temporary_files_of_an_interrupted_save_are_removed_at_start(dirs: Dirs) -> None:
    state_dir = Path(dirs.state)
    state_dir.mkdir(mode=0o700, parents=True)
    left = state_dir / ".state-k9xyz"
    left.write_bytes(b'{"version": 3, "budg')  # what a kill -9 in the middle of save() leaves
    other = state_dir / "notes.txt"
    other.write_text("kept")

    async def body() -> None:
        async with running(dirs):
            assert not left.exists()
            assert other.exists()
            assert [p.name for p in state_dir.iterdir() if p.name.startswith(".state-")] == []

    drive(body())
