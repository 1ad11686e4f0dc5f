"""The clock knob's record in the state file (round trip, files of the current version, bad records set aside)
and its operator switch ``[clocks] enabled`` (file, environment, flag, validation)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from pals_daemon.config import DaemonConfig, load_config
from pals_daemon.errors import ConfigError
from pals_daemon.state import SCHEMA_VERSION, DaemonState, OriginalClock, OriginalLimit, StateStore

BOOT = "0b5e1d2c-3f4a-4b6c-8d9e-0f1a2b3c4d5e"


def test_clock_records_round_trip_and_first_wins(tmp_path):
    store = StateStore(tmp_path / "state")
    state = DaemonState().with_original_clock("GPU-a", OriginalClock(0, BOOT, "550.54.15"))
    state = state.with_original_clock("GPU-a", OriginalClock(5, None, None))  # a later one does not replace it
    state = state.with_original("GPU-a", OriginalLimit(0, 700_000, BOOT, "550.54.15"))
    store.save(state)
    assert store.load() == state
    assert store.load().original_clocks == {"GPU-a": OriginalClock(0, BOOT, "550.54.15")}
    assert "GPU-a" not in state.without_original_clock("GPU-a").original_clocks
    doc = json.loads(store.path.read_text())
    # No version of its own: the clock records are one more optional key (the budget ramp made it version 3).
    assert doc["version"] == SCHEMA_VERSION == 3
    assert {"version", "budget_w", "targets", "original_limits", "original_clocks"} <= set(doc)


def test_a_file_without_clock_records_is_read(tmp_path):
    store = StateStore(tmp_path / "state")
    store.ensure_directory()
    doc = {
        "version": 2,
        "budget_w": 500.0,
        "targets": {},
        "original_limits": {"GPU-a": {"gpu_index": 0, "limit_mw": 700_000, "boot_id": BOOT, "driver_version": None}},
    }
    fd = os.open(store.path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps(doc).encode())
    os.close(fd)
    state = store.load()
    assert state.original_clocks == {} and state.original_limits["GPU-a"].limit_mw == 700_000


@pytest.mark.parametrize(
    "clocks",
    [
        [],
        {"GPU-a": {"gpu_index": -1, "boot_id": None, "driver_version": None}},
        {"GPU-a": {"gpu_index": True, "boot_id": None, "driver_version": None}},
        {"GPU-a": {"gpu_index": 0, "boot_id": "x" * 200, "driver_version": None}},
        {"GPU-a": {"gpu_index": 0}},
    ],
)
def test_malformed_clock_records_set_the_file_aside(tmp_path, caplog, clocks):
    store = StateStore(tmp_path / "state")
    store.ensure_directory()
    fd = os.open(store.path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps({"version": 2, "original_clocks": clocks}).encode())
    os.close(fd)
    with caplog.at_level(logging.ERROR, logger="pals_daemon.state"):
        assert store.load() == DaemonState()
    assert len(store.set_aside) == 1


def test_clocks_switch_defaults_on_and_is_set_from_file_env_and_flag(tmp_path):
    assert DaemonConfig().clocks_enabled is True
    path = tmp_path / "pals.toml"
    path.write_text("[clocks]\nenabled = false\n")
    assert load_config(config_path=str(path), env={}).clocks_enabled is False
    assert load_config(config_path=str(path), env={"PALS_CLOCKS_ENABLED": "yes"}).clocks_enabled is True
    flag_wins = load_config({"clocks_enabled": "off"}, env={"PALS_CLOCKS_ENABLED": "1"}, config_path=str(path))
    assert flag_wins.clocks_enabled is False


def test_clocks_switch_is_validated_with_the_rest(tmp_path):
    path = tmp_path / "pals.toml"
    path.write_text('period_s = -1\n[clocks]\nenabled = "no"\nceiling_mhz = 1500\n')
    with pytest.raises(ConfigError) as info:
        load_config(config_path=str(path), env={"PALS_CLOCKS_ENABLED": "maybe"})
    text = "\n".join(info.value.problems)
    assert "clocks_enabled: 'no' must be true or false" in text
    assert "unknown key 'clocks_ceiling_mhz'" in text
    assert "environment clocks_enabled: 'maybe' must be one of" in text
    assert "period_s: must be a finite number > 0" in text
