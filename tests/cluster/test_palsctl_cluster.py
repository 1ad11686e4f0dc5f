"""palsctl cluster against a real etcd member: budget set/get with a ramp, refusals that change nothing, status."""

from __future__ import annotations

import json

import pytest
from etcd_harness import EtcdCluster

from pals_daemon.cli import palsctl
from pals_daemon.cluster.plan import Offer
from pals_daemon.cluster.store import Budget, EtcdStore, encode_offer


def ctl(etcd: EtcdCluster, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = palsctl.main(["cluster", "--endpoints", ",".join(etcd.endpoints), "--cluster-name", "c", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_budget_set_get_ramp_and_refusals(etcd1: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    store = EtcdStore(etcd1.endpoints, "c")
    lease = store.grant_lease(30)
    for n in ("a", "b"):
        store.put(store.key("offer", n), encode_offer(Offer(400, 1600, ((400, 0, 0), (1600, 1, 1))), 400.0), lease)
    assert ctl(etcd1, capsys, "budget", "get")[1].strip() == "cluster budget none"
    assert ctl(etcd1, capsys, "budget", "set", "3000")[0] == 0
    assert store.get_budget() == Budget(3000.0, None, store.get_budget().set_at_unix_s, 0.0)  # type: ignore[union-attr]
    code, out, _ = ctl(etcd1, capsys, "budget", "set", "2000", "--ramp", "100")
    assert code == 0 and "over 100 s" in out
    b = store.get_budget()
    assert b is not None and b.from_w == pytest.approx(3000.0) and b.target_w == 2000.0 and b.ramp_s == 100.0
    assert "target 2000 W" in ctl(etcd1, capsys, "budget", "get")[1]
    for bad in ("nan", "inf", "-5", "700"):  # 700 W: below the live nodes' floors (800 W)
        code, _, err = ctl(etcd1, capsys, "budget", "set", bad)
        assert code == 1 and err.startswith("palsctl: "), (bad, err)
        assert store.get_budget() == b  # nothing changed
    code, _, err = ctl(etcd1, capsys, "budget", "set", "2000", "--ramp", "-1")
    assert code == 1 and store.get_budget() == b


def test_status_lists_live_and_lapsed_nodes(etcd1: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    store = EtcdStore(etcd1.endpoints, "c")
    lease = store.grant_lease(30)
    store.put(store.key("offer", "live1"), encode_offer(Offer(400, 1600, ((400, 0, 0), (1600, 1, 1))), 600.0), lease)
    store.put(store.key("applied", "live1"), {"budget_w": 600.0})
    store.put(store.key("applied", "gone"), {"budget_w": 900.0})
    store.set_budget(Budget(2000.0))
    assert store.campaign("live1", lease)
    code, out, _ = ctl(etcd1, capsys, "status")
    assert code == 0 and "leader live1" in out and "reserved 1500 W" in out
    assert any(line.startswith("gone") and "lapsed" in line for line in out.splitlines())
    doc = json.loads(ctl(etcd1, capsys, "status", "--json")[1])
    assert doc["nodes"]["live1"]["live"] is True and doc["nodes"]["gone"]["reserved_w"] == 900.0


def test_unreachable_etcd_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    code = palsctl.main(["cluster", "--endpoints", "http://127.0.0.1:9", "budget", "get"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("palsctl: no etcd endpoint answered") and err.count("\n") == 1
