"""The [controller] config section: every ControllerConfig field settable, validated with the rest, documented."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import Any

import pytest

from pals_daemon import config_controller as cc
from pals_daemon.clock import MonotonicClock
from pals_daemon.config import DaemonConfig, add_config_flags, describe, load_config
from pals_daemon.control.config import ControllerConfig
from pals_daemon.errors import ConfigError
from pals_daemon.model.profile import ProfileRegistry
from pals_daemon.server.daemon import Daemon
from pals_daemon.sim.gpu import SimBackend, make_sim_gpus

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "pals.toml.example"


def write(tmp_path: pathlib.Path, text: str) -> str:
    path = tmp_path / "pals.toml"
    path.write_text(text)
    return str(path)


def _candidates(spec: cc.ControllerKey) -> list[Any]:
    """Values other than the default to try for a field (the first ControllerConfig accepts is used)."""
    d = spec.default
    if spec.kind == "bool":
        return [not d]
    if spec.kind == "float":
        return [0.5, 1.0] if d is None else [d * 0.9, d * 1.1, d + 1.0, d - 0.5, d * 0.5, d * 2, 0.0]
    if spec.kind == "int":  # near values first, then every value up to twice the default (e.g. a set {90, 99})
        return [1, 2] if d is None else [d + 1, d - 1, *range(2 * abs(d) + 2)]
    if spec.kind == "str":
        return ["H100-SXM5" if d is None else d + "x"]
    if spec.kind == "choice":
        return [c for c in spec.choices if c != d]
    if spec.kind.endswith("_tuple"):
        return [tuple(d[:-1]), tuple(d) + (d[-1] * 2,)] if d else [(1, 2)]
    return []


def _non_default(spec: cc.ControllerKey) -> Any:
    for value in _candidates(spec):
        try:
            ControllerConfig(**{spec.field: value})
        except ConfigError:
            continue
        if value != spec.default:
            return value
    raise AssertionError(f"no valid non-default value found for {spec.field}: extend _candidates")


def _toml_value(value: Any) -> str:
    return cc._toml(value)


def _text_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def test_every_controller_field_is_settable_or_excluded_with_a_reason() -> None:
    names = [f.name for f in dataclasses.fields(ControllerConfig)]
    assert set(cc.EXCLUDED) <= set(names), "EXCLUDED names a field ControllerConfig no longer has"
    assert all(len(reason) > 20 for reason in cc.EXCLUDED.values())
    assert cc.unsupported_fields() == (), "a ControllerConfig field of a type [controller] cannot read"
    settable = [spec.field for spec in cc.controller_keys().values()]
    assert settable == [n for n in names if n not in cc.EXCLUDED]
    for spec in cc.controller_keys().values():
        assert spec.description, f"{spec.field} has no comment above it in pals_daemon/control/config.py"


@pytest.mark.parametrize("key", list(cc.controller_keys()))
def test_each_field_from_toml_env_and_flag(tmp_path: pathlib.Path, key: str) -> None:
    spec = cc.controller_keys()[key]
    value = _non_default(spec)
    cfg = load_config(env={}, config_path=write(tmp_path, f"[controller]\n{spec.field} = {_toml_value(value)}\n"))
    assert getattr(cfg.controller_config(), spec.field) == value
    assert describe(cfg)[key] == (list(value) if isinstance(value, tuple) else value)
    empty = write(tmp_path, "")
    cfg = load_config(env={"PALS_" + key.upper(): _text_value(value)}, config_path=empty)
    assert getattr(cfg.controller_config(), spec.field) == value
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--" + key.replace("_", "-"), _text_value(value)])
    cfg = load_config(vars(args), env={}, config_path=empty)
    assert getattr(cfg.controller_config(), spec.field) == value


def test_optional_field_unset_from_env(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, '[controller]\ngpu_kind = "A100-SXM4"\n')
    assert load_config(env={}, config_path=path).controller.gpu_kind == "A100-SXM4"
    assert load_config(env={"PALS_CONTROLLER_GPU_KIND": "none"}, config_path=path).controller.gpu_kind is None


def test_bad_values_are_reported_with_the_rest_naming_key_and_value(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        'period_s = -1\nmetrics_port = 70000\n[controller]\nhysteresis = 0.9\ncap_step_w = "big"\n'
        "candidate_batches = [8, 4]\nrouting_aware_caps = 1\nbogus = 2\nfixed_cap_w = 200\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(env={}, config_path=path)
    problems = info.value.problems
    text = "\n".join(problems)
    assert "[controller] hysteresis must be in [0, 0.5], got 0.9" in text
    assert "controller_cap_step_w: 'big' must be a number" in text
    assert "[controller] candidate_batches must be strictly ascending" in text
    assert "controller_routing_aware_caps: 1 must be true or false" in text
    assert "unknown key 'controller_bogus'" in text
    assert "'controller_fixed_cap_w' is not an operator setting: an evaluation baseline" in text
    assert any(p.startswith("period_s:") for p in problems) and any(p.startswith("metrics_port") for p in problems)
    assert not any("[controller] period_s" in p for p in problems)  # reported once, as the top-level key's
    # Cross-field checks (ControllerConfig runs them once each field is valid), from the environment.
    with pytest.raises(ConfigError, match=r"\[controller\] ratio_min must be <= 1 <= ratio_max, got 0.5, 0.5"):
        load_config(env={"PALS_CONTROLLER_RATIO_MAX": "0.5"}, config_path=write(tmp_path, ""))


def test_the_controller_ticks_at_the_daemons_period(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "period_s = 0.25\n[controller]\nhysteresis = 0.1\n")
    cfg = load_config(env={}, config_path=path)
    assert cfg.controller_config().period_s == 0.25 and cfg.controller_config().hysteresis == 0.1
    with pytest.raises(ConfigError, match="'controller_period_s' is not an operator setting"):
        load_config(env={}, config_path=write(tmp_path, "[controller]\nperiod_s = 2.0\n"))


def test_the_daemon_runs_the_configured_controller(tmp_path: pathlib.Path) -> None:
    cfg = load_config(
        env={},
        config_path=write(
            tmp_path,
            f'backend = "sim"\nperiod_s = 0.25\nstate_dir = "{tmp_path}"\n[controller]\ncap_step_w = 50.0\n'
            "candidate_batches = [1, 8, 64]\nrouting_aware_caps = false\n",
        ),
    )
    clock = MonotonicClock()
    daemon = Daemon(cfg, SimBackend(make_sim_gpus("A100-SXM4", 2, clock.now)), ProfileRegistry(), clock)
    used = daemon.controller.config
    assert (used.period_s, used.cap_step_w, used.candidate_batches, used.routing_aware_caps) == (
        0.25,
        50.0,
        (1, 8, 64),
        False,
    )
    assert DaemonConfig(period_s=0.1).controller_config().period_s == 0.1


def test_example_config_section_is_generated_and_current() -> None:
    text = EXAMPLE.read_text()
    assert cc.with_example_section(text) == text, (
        "run: python -m pals_daemon.config_controller --write-example deploy/systemd/pals.toml.example"
    )
    assert text.count(cc.EXAMPLE_MARKER) == 1
    assert cc.with_example_section(cc.with_example_section(text)) == text  # idempotent
    for spec in cc.controller_keys().values():
        assert f"\n{spec.field} = " in text or f"\n# {spec.field} = " in text
