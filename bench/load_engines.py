"""Load bench: many simulated engines stream StepReports to one daemon over the real engine socket.

The daemon runs as its own process (``python -m pals_daemon.cli.daemon_main``, simulated GPUs, enforce mode,
a node budget that binds), so its RSS is read from /proc/<pid>/status. Engines are grpc.aio streams, several
per client process (a Python process cannot drive 64 x 100 Hz alone). Measured:
- the control period's jitter: spacing of successive tick starts (ControllerStatus.last_tick_started_unix_s,
  one WatchStatus snapshot per tick) minus the configured period;
- directive latency: from a tick's start to its Directive arriving at the engine client;
- the daemon's RSS at 10 s into the load and at its end;
- the report rate the clients really achieved (on a small machine the clients saturate first).

    python bench/load_engines.py                      # 64 engines x 100 Hz x 60 s (the issue's acceptance)
    python bench/load_engines.py --engines 8 --duration-s 5 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# bench/ too: client processes are spawned and import this module by name (``load_engines``).
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import grpc  # noqa: E402

from pals_daemon.api import pals_pb2, pals_pb2_grpc  # noqa: E402

# A model with a shipped A100 profile, so every engine goes through the full controller (profiles/).
MODEL = "mixtral-8x7b-instruct"
GPU_KIND = "A100-SXM4"
# Per-GPU budget share, W: below the A100's 400 W maximum, so the budget binds and the split runs every tick.
BUDGET_PER_GPU_W = 250.0
# RSS is compared from this far into the load (start-up allocations, gRPC pools and the first ticks are done).
RSS_BASELINE_S = 10.0
DEFAULT_OUT = REPO / "bench" / "results" / "load_engines.json"


@dataclass
class ClientResult:
    """What one client process saw."""

    engines: int = 0
    reports_sent: int = 0
    # (directive sequence, arrival Unix time) for every directive.
    directives: list[tuple[int, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


def _report(rate_hz: float, step: int) -> pals_pb2.EngineMessage:
    """A plausible decode step report (32 running, a few waiting, a request finishing now and then)."""
    finished = [pals_pb2.FinishedRequest(ttft_ms=180.0, tpot_ms=40.0, prompt_tokens=512, output_tokens=256)]
    return pals_pb2.EngineMessage(
        step=pals_pb2.StepReport(
            window_s=1.0 / rate_hz,
            num_steps=1,
            busy_s=0.9 / rate_hz,
            num_running=32,
            num_waiting=4,
            decode_tokens=32,
            kv_cache_usage=0.5,
            arrived_requests=1 if step % 8 == 0 else 0,
            finished=finished if step % 8 == 0 else [],
        )
    )


async def _engine(
    stub: pals_pb2_grpc.EngineLinkStub,
    index: int,
    model: str,
    rate_hz: float,
    start_at: float,
    stop_at: float,
    out: ClientResult,
) -> None:
    call = stub.Connect()
    await call.write(
        pals_pb2.EngineMessage(
            register=pals_pb2.Register(
                engine_id=f"load-{index}",
                model=model,
                gpu_indices=[index],
                max_num_seqs=64,
                max_num_batched_tokens=8192,
                client_version="load_engines",
            )
        )
    )

    async def read() -> None:
        async for msg in call:
            if msg.WhichOneof("body") == "directive":
                out.directives.append((msg.directive.sequence, time.time()))

    reader = asyncio.create_task(read())
    period = 1.0 / rate_hz
    # Spread the engines over one period so they do not all send at the same instant.
    next_at = start_at + period * (index % 97) / 97
    step = 0
    loop = asyncio.get_running_loop()
    try:
        while True:
            now = time.time()
            if now >= stop_at:
                break
            if next_at > now:
                await asyncio.sleep(next_at - now)
            await call.write(_report(rate_hz, step))
            out.reports_sent += 1
            step += 1
            # Never burst to catch up: a late client sends less, and the achieved rate says so.
            next_at = max(next_at + period, time.time())
        await call.done_writing()
        await asyncio.wait_for(reader, 5.0)
    except (grpc.aio.AioRpcError, asyncio.TimeoutError) as exc:
        out.errors.append(f"engine {index}: {exc!r}"[:300])
    finally:
        reader.cancel()
        del loop


async def _client(
    socket_path: str, indices: list[int], model: str, rate_hz: float, start_at: float, stop_at: float
) -> ClientResult:
    out = ClientResult(engines=len(indices))
    began = time.time()
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        stub = pals_pb2_grpc.EngineLinkStub(channel)
        await asyncio.gather(*(_engine(stub, i, model, rate_hz, start_at, stop_at, out) for i in indices))
    out.elapsed_s = time.time() - began
    return out


def _client_process(
    socket_path: str, indices: list[int], model: str, rate_hz: float, start_at: float, stop_at: float, queue: Any
) -> None:
    # The load generator yields the CPU to the daemon: on a node, engines run on their own cores, while here
    # four client processes share two cores with the daemon they measure.
    os.nice(10)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency of the daemon
        pass
    result = asyncio.run(_client(socket_path, indices, model, rate_hz, start_at, stop_at))
    queue.put(asdict(result))


async def _watch(admin_socket: str, ticks: dict[int, tuple[float, float]], stop: asyncio.Event) -> None:
    """ticks[n] = (start Unix time, duration s) of the tick that brought the count to n."""
    async with grpc.aio.insecure_channel(f"unix:{admin_socket}") as channel:
        stream = pals_pb2_grpc.PowerAdminStub(channel).WatchStatus(pals_pb2.WatchStatusRequest())
        async for status in stream:
            c = status.controller
            ticks[c.ticks] = (c.last_tick_started_unix_s, c.last_tick_duration_s)
            if stop.is_set():
                stream.cancel()
                return


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS line")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before its socket appeared")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no socket at {path} after {timeout_s} s")
        time.sleep(0.05)


async def _measure(
    proc: subprocess.Popen[bytes],
    admin_socket: str,
    engine_socket: str,
    engines: int,
    rate_hz: float,
    duration_s: float,
    procs: int,
    model: str,
    lead_s: float,
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + lead_s  # time for the client processes to import and connect
    stop_at = start_at + duration_s
    groups = [list(range(engines))[k::procs] for k in range(procs)]
    clients = [
        ctx.Process(
            target=_client_process, args=(engine_socket, g, model, rate_hz, start_at, stop_at, queue), daemon=True
        )
        for g in groups
        if g
    ]
    for c in clients:
        c.start()
    ticks: dict[int, tuple[float, float]] = {}
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch(admin_socket, ticks, stop))
    rss: list[tuple[float, int]] = []
    while time.time() < stop_at + 0.5:
        if proc.poll() is not None:
            break
        rss.append((time.time() - start_at, _rss_kb(proc.pid)))
        await asyncio.sleep(0.5)
    daemon_alive = proc.poll() is None
    stop.set()
    results = []
    for _ in clients:
        results.append(await asyncio.to_thread(queue.get, True, 30.0))
    for c in clients:
        c.join(timeout=10)
    try:
        await asyncio.wait_for(watcher, 5.0)
    except (asyncio.TimeoutError, grpc.aio.AioRpcError, asyncio.CancelledError):
        pass

    period_s = 0.5
    in_load = {n: v for n, v in ticks.items() if start_at + 1.0 <= v[0] <= stop_at}
    jitter_ms = [abs(in_load[n][0] - in_load[n - 1][0] - period_s) * 1000 for n in sorted(in_load) if n - 1 in in_load]
    durations_ms = [v[1] * 1000 for v in in_load.values()]
    latency_ms = []
    for r in results:
        for seq, arrived in r["directives"]:
            tick = ticks.get(seq + 1)  # Directive.sequence is the tick count before that tick
            if tick is not None and start_at + 1.0 <= tick[0] <= stop_at:
                latency_ms.append((arrived - tick[0]) * 1000)
    sent = sum(r["reports_sent"] for r in results)
    baseline = [kb for t, kb in rss if t >= min(RSS_BASELINE_S, duration_s / 2)]
    rss_base_kb = baseline[0] if baseline else float("nan")
    rss_end_kb = rss[-1][1] if rss else float("nan")
    return {
        "engines": engines,
        "model": model,
        "client_processes": len(clients),
        "target_rate_hz_per_engine": rate_hz,
        "duration_s": duration_s,
        "period_s": period_s,
        "daemon_alive_at_end": daemon_alive,
        "client_errors": [e for r in results for e in r["errors"]][:20],
        "reports_sent": sent,
        "achieved_reports_per_s": sent / duration_s,
        "target_reports_per_s": engines * rate_hz,
        "achieved_fraction": sent / (duration_s * engines * rate_hz),
        "ticks_measured": len(in_load),
        "period_jitter_ms": {
            "p50": _pct(jitter_ms, 50),
            "p99": _pct(jitter_ms, 99),
            "max": max(jitter_ms, default=0.0),
        },
        "tick_duration_ms": {"p50": _pct(durations_ms, 50), "p99": _pct(durations_ms, 99)},
        "directive_latency_ms": {
            "count": len(latency_ms),
            "p50": _pct(latency_ms, 50),
            "p99": _pct(latency_ms, 99),
            "max": max(latency_ms, default=float("nan")),
        },
        "rss_mb": {
            "at_baseline": rss_base_kb / 1024,
            "baseline_s": min(RSS_BASELINE_S, duration_s / 2),
            "end": rss_end_kb / 1024,
            "growth": (rss_end_kb - rss_base_kb) / 1024,
            "max": max((kb for _, kb in rss), default=0) / 1024,
        },
        "directives_received": sum(len(r["directives"]) for r in results),
        "mean_ticks_per_s": (
            len(in_load) / max(1e-9, (max(v[0] for v in in_load.values()) - min(v[0] for v in in_load.values())))
        )
        if len(in_load) > 1
        else 0.0,
    }


def run_load(
    engines: int = 64,
    rate_hz: float = 100.0,
    duration_s: float = 60.0,
    procs: int = 4,
    model: str = MODEL,
    lead_s: float = 2.0,
) -> dict[str, Any]:
    """Start a daemon, drive it with ``engines`` engines, stop it; returns the figures (see module doc)."""
    work = Path(tempfile.mkdtemp(prefix="pals-load-", dir="/tmp"))
    config = work / "pals.toml"
    config.write_text("")
    argv = [
        sys.executable,
        "-m",
        "pals_daemon.cli.daemon_main",
        "--config",
        str(config),
        "--backend",
        "sim",
        "--sim-gpu-kind",
        GPU_KIND,
        "--sim-gpu-count",
        str(engines),
        "--mode",
        "enforce",
        "--budget-w",
        str(BUDGET_PER_GPU_W * engines),
        "--runtime-dir",
        str(work / "run"),
        "--state-dir",
        str(work / "state"),
        "--engine-socket-group",
        "",
        "--metrics-port",
        "0",
        "--log-level",
        "warning",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    log_path = work / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for_socket(work / "run" / "engine.sock", proc, 30.0)
        _wait_for_socket(work / "run" / "admin" / "admin.sock", proc, 30.0)
        figures = asyncio.run(
            _measure(
                proc,
                str(work / "run" / "admin" / "admin.sock"),
                str(work / "run" / "engine.sock"),
                engines,
                rate_hz,
                duration_s,
                procs,
                model,
                lead_s,
            )
        )
        proc.send_signal(signal.SIGTERM)
        figures["daemon_exit_code"] = proc.wait(timeout=30)
        figures["daemon_log_tail"] = log_path.read_text(errors="replace").splitlines()[-10:]
        return figures
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the bench, print the figures, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=64)
    parser.add_argument("--rate-hz", type=float, default=100.0)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--procs", type=int, default=4, help="client processes (engines are spread over them)")
    parser.add_argument("--model", default=MODEL, help="engine model name (one without a profile skips the optimizer)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    figures = run_load(args.engines, args.rate_hz, args.duration_s, args.procs, args.model)
    figures["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"engines {figures['engines']} x {figures['target_rate_hz_per_engine']:g} Hz for {figures['duration_s']:g} s: "
        f"sent {figures['achieved_reports_per_s']:.0f}/s of {figures['target_reports_per_s']:.0f}/s "
        f"({100 * figures['achieved_fraction']:.0f}%); daemon alive {figures['daemon_alive_at_end']}, "
        f"exit {figures['daemon_exit_code']}"
    )
    print(
        f"period jitter p50 {figures['period_jitter_ms']['p50']:.1f} ms, "
        f"p99 {figures['period_jitter_ms']['p99']:.1f} ms "
        f"over {figures['ticks_measured']} ticks; tick duration p99 {figures['tick_duration_ms']['p99']:.1f} ms"
    )
    print(
        f"directive latency p50 {figures['directive_latency_ms']['p50']:.1f} ms, "
        f"p99 {figures['directive_latency_ms']['p99']:.1f} ms ({figures['directive_latency_ms']['count']} directives)"
    )
    rss = figures["rss_mb"]
    print(
        f"daemon RSS {rss['at_baseline']:.1f} MB at {rss['baseline_s']:g} s -> {rss['end']:.1f} MB at end "
        f"(growth {rss['growth']:+.1f} MB)"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
