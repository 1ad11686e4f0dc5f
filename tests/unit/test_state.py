"""The state file: round trip, atomic writes, refusal of unsafe files."""

from __future__ import annotations

import json
import os

import pytest

from pals_daemon.control.types import EngineTargets
from pals_daemon.errors import StateError
from pals_daemon.state import DaemonState, OriginalLimit, StateStore


def test_round_trip_and_mode(tmp_path):
    store = StateStore(tmp_path / "state")
    state = (
        DaemonState()
        .with_budget(1200.0)
        .with_targets("e1", EngineTargets(tokens_per_s=500.0, tpot_ms=80.0))
        .with_original("GPU-a", OriginalLimit(0, 400_000))
    )
    store.save(state)
    assert store.load() == state
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    assert os.stat(store.directory).st_mode & 0o777 == 0o700
    assert [p.name for p in store.directory.iterdir()] == ["state.json"]  # no temporary left behind


def test_first_original_wins():
    state = DaemonState().with_original("GPU-a", OriginalLimit(0, 400_000))
    state = state.with_original("GPU-a", OriginalLimit(0, 150_000))
    assert state.original_limits["GPU-a"].limit_mw == 400_000
    assert "GPU-a" not in state.without_original("GPU-a").original_limits


def test_missing_file_gives_fresh_state(tmp_path):
    assert StateStore(tmp_path / "s").load() == DaemonState()


def test_symlink_refused(tmp_path):
    store = StateStore(tmp_path / "s")
    store.save(DaemonState().with_budget(100.0))
    target = tmp_path / "elsewhere.json"
    target.write_text(store.path.read_text())
    store.path.unlink()
    store.path.symlink_to(target)
    with pytest.raises(StateError, match="safely"):
        store.load()


def test_group_writable_file_refused(tmp_path):
    store = StateStore(tmp_path / "s")
    store.save(DaemonState())
    os.chmod(store.path, 0o664)
    with pytest.raises(StateError, match="writable"):
        store.load()


def test_world_writable_directory_refused(tmp_path):
    directory = tmp_path / "s"
    directory.mkdir(mode=0o777)
    os.chmod(directory, 0o777)
    with pytest.raises(StateError, match="writable"):
        StateStore(directory).load()


@pytest.mark.parametrize(
    "doc",
    [
        "not json",
        json.dumps({"version": 99}),
        json.dumps({"version": 1, "budget_w": "NaN"}),
        json.dumps({"version": 1, "budget_w": -5}),
        json.dumps({"version": 1, "original_limits": {"GPU-a": {"gpu_index": 0, "limit_mw": -1}}}),
        json.dumps({"version": 1, "original_limits": {"GPU-a": {"gpu_index": 0}}}),
    ],
)
def test_corrupt_files_refused(tmp_path, doc):
    store = StateStore(tmp_path / "s")
    store.ensure_directory()
    fd = os.open(store.path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, doc.encode())
    os.close(fd)
    with pytest.raises(StateError):
        store.load()
