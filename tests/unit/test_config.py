"""Config layering and validation: every problem reported at once, later layers win."""

from __future__ import annotations

import pytest

from pals_daemon.config import DaemonConfig, load_config
from pals_daemon.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "pals.toml"
    path.write_text(text)
    return str(path)


def test_defaults_without_file(tmp_path):
    # The default path may exist on a real node; point at an empty file instead.
    cfg = load_config(env={}, config_path=write(tmp_path, ""))
    assert cfg.backend == "nvml" and cfg.mode == "enforce" and cfg.metrics_address == "127.0.0.1"
    assert cfg.metrics_port == 10400 and cfg.period_s == 0.5 and cfg.budget_w is None
    assert str(cfg.admin_socket_path) == "/run/pals/admin/admin.sock"


def test_file_then_env_then_flags(tmp_path):
    path = write(tmp_path, 'backend = "sim"\nperiod_s = 1.0\nbudget_w = 1200\n[sim]\ngpu_count = 2\nspeed = 5\n')
    cfg = load_config(env={}, config_path=path)
    assert (cfg.backend, cfg.period_s, cfg.budget_w, cfg.sim_gpu_count, cfg.sim_speed) == ("sim", 1.0, 1200.0, 2, 5.0)
    cfg = load_config(env={"PALS_PERIOD_S": "0.25", "PALS_SIM_GPU_COUNT": "8"}, config_path=path)
    assert cfg.period_s == 0.25 and cfg.sim_gpu_count == 8
    cfg = load_config(flags={"period_s": "2", "mode": "advise"}, env={"PALS_PERIOD_S": "0.25"}, config_path=path)
    assert cfg.period_s == 2.0 and cfg.mode == "advise"


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, 'backend = "cuda"\nperiod_s = -1\nmetrics_port = 70000\nbogus = 1\n[sim]\ngpu_count = 0\n')
    with pytest.raises(ConfigError) as info:
        load_config(env={"PALS_BUDGET_W": "nan", "PALS_MODE": "yolo"}, config_path=path)
    text = "\n".join(info.value.problems)
    for fragment in ("backend", "period_s", "metrics_port", "bogus", "sim_gpu_count", "budget_w", "mode"):
        assert fragment in text, fragment
    assert len(info.value.problems) >= 7


def test_type_errors_in_file(tmp_path):
    path = write(tmp_path, 'period_s = "fast"\ngpus = [0, "one"]\nmetrics_port = true\n')
    with pytest.raises(ConfigError) as info:
        load_config(env={}, config_path=path)
    assert len(info.value.problems) == 3


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(env={}, config_path=str(tmp_path / "nope.toml"))


def test_budget_none_and_gpu_list_from_env(tmp_path):
    cfg = load_config(env={"PALS_BUDGET_W": "none", "PALS_GPUS": "0,2"}, config_path=write(tmp_path, "budget_w = 900"))
    assert cfg.budget_w is None and cfg.gpus == (0, 2)


def test_same_socket_twice_refused(tmp_path):
    with pytest.raises(ConfigError, match="must differ"):
        load_config(env={}, config_path=write(tmp_path, 'admin_socket = "/x.sock"\nengine_socket = "/x.sock"\n'))


def test_sockets_in_one_directory_refused(tmp_path):
    # The directory's mode is part of each socket's policy: one directory cannot be both 0700 and 0750.
    with pytest.raises(ConfigError, match="different directories"):
        load_config(env={}, config_path=write(tmp_path, 'admin_socket = "/r/a.sock"\nengine_socket = "/r/e.sock"\n'))


def test_ttl_shorter_than_two_periods_refused(tmp_path):
    with pytest.raises(ConfigError, match="directive_ttl_s"):
        load_config(env={}, config_path=write(tmp_path, "period_s = 3\ndirective_ttl_s = 5\n"))


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        DaemonConfig().mode = "advise"  # type: ignore[misc]
