"""[cluster] configuration (off by default, every problem reported) and cluster mode's exit: GPUs left within the
last grant, originals kept on record; without [cluster] the originals come back as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from pals_daemon.config import DaemonConfig, load_config
from pals_daemon.errors import ConfigError
from pals_daemon.restore import restore_originals
from pals_daemon.sim.gpu import SimBackend, make_sim_gpus
from pals_daemon.state import DaemonState, OriginalLimit, StateStore


def test_cluster_is_off_by_default(tmp_path: Path) -> None:
    cfg = load_config({}, env={}, config_path=str(_write(tmp_path, "")))
    assert cfg.cluster_endpoints == ()
    assert cfg == DaemonConfig(config_file=cfg.config_file)


def test_cluster_section_from_toml_env_and_flags(tmp_path: Path) -> None:
    path = _write(tmp_path, '[cluster]\nendpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]\n'
                            'name = "row7"\nnode = "gpu-12"\nlease_ttl_s = 6\n')
    cfg = load_config({}, env={}, config_path=str(path))
    assert cfg.cluster_endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert (cfg.cluster_name, cfg.cluster_node, cfg.cluster_lease_ttl_s) == ("row7", "gpu-12", 6)
    cfg = load_config({"cluster_endpoints": "http://a:1,http://b:2"}, env={"PALS_CLUSTER_NAME": "x"},
                      config_path=str(path))
    assert cfg.cluster_endpoints == ("http://a:1", "http://b:2") and cfg.cluster_name == "x"


def test_bad_cluster_settings_are_all_reported(tmp_path: Path) -> None:
    path = _write(tmp_path, '[cluster]\nendpoints = ["ftp://x", "https://etcd:2379"]\nname = "Bad Name"\n'
                            'node = "-x"\nlease_ttl_s = 1\ncert_file = "/nonexistent"\nperiod_s = -1.0\n')
    with pytest.raises(ConfigError) as err:
        load_config({}, env={}, config_path=str(path))
    text = "\n".join(err.value.problems)
    for needle in ("ftp://x", "cluster_name", "cluster_node", "cluster_lease_ttl_s", "cluster_cert_file and",
                   "cluster_ca_file", "cluster_period_s"):
        assert needle in text, text


def test_a_configured_node_budget_is_refused_in_cluster_mode(tmp_path: Path) -> None:
    path = _write(tmp_path, 'budget_w = 900.0\n[cluster]\nendpoints = ["http://127.0.0.1:2379"]\n')
    with pytest.raises(ConfigError, match="budget_w"):
        load_config({}, env={}, config_path=str(path))


@pytest.mark.parametrize(("cluster_mode", "expect_mw", "records_left"), [(True, 200_000, 4), (False, 400_000, 0)])
def test_restore_command_in_cluster_mode_holds_the_grant(
    tmp_path: Path, cluster_mode: bool, expect_mw: int, records_left: int
) -> None:
    """`pals-daemon restore` (ExecStopPost) after a cluster-mode daemon died under an 800 W grant on four 400 W
    A100s: each GPU is left at 200 W and its original kept (cluster mode), or put back to 400 W (not)."""
    gpus = make_sim_gpus("A100-SXM4", 4, lambda: 0.0)
    for g in gpus:
        g.set_power_limit_mw(150_000)  # what the dead daemon had enforced
    store = StateStore(tmp_path / "state")
    store.ensure_directory()
    state = DaemonState().with_budget(800.0)
    for g in gpus:
        state = state.with_original(g.identity.uuid, OriginalLimit(g.identity.index, 400_000))
    store.save(state)
    assert restore_originals(SimBackend(gpus), store, cluster_mode=cluster_mode) == []
    assert [g.read().enforced_limit_mw for g in gpus] == [expect_mw] * 4
    assert len(store.load().original_limits) == records_left


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pals.toml"
    path.write_text(text)
    return path
