"""The state file: round trip, atomic writes, schema versions, and untrusted files set aside (never read)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib

import pytest

from pals_daemon import state as state_module
from pals_daemon.control.types import EngineTargets
from pals_daemon.errors import StateError
from pals_daemon.state import (
    SCHEMA_VERSION,
    UNSAFE_SUFFIX,
    DaemonState,
    OriginalLimit,
    StateStore,
    current_boot_id,
    decode_state,
)

BOOT = "0b5e1d2c-3f4a-4b6c-8d9e-0f1a2b3c4d5e"
SAVED = DaemonState().with_budget(100.0).with_original("GPU-a", OriginalLimit(0, 400_000, BOOT, "550.54.15"))


def write_raw(store: StateStore, data: bytes, mode: int = 0o600) -> None:
    store.ensure_directory()
    fd = os.open(store.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.write(fd, data)
    os.close(fd)
    os.chmod(store.path, mode)


def assert_set_aside(store: StateStore, caplog: pytest.LogCaptureFixture, why: str, content: bytes | None) -> None:
    """load() gave fresh state, renamed the file (not a copy of its target), and logged why at ERROR."""
    with caplog.at_level(logging.ERROR, logger="pals_daemon.state"):
        assert store.load() == DaemonState()
    assert not os.path.lexists(store.path)
    (aside,) = store.set_aside
    assert aside.parent == store.directory and aside.name.startswith("state.json" + UNSAFE_SUFFIX)
    assert [p.name for p in store.directory.iterdir()] == [aside.name]
    if content is not None:
        assert aside.read_bytes() == content
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and why in errors[0].getMessage() and str(aside) in errors[0].getMessage()
    # The next start finds no file and a fresh save works.
    store.save(SAVED)
    assert store.load() == SAVED


def test_round_trip_and_mode(tmp_path):
    store = StateStore(tmp_path / "state")
    state = (
        DaemonState()
        .with_budget(1200.0)
        .with_targets("e1", EngineTargets(tokens_per_s=500.0, tpot_ms=80.0))
        .with_original("GPU-a", OriginalLimit(0, 400_000, BOOT, "550.54.15"))
        .with_original("GPU-b", OriginalLimit(1, 300_000))
    )
    store.save(state)
    assert store.load() == state
    assert json.loads(store.path.read_text())["version"] == SCHEMA_VERSION == 3
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    assert os.stat(store.directory).st_mode & 0o777 == 0o700
    assert [p.name for p in store.directory.iterdir()] == ["state.json"]  # no temporary left behind


def test_first_original_wins():
    state = DaemonState().with_original("GPU-a", OriginalLimit(0, 400_000, BOOT, "550.54.15"))
    state = state.with_original("GPU-a", OriginalLimit(0, 150_000, "another-boot", "570.124.06"))
    assert state.original_limits["GPU-a"] == OriginalLimit(0, 400_000, BOOT, "550.54.15")
    assert "GPU-a" not in state.without_original("GPU-a").original_limits


def test_missing_file_gives_fresh_state(tmp_path):
    store = StateStore(tmp_path / "s")
    assert store.load() == DaemonState()
    assert store.set_aside == []


def test_version_1_file_is_read_as_from_an_unknown_boot(tmp_path):
    # An upgrade must not lose the records of GPUs a version-1 daemon left capped.
    store = StateStore(tmp_path / "s")
    doc = {
        "version": 1,
        "budget_w": 900.0,
        "targets": {"e1": {"tokens_per_s": 500.0, "ttft_ms": None, "tpot_ms": None}},
        "original_limits": {"GPU-a": {"gpu_index": 2, "limit_mw": 400_000}},
    }
    write_raw(store, json.dumps(doc).encode())
    state = store.load()
    assert state.original_limits == {"GPU-a": OriginalLimit(2, 400_000, boot_id=None, driver_version=None)}
    assert state.budget_w == 900.0 and state.targets["e1"].tokens_per_s == 500.0
    assert store.set_aside == []
    store.save(state)  # written back as the current version
    assert json.loads(store.path.read_text())["version"] == SCHEMA_VERSION
    assert store.load() == state


def test_current_boot_id_is_this_boot():
    boot = current_boot_id()
    assert boot == pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert len(boot) == 36 and boot.count("-") == 4


def test_symlink_is_set_aside_not_followed(tmp_path, caplog):
    store = StateStore(tmp_path / "s")
    store.save(DaemonState().with_original("GPU-a", OriginalLimit(0, 100_000)))
    target = tmp_path / "elsewhere.json"
    target.write_text(store.path.read_text())
    before = target.read_bytes()
    store.path.unlink()
    store.path.symlink_to(target)
    assert_set_aside(store, caplog, "symbolic link", content=None)
    # The link itself was moved; its target is untouched and was not read into the state.
    (aside,) = store.set_aside
    assert aside.is_symlink() and os.readlink(aside) == str(target)
    assert target.read_bytes() == before


def test_dangling_symlink_is_set_aside(tmp_path, caplog):
    store = StateStore(tmp_path / "s")
    store.ensure_directory()
    store.path.symlink_to(tmp_path / "nowhere")
    assert_set_aside(store, caplog, "symbolic link", content=None)


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_group_or_other_writable_file_is_set_aside(tmp_path, caplog, mode):
    store = StateStore(tmp_path / "s")
    data = json.dumps({"version": 2, "budget_w": 50.0}).encode()
    write_raw(store, data, mode)
    assert_set_aside(store, caplog, "writable by group or others", content=data)


def test_file_of_another_owner_is_set_aside(tmp_path, caplog):
    store = StateStore(tmp_path / "s")
    store.save(SAVED)
    data = store.path.read_bytes()
    os.chown(store.path, 65534, -1)  # nobody: planted by another user (we run as root in the tests)
    assert_set_aside(store, caplog, "owned by uid 65534", content=data)


def test_directory_in_place_of_the_file_is_set_aside(tmp_path, caplog):
    store = StateStore(tmp_path / "s")
    store.ensure_directory()
    store.path.mkdir()
    assert_set_aside(store, caplog, "not a regular file", content=None)


def test_fifo_in_place_of_the_file_is_set_aside_without_blocking(tmp_path, caplog):
    store = StateStore(tmp_path / "s")
    store.ensure_directory()
    os.mkfifo(store.path, 0o600)  # opening it for reading would block forever
    assert_set_aside(store, caplog, "not a regular file", content=None)


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ("not json", "fails the schema"),
        (json.dumps({"version": 99}), "version"),
        (json.dumps([1, 2]), "version"),
        (json.dumps({"version": 2, "budget_w": "NaN"}), "budget_w"),
        (json.dumps({"version": 2, "budget_w": -5}), "budget_w"),
        (json.dumps({"version": 2, "targets": {"e1": 5}}), "targets of e1"),
        (json.dumps({"version": 2, "original_limits": []}), "original_limits"),
        (json.dumps({"version": 1, "original_limits": {"GPU-a": {"gpu_index": 0, "limit_mw": -1}}}), "malformed"),
        (json.dumps({"version": 1, "original_limits": {"GPU-a": {"gpu_index": 0}}}), "limit_mw"),
        # Version 2 records must say which boot and driver they came from (null: unknown).
        (json.dumps({"version": 2, "original_limits": {"GPU-a": {"gpu_index": 0, "limit_mw": 1}}}), "boot_id"),
        (
            json.dumps(
                {
                    "version": 2,
                    "original_limits": {
                        "GPU-a": {"gpu_index": 0, "limit_mw": 1, "boot_id": 7, "driver_version": "550.54.15"}
                    },
                }
            ),
            "boot_id of GPU-a",
        ),
        (
            json.dumps(
                {
                    "version": 2,
                    "original_limits": {
                        "GPU-a": {"gpu_index": 0, "limit_mw": 1, "boot_id": None, "driver_version": "x\ny"}
                    },
                }
            ),
            "driver_version of GPU-a",
        ),
    ],
)
def test_file_failing_the_schema_is_set_aside(tmp_path, caplog, doc, why):
    store = StateStore(tmp_path / "s")
    write_raw(store, doc.encode())
    assert_set_aside(store, caplog, why, content=doc.encode())


def test_two_set_asides_in_one_instant_keep_both(tmp_path, caplog, monkeypatch):
    class FrozenClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 11, 22, 21, 0, 0, tzinfo=tz)

    monkeypatch.setattr(state_module.datetime, "datetime", FrozenClock)
    store = StateStore(tmp_path / "s")
    write_raw(store, b"bad one")
    store.load()
    write_raw(store, b"bad two")
    store.load()
    # Same timestamp: the second must not replace the first.
    first, second = store.set_aside
    assert first.name == "state.json.unsafe-20261122T210000.000000Z"
    assert second.name == first.name + "-1"
    assert first.read_bytes() == b"bad one" and second.read_bytes() == b"bad two"


def test_world_writable_directory_is_a_hard_error(tmp_path):
    directory = tmp_path / "s"
    directory.mkdir(mode=0o777)
    os.chmod(directory, 0o777)
    with pytest.raises(StateError, match="writable by group or others"):
        StateStore(directory).load()
    with pytest.raises(StateError, match="refusing"):
        StateStore(directory).save(SAVED)


def test_symlinked_directory_is_a_hard_error(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "s").symlink_to(real)
    with pytest.raises(StateError, match="symbolic link"):
        StateStore(tmp_path / "s").load()


def test_directory_of_another_owner_is_a_hard_error(tmp_path):
    directory = tmp_path / "s"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, -1)
    with pytest.raises(StateError, match="owned by uid 65534"):
        StateStore(directory).load()


def test_decode_rejects_bool_numbers():
    with pytest.raises(ValueError, match="malformed"):
        decode_state({"version": 1, "original_limits": {"GPU-a": {"gpu_index": True, "limit_mw": 1}}})
