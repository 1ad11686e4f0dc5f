"""Profile loading, strict validation and the registry's name matching."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from pals_daemon.errors import PalsError
from pals_daemon.model.profile import (
    Profile,
    ProfileError,
    ProfileRegistry,
    dumps_profile,
    load_profile,
    load_profiles,
    profile_from_dict,
)

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
MODELS = (
    "deepseek-moe-16b-base",
    "mixtral-8x7b-instruct",
    "olmoe-1b-7b",
    "phi-3.5-moe-instruct",
    "qwen1.5-moe-a2.7b",
)


def _valid() -> dict[str, Any]:
    return {
        "schema": "pals.profile/v1",
        "model": "tiny-moe",
        "aliases": ["org/Tiny-MoE-v1"],
        "gpu": "A100-SXM4",
        "num_gpus": 2,
        "parallelism": "tp2",
        "source": "unit test (modelled)",
        "method": "modelled",
        "points": [
            {"cap_w": c, "batch": b, "tokens_per_s": c * b / 10.0, "gpu_power_w": min(c, 80.0 + b)}
            for c in (100, 200)
            for b in (1, 8)
        ],
    }


def _write(tmp_path: Path, data: Any, name: str = "p.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_generated_profiles_load() -> None:
    registry = load_profiles(PROFILES)
    assert sorted(p.model for p in registry.profiles) == sorted(MODELS)
    for p in registry.profiles:
        assert p.method == "measured" and p.num_gpus == 4 and p.gpu == "A100-SXM4"
        assert p.caps_w == (100, 150, 200, 300, 350, 400)
        assert p.batches == (1, 4, 8, 32, 64)
        assert len(p.points) == 30
        assert "a100_moe_tp4_power_cap_sweep.csv rows" in p.source


def test_valid_dict_roundtrips(tmp_path: Path) -> None:
    profile = profile_from_dict(_valid())
    path = tmp_path / "x.json"
    path.write_text(dumps_profile(profile))
    assert load_profile(path) == profile


def _mutations() -> list[tuple[str, Any]]:
    def drop(key: str) -> Any:
        def f(d: dict[str, Any]) -> None:
            del d[key]

        return f

    def setv(key: str, value: Any) -> Any:
        def f(d: dict[str, Any]) -> None:
            d[key] = value

        return f

    def point(key: str, value: Any) -> Any:
        def f(d: dict[str, Any]) -> None:
            d["points"][0][key] = value

        return f

    def dup(d: dict[str, Any]) -> None:
        d["points"].append(dict(d["points"][0]))

    def hole(d: dict[str, Any]) -> None:
        d["points"].pop()

    def one_cap(d: dict[str, Any]) -> None:
        d["points"] = [p for p in d["points"] if p["cap_w"] == 100]

    return [
        ("schema", setv("schema", "pals.profile/v2")),
        ("missing", drop("gpu")),
        ("unknown", setv("colour", "blue")),
        ("method", setv("method", "guessed")),
        ("aliases", setv("aliases", ["ok", ""])),
        ("aliases", setv("aliases", "org/x")),
        ("num_gpus", setv("num_gpus", 0)),
        ("num_gpus", setv("num_gpus", True)),
        ("model", setv("model", " ")),
        ("points", setv("points", [])),
        ("batch", point("batch", 1.5)),
        ("batch", point("batch", True)),
        ("cap_w", point("cap_w", -100)),
        ("tokens_per_s", point("tokens_per_s", 0)),
        ("gpu_power_w", point("gpu_power_w", "100")),
        ("far above cap_w", point("gpu_power_w", 1000.0)),
        ("unknown keys", point("extra", 1)),
        ("duplicate", dup),
        ("full cap x batch grid", hole),
        ("at least 2 caps", one_cap),
    ]


@pytest.mark.parametrize(("needle", "mutate"), _mutations())
def test_invalid_profiles_are_rejected(tmp_path: Path, needle: str, mutate: Any) -> None:
    data = copy.deepcopy(_valid())
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError, match=needle) as info:
        load_profile(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, PalsError)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"schema": NaN}'])
def test_malformed_files_are_rejected(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ProfileError):
        load_profile(path)


def test_nan_inside_points_is_rejected(tmp_path: Path) -> None:
    text = json.dumps(_valid()).replace('"tokens_per_s": 10.0', '"tokens_per_s": NaN', 1)
    assert "NaN" in text
    path = tmp_path / "nan.json"
    path.write_text(text)
    with pytest.raises(ProfileError, match="non-finite"):
        load_profile(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "absent.json")
    with pytest.raises(ProfileError, match="not a directory"):
        load_profiles(tmp_path / "absent")


def test_load_profiles_fails_on_any_bad_file(tmp_path: Path) -> None:
    _write(tmp_path, _valid(), "a.json")
    bad = _valid()
    bad["method"] = "x"
    _write(tmp_path, bad, "b.json")
    with pytest.raises(ProfileError, match="b.json"):
        load_profiles(tmp_path)


def test_registry_matches_names_aliases_and_basenames() -> None:
    registry = load_profiles(PROFILES)
    mixtral = registry.find("mixtral-8x7b-instruct")
    assert isinstance(mixtral, Profile)
    for name in (
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "MISTRALAI/mixtral-8x7b-instruct-v0.1",
        "Mixtral-8x7B-Instruct-v0.1",
        "/models/cache/Mixtral-8x7B-Instruct-v0.1",
        "  Mixtral-8x7B-Instruct  ",
    ):
        assert registry.find(name) is mixtral, name
    hf = {
        "deepseek-ai/deepseek-moe-16b-base": "deepseek-moe-16b-base",
        "microsoft/Phi-3.5-MoE-instruct": "phi-3.5-moe-instruct",
        "allenai/OLMoE-1B-7B-0924": "olmoe-1b-7b",
        "Qwen/Qwen1.5-MoE-A2.7B": "qwen1.5-moe-a2.7b",
    }
    for name, model in hf.items():
        found = registry.find(name)
        assert found is not None and found.model == model
    assert registry.find("meta-llama/Llama-3-8B") is None


def test_registry_gpu_kind_filter() -> None:
    registry = load_profiles(PROFILES)
    assert registry.find("olmoe-1b-7b", "NVIDIA A100-SXM4-80GB") is not None
    assert registry.find("olmoe-1b-7b", "a100-sxm4") is not None
    assert registry.find("olmoe-1b-7b", "NVIDIA H100 80GB HBM3") is None


def test_registry_rejects_conflicting_names() -> None:
    a = profile_from_dict(_valid())
    other = _valid()
    other["model"] = "another"
    other["aliases"] = ["elsewhere/Tiny-MoE-v1"]  # same basename as a's alias
    with pytest.raises(ProfileError, match="claimed by two profiles"):
        ProfileRegistry([a, profile_from_dict(other)])
    # The same name on another GPU kind is fine: find() picks by gpu_kind.
    other["gpu"] = "H100-SXM5"
    registry = ProfileRegistry([a, profile_from_dict(other)])
    found = registry.find("Tiny-MoE-v1", "H100-SXM5-80GB")
    assert found is not None and found.model == "another"


def test_optional_point_fields_roundtrip(tmp_path: Path) -> None:
    data = _valid()
    data["points"][0].update({"tpot_ms": 12.5, "ttft_ms": 80.0, "modelled": True})
    profile = profile_from_dict(data)
    assert profile.points[0].tpot_ms == 12.5 and profile.points[0].modelled
    assert profile.points[1].tpot_ms is None and not profile.points[1].modelled
    path = tmp_path / "x.json"
    path.write_text(dumps_profile(profile))
    assert load_profile(path) == profile
    assert path.read_text().count('"modelled": true') == 1


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [("tpot_ms", 0, "tpot_ms"), ("ttft_ms", "5", "ttft_ms"), ("modelled", 1, "modelled"), ("tpot_ms", -1.0, "tpot")],
)
def test_optional_point_fields_are_validated(tmp_path: Path, key: str, value: Any, needle: str) -> None:
    data = _valid()
    data["points"][0][key] = value
    with pytest.raises(ProfileError, match=needle):
        load_profile(_write(tmp_path, data))


def test_measured_profile_cannot_hold_modelled_points(tmp_path: Path) -> None:
    data = _valid()
    data["method"] = "measured"
    data["points"][0]["modelled"] = True
    with pytest.raises(ProfileError, match="some points are modelled"):
        load_profile(_write(tmp_path, data))


def test_h100_profiles_load_and_match_nvml_names() -> None:
    registry = load_profiles(PROFILES / "h100")
    assert len(registry) >= 10
    found = registry.find("Qwen/Qwen3-30B-A3B-Instruct-2507", "NVIDIA H100 80GB HBM3")
    assert found is not None and found.gpu == "H100 80GB HBM3"
    assert registry.find("Qwen/Qwen3-30B-A3B-Instruct-2507", "NVIDIA H100 NVL") is None  # 400 W part
    assert registry.find("Qwen/Qwen3-30B-A3B-Instruct-2507", "NVIDIA A100-SXM4-80GB") is None
