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


# --------------------------------------------------------------------------------------------------
# ML.ENERGY v3 H100 batch sweep -> profiles with a modelled cap dimension

MLE = ROOT / "data" / "mlenergy_v3_vllm_batch_sweep.csv"
H100_DIR = PROFILES / "h100"


def test_pals_profile_regenerates_both_sets_byte_identically(tmp_path: Path) -> None:
    from pals_daemon.cli.profile import main as pals_profile

    assert pals_profile(["import", str(MLE), str(tmp_path / "h"), "--format", "mlenergy"]) == 0
    assert pals_profile(["import", str(CSV), str(tmp_path / "a")]) == 0  # format detected
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "h").glob("*.json")}
    assert fresh == {p.name: p.read_bytes() for p in H100_DIR.glob("*.json")}
    assert len(fresh) >= 10
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("*.json")}
    assert fresh == {p.name: p.read_bytes() for p in PROFILES.glob("*.json")}


def test_model_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pals_daemon.cli.profile import main as pals_profile

    assert pals_profile(["import", str(MLE), str(tmp_path), "--model", "Llama-4-Scout"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [
        "llama-4-scout-17b-16e-instruct.h100-80gb-hbm3.tp1-ep4.json",
        "llama-4-scout-17b-16e-instruct.h100-80gb-hbm3.tp1-ep8.json",
    ]
    assert pals_profile(["import", str(MLE), str(tmp_path), "--model", "no-such-model"]) == 1
    assert "no profile matches" in capsys.readouterr().err


def test_h100_profiles_label_the_modelled_cap_dimension() -> None:
    from pals_daemon.model.profile import load_profiles

    registry = load_profiles(H100_DIR)
    names = {(p.model, p.num_gpus) for p in registry.profiles}
    for wanted in [
        ("qwen3-30b-a3b-instruct-2507", 1),
        ("qwen3-30b-a3b-instruct-2507", 2),
        ("llama-4-scout-17b-16e-instruct", 4),
        ("gpt-oss-120b", 1),
        ("qwen3-235b-a22b-instruct-2507-fp8", 4),
    ]:
        assert wanted in names
    for p in registry.profiles:
        assert p.method == "modelled" and "MODELLED" in p.notes and "MEASURED" in p.notes
        assert p.caps_w == tuple(float(c) for c in range(200, 701, 50))
        by = {(q.cap_w, q.batch): q for q in p.points}
        for q in p.points:
            top = by[(700.0, q.batch)]
            assert q.modelled == (q.cap_w != 700.0)
            assert q.tpot_ms is not None and q.ttft_ms is None
            assert q.gpu_power_w == pytest.approx(min(q.cap_w, top.gpu_power_w), abs=1e-3)
            assert q.tokens_per_s <= top.tokens_per_s + 1e-9
    # A measured point: Llama-4-Scout on 4 GPUs, max_num_seqs 64, lm-arena-chat (CSV: 1749.6 W total).
    scout = registry.find("meta-llama/Llama-4-Scout-17B-16E-Instruct", "NVIDIA H100 80GB HBM3")
    assert scout is not None and scout.num_gpus == 4
    q = {(x.cap_w, x.batch): x for x in scout.points}[(700.0, 64)]
    assert q.gpu_power_w == pytest.approx(437.4, abs=0.1) and q.tpot_ms == pytest.approx(36.5, abs=0.1)
    assert "task lm-arena-chat" in scout.source


def test_dvfs_transfer_constants_are_refitted_from_the_a100_sweep() -> None:
    from pals_daemon.model import import_csv as ic

    knee, n, a = ic.fit_dvfs_transfer(profiles_from_csv(CSV))
    assert (knee, n, a) == pytest.approx((ic.DVFS_KNEE, ic.DVFS_SHARPNESS, ic.DVFS_EXPONENT), abs=0.01)
    assert ic.dvfs_throughput_fraction(1.0) == pytest.approx(1.0)
    assert 0.95 < ic.dvfs_throughput_fraction(0.8) < 1.0  # decode barely notices a shallow cap


def _mle_rows() -> list[str]:
    return MLE.read_text().splitlines()


@pytest.mark.parametrize(
    ("column", "value", "needle"),
    [
        ("avg_power_watts", "nan", "not a finite number"),
        ("output_throughput_tok_s", "-5", "negative"),
        ("median_itl_ms", "abc", "not a number"),
        ("max_num_seqs", "8.5", "not an integer"),
    ],
)
def test_mlenergy_bad_values(tmp_path: Path, column: str, value: str, needle: str) -> None:
    lines = _mle_rows()
    header = lines[0].split(",")
    idx = next(
        i for i, line in enumerate(lines) if all(k in line for k in ("Llama-4-Scout", ",lm-arena-chat,", ",H100,4,"))
    )
    row = lines[idx].split(",")
    row[header.index(column)] = value
    lines[idx] = ",".join(row)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ProfileError, match=needle) as info:
        profiles_from_csv_any(bad)
    assert f"bad.csv:{idx + 1}" in str(info.value)
    assert main([str(bad), str(tmp_path / "out")]) == 1


def profiles_from_csv_any(path: Path) -> object:
    from pals_daemon.model.import_csv import build_profiles

    return build_profiles(path)


def test_mlenergy_missing_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pals_daemon.cli.profile import main as pals_profile

    lines = _mle_rows()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(line.rsplit(",", 4)[0] for line in lines) + "\n")  # drops the ITL columns
    assert pals_profile(["import", str(bad), str(tmp_path / "o"), "--format", "mlenergy"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("pals-profile: error: ") and "missing columns" in err and "\n" not in err


def test_a100_nan_is_an_error(tmp_path: Path) -> None:
    lines = CSV.read_text().splitlines()
    row = lines[1].split(",")
    row[5] = "nan"
    lines[1] = ",".join(row)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ProfileError, match="avg_Tokens_per_s: not a finite number"):
        profiles_from_csv(bad)
