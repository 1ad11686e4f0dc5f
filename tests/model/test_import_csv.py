"""The CSV importer: regenerating the checked-in profiles gives identical files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pals_daemon.model.import_csv import main, profiles_from_csv, write_profiles
from pals_daemon.model.profile import ProfileError, load_profile

ROOT = Path(__file__).resolve().parents[2]
CSV = ROOT / "data" / "a100_moe_tp4_power_cap_sweep.csv"
PROFILES = ROOT / "profiles"


def test_regenerating_gives_identical_files(tmp_path: Path) -> None:
    assert main([str(CSV), str(tmp_path)]) == 0
    fresh = {p.name: p.read_bytes() for p in tmp_path.glob("*.json")}
    checked_in = {p.name: p.read_bytes() for p in PROFILES.glob("*.json")}
    assert len(fresh) == 5
    assert fresh == checked_in


def test_profiles_carry_hf_aliases_and_cite_rows() -> None:
    profiles = {p.model: p for p in profiles_from_csv(CSV)}
    assert profiles["mixtral-8x7b-instruct"].aliases == ("mistralai/Mixtral-8x7B-Instruct-v0.1",)
    assert profiles["olmoe-1b-7b"].aliases == ("allenai/OLMoE-1B-7B-0924",)
    assert profiles["deepseek-moe-16b-base"].source.startswith("data/a100_moe_tp4_power_cap_sweep.csv rows 2-31 ")
    for p in profiles.values():
        assert p.method == "measured"


def test_written_files_load(tmp_path: Path) -> None:
    for path in write_profiles(profiles_from_csv(CSV), tmp_path):
        assert load_profile(path).num_gpus == 4


def test_incomplete_grid_is_an_error(tmp_path: Path) -> None:
    lines = CSV.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines[:-1]) + "\n")  # drops qwen 400 W batch 64
    with pytest.raises(ProfileError, match="full cap x batch grid"):
        profiles_from_csv(bad)
    assert main([str(bad), str(tmp_path / "out")]) == 1


def test_missing_column_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("gpu,model,tp,cap_w,batch\nA100-SXM4,m,4,100,1\n")
    with pytest.raises(ProfileError, match="missing columns"):
        profiles_from_csv(bad)
