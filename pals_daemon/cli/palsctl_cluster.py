"""``palsctl cluster ...``: the cluster budget and the nodes' records, read and written in etcd directly.

The etcd endpoints and TLS files come from the [cluster] section of the daemon's config (``--config``, env
PALS_CONFIG, default /etc/pals/pals.toml) and PALS_CLUSTER_* variables, or ``--endpoints``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from pals_daemon.cluster.plan import effective_budget_w, reserved_w, total_reserved_w
from pals_daemon.cluster.store import MAX_CLUSTER_BUDGET_W, Budget, EtcdStore, Snapshot
from pals_daemon.config import load_config
from pals_daemon.errors import ConfigError, PalsError

MAX_RAMP_S = 86400.0


class ClusterCliError(Exception):
    """One line for stderr."""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``cluster`` (status, budget get, budget set) to palsctl's subcommands."""
    cluster = sub.add_parser("cluster", help="the cluster budget split across node daemons (etcd)")
    cluster.add_argument("--config", help="daemon config whose [cluster] section names etcd (default as the daemon)")
    cluster.add_argument("--endpoints", help="comma-separated etcd URLs (overrides the config)")
    cluster.add_argument("--cluster-name", help="cluster name (overrides the config)")
    csub = cluster.add_subparsers(dest="cluster_command", required=True)
    status = csub.add_parser("status", help="leader, cluster budget, every node's offer, grant and applied budget")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    budget = csub.add_parser("budget", help="show or change the cluster budget")
    bsub = budget.add_subparsers(dest="cluster_budget_command", required=True)
    bsub.add_parser("get", help="show the cluster budget")
    bset = bsub.add_parser("set", help="set the cluster budget in watts")
    bset.add_argument("watts", type=float)
    bset.add_argument("--ramp", type=float, default=0.0, metavar="S", help="reach it linearly over S seconds")


def _store(args: argparse.Namespace) -> EtcdStore:
    flags: dict[str, Any] = {}
    if args.endpoints:
        flags["cluster_endpoints"] = args.endpoints
    if args.cluster_name:
        flags["cluster_name"] = args.cluster_name
    try:
        cfg = load_config(flags, config_path=args.config)
    except ConfigError as exc:
        raise ClusterCliError(str(exc)) from exc
    if not cfg.cluster_endpoints:
        raise ClusterCliError("no etcd endpoints: give --endpoints or a config with a [cluster] section")
    return EtcdStore(cfg.cluster_endpoints, cfg.cluster_name, cfg.cluster_timeout_s, cfg.cluster_ca_file,
                     cfg.cluster_cert_file, cfg.cluster_key_file)


def status_doc(snap: Snapshot, now_unix_s: float) -> dict[str, Any]:
    """The status as plain data."""
    b = snap.budget
    doc: dict[str, Any] = {"revision": snap.revision, "leader": snap.leader, "budget": None}
    if b is not None:
        doc["budget"] = {
            "target_w": b.target_w,
            "effective_w": effective_budget_w(b.target_w, b.from_w, b.set_at_unix_s, b.ramp_s, now_unix_s),
            "ramp_s": b.ramp_s,
        }
    doc["reserved_w"] = total_reserved_w(snap.nodes)
    doc["nodes"] = {
        n: {
            "live": v.offer is not None,
            "grant_w": v.grant_w,
            "applied_w": v.applied_w,
            "reserved_w": reserved_w(v),
            "floor_w": v.offer.floor_w if v.offer else None,
            "ceiling_w": v.offer.ceiling_w if v.offer else None,
            "offer": [list(p) for p in v.offer.points] if v.offer else None,
        }
        for n, v in snap.nodes.items()
    }
    return doc


def format_status(doc: dict[str, Any]) -> str:
    """Human-readable status."""
    b = doc["budget"]
    lines = [
        f"leader {doc['leader'] or '(none)'}   cluster budget "
        + ("none" if b is None else f"{b['effective_w']:.0f} W (target {b['target_w']:.0f} W)")
        + f"   reserved {doc['reserved_w']:.0f} W",
        f"{'node':<24} {'state':<7} {'grant':>8} {'applied':>8} {'reserved':>9} {'floor':>7} {'ceiling':>8}",
    ]

    def w(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    for n, v in doc["nodes"].items():
        lines.append(
            f"{n:<24} {'live' if v['live'] else 'lapsed':<7} {w(v['grant_w']):>8} {w(v['applied_w']):>8} "
            f"{w(v['reserved_w']):>9} {w(v['floor_w']):>7} {w(v['ceiling_w']):>8}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Execute ``palsctl cluster ...``; ClusterCliError for anything to print as one line."""
    store = _store(args)
    try:
        now = time.time()
        if args.cluster_command == "status":
            doc = status_doc(store.snapshot(), now)
            print(json.dumps(doc, indent=2) if args.json else format_status(doc))
            return 0
        if args.cluster_budget_command == "get":
            b = store.get_budget()
            if b is None:
                print("cluster budget none")
            else:
                eff = effective_budget_w(b.target_w, b.from_w, b.set_at_unix_s, b.ramp_s, now)
                print(f"cluster budget {eff:.0f} W (target {b.target_w:.0f} W)")
            return 0
        watts, ramp = args.watts, args.ramp
        if not math.isfinite(watts) or not 0 < watts <= MAX_CLUSTER_BUDGET_W:
            raise ClusterCliError(f"budget {watts!r} W: must be a finite number of watts in (0, 1e9]")
        if not math.isfinite(ramp) or not 0 <= ramp <= MAX_RAMP_S:
            raise ClusterCliError(f"ramp {ramp!r} s: must be 0..{MAX_RAMP_S:g} s")
        snap = store.snapshot()
        floor = sum(v.offer.floor_w for v in snap.nodes.values() if v.offer is not None)
        if watts < floor:
            raise ClusterCliError(f"budget {watts:g} W is below the live nodes' floors ({floor:g} W); nothing changed")
        old = snap.budget
        from_w = None
        if ramp > 0 and old is not None:
            from_w = effective_budget_w(old.target_w, old.from_w, old.set_at_unix_s, old.ramp_s, now)
        store.set_budget(Budget(target_w=watts, from_w=from_w, set_at_unix_s=now, ramp_s=ramp if from_w else 0.0))
        print(f"cluster budget set to {watts:.0f} W" + (f" over {ramp:g} s" if from_w else ""))
        return 0
    except PalsError as exc:
        raise ClusterCliError(str(exc)) from exc
    finally:
        store.close()
