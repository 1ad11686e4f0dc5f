"""The cluster allocator against a real etcd: round time and time to re-split after a budget change, at 8, 64
and 512 simulated nodes.

Starts its own 3-member etcd cluster on loopback (Debian's etcd-server, ``--max-txn-ops 2048``: etcd's default of
128 operations per transaction caps one-transaction grants at 127 nodes; README "Running a fleet"). Simulated
nodes are records written the way node agents write them (an offer under a lease, an applied budget); the
allocator round is the leader's own code (``EtcdStore.snapshot``, ``plan_grants``, ``EtcdStore.write_grants``).
After a budget change, rounds run back to back; between rounds every node whose grant changed confirms it (puts
its applied budget, 16 at a time, as nodes would concurrently). Re-split time = until a round plans no change;
at a real agent period P the wall time adds about (rounds - 1) x P.

    python bench/cluster_allocator.py --out out/bench/cluster_allocator
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from pals_daemon.cluster.plan import Offer, plan_grants, total_reserved_w
from pals_daemon.cluster.store import Budget, EtcdStore, encode_offer

SIZES = (8, 64, 512)
STEADY_ROUNDS = 20
# A 4-GPU A100 node: floor 400 W, ceiling 1,600 W (data/gpu_power_limits.csv: A100-SXM4 100-400 W).
FLOOR_W, CEILING_W = 400.0, 1600.0
AGENT_PERIOD_S = 0.5
CONFIRM_THREADS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_etcd(root: Path, size: int = 3) -> tuple[list[subprocess.Popen], list[str]]:
    """``size`` members on loopback; returns the processes and client URLs once healthy."""
    etcd = shutil.which("etcd")
    if etcd is None:
        raise SystemExit("etcd is not installed (apt-get install -y etcd-server)")
    ports = [(_free_port(), _free_port()) for _ in range(size)]
    initial = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
    procs, urls = [], []
    for i, (cp, pp) in enumerate(ports):
        url = f"http://127.0.0.1:{cp}"
        urls.append(url)
        procs.append(subprocess.Popen(
            [etcd, "--name", f"m{i}", "--data-dir", str(root / f"m{i}"), "--listen-client-urls", url,
             "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{pp}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{pp}", "--initial-cluster", initial,
             "--max-txn-ops", "2048"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(urls[0] + "/health", timeout=0.5).json().get("health") == "true":
                return procs, urls
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit("etcd did not start")


def _offer(rng: random.Random) -> Offer:
    need = rng.uniform(FLOOR_W + 100, CEILING_W - 100)
    budgets = sorted({FLOOR_W, (FLOOR_W + need) / 2, need, CEILING_W})
    return Offer(FLOOR_W, CEILING_W, tuple((w, (1e6 if w >= need else 0.0) + 1e3 * min(w / need, 1.0), w)
                                           for w in budgets))


def one_size(urls: list[str], n: int) -> dict[str, Any]:
    """Round times and re-split times for ``n`` nodes."""
    store = EtcdStore(urls, f"bench{n}", timeout_s=10.0)
    rng = random.Random(n)
    lease = store.grant_lease(600)
    names = [f"node-{i:04d}" for i in range(n)]
    with ThreadPoolExecutor(CONFIRM_THREADS) as pool:
        list(pool.map(lambda name: (store.put(store.key("offer", name), encode_offer(_offer(rng), FLOOR_W), lease),
                                    store.put(store.key("applied", name), {"budget_w": FLOOR_W})), names))
    assert store.campaign("leader", lease)

    def round_() -> dict[str, float]:
        snap = store.snapshot()
        assert snap.budget is not None
        grants = plan_grants(snap.nodes, snap.budget.target_w)
        if grants:
            assert store.write_grants("leader", lease, grants, snap.budget.target_w,
                                      total_reserved_w(snap.nodes, grants))
        return grants

    def confirm(grants: dict[str, float]) -> None:
        with ThreadPoolExecutor(CONFIRM_THREADS) as pool:
            list(pool.map(lambda kv: store.put(store.key("applied", kv[0]), {"budget_w": kv[1]}), grants.items()))

    def resplit(budget_w: float) -> dict[str, Any]:
        store.set_budget(Budget(budget_w))
        t0 = time.perf_counter()
        rounds, round_s = 0, []
        while True:
            r0 = time.perf_counter()
            grants = round_()
            round_s.append(time.perf_counter() - r0)
            rounds += 1
            if not grants:
                break
            confirm(grants)
            if rounds > 20:
                raise SystemExit("no convergence")
        wall = time.perf_counter() - t0
        snap = store.snapshot()
        return {
            "budget_w": budget_w,
            "rounds": rounds,
            "back_to_back_s": round(wall, 3),
            f"at_{AGENT_PERIOD_S:g}s_period_s": round(wall + (rounds - 1) * AGENT_PERIOD_S, 3),
            "round_s": [round(x, 4) for x in round_s],
            "reserved_w": round(total_reserved_w(snap.nodes), 1),
        }

    first = resplit(n * 1000.0)  # from every node at its floor
    steady = []
    for _ in range(STEADY_ROUNDS):
        r0 = time.perf_counter()
        grants = round_()
        steady.append(time.perf_counter() - r0)
        assert not grants
    cut = resplit(n * 700.0)
    raise_ = resplit(n * 900.0)
    snap_t = []
    plan_t = []
    for _ in range(5):
        s0 = time.perf_counter()
        snap = store.snapshot()
        s1 = time.perf_counter()
        plan_grants(snap.nodes, n * 850.0)
        snap_t.append(s1 - s0)
        plan_t.append(time.perf_counter() - s1)
    store.revoke_lease(lease)
    store.close()
    return {
        "nodes": n,
        "steady_round_s_median": round(statistics.median(steady), 4),
        "steady_round_s_max": round(max(steady), 4),
        "snapshot_s_median": round(statistics.median(snap_t), 4),
        "plan_s_median": round(statistics.median(plan_t), 4),
        "first_split": first,
        "cut_30pct": cut,
        "raise": raise_,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: prints the table, writes cluster_allocator.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench/cluster_allocator")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="pals-etcd-bench-"))
    procs, urls = start_etcd(root)
    try:
        rows = [one_size(urls, int(n)) for n in args.sizes.split(",")]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'nodes':>6} {'round (steady)':>15} {'snapshot':>9} {'plan':>8} {'cut: rounds':>12} {'b2b s':>7} "
          f"{'@0.5s':>7} {'raise: rounds':>14} {'b2b s':>7} {'@0.5s':>7}")
    for r in rows:
        c, u = r["cut_30pct"], r["raise"]
        key = f"at_{AGENT_PERIOD_S:g}s_period_s"
        print(f"{r['nodes']:>6} {r['steady_round_s_median']:>15.4f} {r['snapshot_s_median']:>9.4f} "
              f"{r['plan_s_median']:>8.4f} {c['rounds']:>12} {c['back_to_back_s']:>7.3f} {c[key]:>7.3f} "
              f"{u['rounds']:>14} {u['back_to_back_s']:>7.3f} {u[key]:>7.3f}")
    (out / "cluster_allocator.json").write_text(json.dumps({"agent_period_s": AGENT_PERIOD_S, "rows": rows},
                                                           indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
