"""Fixtures: real etcd members (tests/cluster/etcd_harness.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from etcd_harness import EtcdCluster, require_etcd  # noqa: E402


@pytest.fixture
def etcd1(short_tmp: Path) -> Iterator[EtcdCluster]:
    """One etcd member on loopback."""
    require_etcd()
    cluster = EtcdCluster(short_tmp / "etcd", size=1)
    cluster.root.mkdir()
    cluster.start_all()
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def etcd3(short_tmp: Path) -> Iterator[EtcdCluster]:
    """Three etcd members on loopback (one cluster)."""
    require_etcd()
    cluster = EtcdCluster(short_tmp / "etcd", size=3)
    cluster.root.mkdir()
    cluster.start_all()
    try:
        yield cluster
    finally:
        cluster.stop_all()
