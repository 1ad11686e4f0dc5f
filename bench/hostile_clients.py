"""Hostile local clients against a live daemon: each attack of issue 10 (section B), with the daemon measured.

The daemon is its own process; each attack runs in another process (``python bench/hostile_clients.py
--attack NAME ...``), so neither the attacker's CPU nor its GIL is charged to the measurements taken here:

- admin latency: a GetStatus every 0.1 s and a SetBudget (same value) every 0.5 s on the admin socket;
- tick gaps: spacing of successive tick starts (WatchStatus, ControllerStatus.last_tick_started_unix_s);
- the daemon's RSS and open descriptors (/proc/<pid>), before and during the attack.

Attacks (all loopback or Unix sockets, bounded in count and time):
  metrics-idle   N idle TCP connections to the metrics port (the daemon once ran out of descriptors)
  engine-idle    N idle connections to engine.sock
  expert-flood   N concurrent ReportExpertLoad streams of the largest reports accepted, as fast as possible
  unregistered   Connect streams that never register, N at a time, reopened as they are ended
  continuation   HEADERS then CONTINUATION frames without end (MiB each) on N raw HTTP/2 connections
  scrapers       N concurrent /metrics scrapers in a loop
  churn          N register/cancel cycles of one engine id, back to back
  silent         a session under an engine id that registers and then says nothing

    python bench/hostile_clients.py                     # every attack against a simulated node, JSON out
    python bench/hostile_clients.py --attacks scrapers --duration-s 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from pals_daemon.api import pals_pb2, pals_pb2_grpc  # noqa: E402
from pals_daemon.server import limits, validate  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "hostile_clients.json"
# The attacks and their default size (the reproductions, where a test-sized run is given in tests).
ATTACKS = {
    "metrics-idle": 1000,
    "engine-idle": 1000,
    "expert-flood": 256,
    "unregistered": 2000,
    "continuation": 128,
    "scrapers": 500,
    "churn": 1000,
    "silent": 1,
}
SAMPLE_S = 0.1
SYSTEMD_DEFAULT_NOFILE = 1024
SET_BUDGET_EVERY_S = 0.5
CONTINUATION_FRAME_BYTES = 16 << 10
CONTINUATION_TOTAL_BYTES = 16 << 20
# Separate TCP connections per channel (grpc shares one subchannel per target otherwise).
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


@dataclass
class Target:
    """A running daemon: its pid, sockets, metrics port and period."""

    pid: int
    admin_socket: str
    engine_socket: str
    metrics_port: int
    period_s: float
    gpu_indices: tuple[int, ...] = (0, 1)


@dataclass
class Figures:
    """What the probe measured over one attack."""

    attack: str
    size: int
    duration_s: float
    admin_calls: int = 0
    admin_failures: list[str] = field(default_factory=list)
    admin_latency_max_s: float = 0.0
    admin_latency_p99_s: float = 0.0
    ticks: int = 0
    tick_gap_p99_s: float = 0.0
    tick_gap_max_s: float = 0.0
    rss_before_mb: float = 0.0
    rss_max_mb: float = 0.0
    rss_growth_mb: float = 0.0
    fds_before: int = 0
    fds_max: int = 0
    attacker: dict[str, Any] = field(default_factory=dict)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class Probe:
    """Measures the daemon from this process (threads, blocking gRPC) while an attack runs elsewhere."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.tick_starts: list[tuple[int, float]] = []
        self.rss: list[float] = []
        self.fds: list[int] = []
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._admin, self._watch, self._sample)]

    def __enter__(self) -> Probe:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(10)

    def _admin(self) -> None:
        with grpc.insecure_channel(f"unix:{self.target.admin_socket}") as channel:
            stub = pals_pb2_grpc.PowerAdminStub(channel)
            last_set = 0.0
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    status = stub.GetStatus(pals_pb2.GetStatusRequest(), timeout=5)
                    if started - last_set > SET_BUDGET_EVERY_S and status.budget.HasField("budget_w"):
                        stub.SetBudget(pals_pb2.SetBudgetRequest(budget_w=status.budget.budget_w), timeout=5)
                        last_set = started
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
                self.latencies.append(time.perf_counter() - started)
                self.stop.wait(SAMPLE_S)

    def _watch(self) -> None:
        with grpc.insecure_channel(f"unix:{self.target.admin_socket}") as channel:
            stream = pals_pb2_grpc.PowerAdminStub(channel).WatchStatus(pals_pb2.WatchStatusRequest())
            try:
                for status in stream:
                    c = status.controller
                    self.tick_starts.append((c.ticks, c.last_tick_started_unix_s))
                    if self.stop.is_set():
                        break
            except grpc.RpcError as exc:
                self.failures.append(f"watch: {exc.code().name}")  # type: ignore[attr-defined]
            finally:
                stream.cancel()

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.rss.append(rss_mb(self.target.pid))
            self.fds.append(open_fds(self.target.pid))
            self.stop.wait(SAMPLE_S)

    def tick_gaps(self) -> list[float]:
        """Per-tick spacing: between two snapshots k ticks apart, their start times' difference over k."""
        gaps = []
        for (n0, t0), (n1, t1) in zip(self.tick_starts, self.tick_starts[1:], strict=False):
            if n1 > n0:
                gaps.extend([(t1 - t0) / (n1 - n0)] * (n1 - n0))
        return gaps


def measure(target: Target, attack: str, size: int, duration_s: float, baseline_s: float = 1.0) -> Figures:
    """Run ``attack`` (in a child process) for ``duration_s`` against ``target`` and measure the daemon."""
    rss_before = rss_mb(target.pid)
    fds_before = open_fds(target.pid)
    figures = Figures(attack, size, duration_s, rss_before_mb=rss_before, fds_before=fds_before)
    with Probe(target) as probe:
        time.sleep(baseline_s)  # the watch and admin streams are up before the attack
        proc = subprocess.Popen(
            [sys.executable, __file__, "--attack", attack, "--size", str(size), "--duration-s", str(duration_s)]
            + ["--target", json.dumps(asdict(target))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(timeout=duration_s + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err = f"attacker killed after {duration_s + 60:g} s\n{err}"
        time.sleep(2 * target.period_s)  # the ticks right after the attack count too
    try:
        figures.attacker = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        figures.attacker = {"error": f"attacker exited {proc.returncode}: {err[-2000:]}"}
    figures.admin_calls = len(probe.latencies)
    figures.admin_failures = probe.failures[:10]
    figures.admin_latency_max_s = max(probe.latencies, default=float("nan"))
    figures.admin_latency_p99_s = pct(probe.latencies, 99)
    gaps = probe.tick_gaps()
    figures.ticks = len(gaps)
    figures.tick_gap_p99_s = pct(gaps, 99)
    figures.tick_gap_max_s = max(gaps, default=float("nan"))
    figures.rss_max_mb = max(probe.rss, default=rss_before)
    figures.rss_growth_mb = figures.rss_max_mb - rss_before
    figures.fds_max = max(probe.fds, default=fds_before)
    return figures


# ------------------------------------------------------------------ the attacks (run in the child process)


def _hold(conns: list[socket.socket], duration_s: float) -> dict[str, Any]:
    """Keep connections idle for the duration; count how many the daemon closed meanwhile."""
    time.sleep(duration_s)
    closed = 0
    for c in conns:
        c.setblocking(False)
        try:
            closed += c.recv(1) == b""
        except (BlockingIOError, OSError):
            pass
        c.close()
    return {"opened": len(conns), "closed_by_daemon": closed}


def attack_metrics_idle(t: Target, size: int, duration_s: float) -> dict[str, Any]:
    conns, refused = [], 0
    give_up = time.monotonic() + duration_s
    for _ in range(size):
        if time.monotonic() > give_up:  # a daemon out of descriptors stops accepting: connects then hang
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.2)
        try:
            s.connect(("127.0.0.1", t.metrics_port))
            conns.append(s)
        except OSError:
            refused += 1
            s.close()
    return {**_hold(conns, duration_s), "refused": refused}


def attack_engine_idle(t: Target, size: int, duration_s: float) -> dict[str, Any]:
    conns, refused = [], 0
    give_up = time.monotonic() + duration_s
    for _ in range(size):
        if time.monotonic() > give_up:  # a daemon out of descriptors stops accepting: connects then hang
            break
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(0.2)
        try:
            s.connect(t.engine_socket)
            conns.append(s)
        except OSError:
            refused += 1
            s.close()
    return {**_hold(conns, duration_s), "refused": refused}


def largest_expert_report(gpu_index: int) -> pals_pb2.ExpertLoadReport:
    """The costliest report the daemon accepts: every expert counter allowed, each a one-byte varint."""
    per_layer = validate.MAX_EXPERT_ENTRIES // 64
    layers = [pals_pb2.LayerExpertLoad(tokens_per_expert=[1] * per_layer) for _ in range(64)]
    return pals_pb2.ExpertLoadReport(gpu_index=gpu_index, window_s=0.1, layers=layers)


async def _expert_flood(t: Target, size: int, duration_s: float) -> dict[str, Any]:
    reports = [largest_expert_report(i) for i in t.gpu_indices]
    deadline = time.monotonic() + duration_s
    counts = {"streams": size, "sent": 0, "ended": {}}
    per_channel = limits.MAX_STREAMS_PER_CONNECTION
    channels = [
        grpc.aio.insecure_channel(f"unix:{t.engine_socket}", options=OWN_CONNECTION)
        for _ in range((size + per_channel - 1) // per_channel)
    ]

    async def stream(i: int) -> None:
        stub = pals_pb2_grpc.EngineLinkStub(channels[i // per_channel])
        while time.monotonic() < deadline:

            async def gen() -> Any:
                while time.monotonic() < deadline:
                    counts["sent"] += 1
                    yield reports[i % len(reports)]

            try:
                await asyncio.wait_for(stub.ReportExpertLoad(gen()), deadline - time.monotonic() + 1)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                counts["ended"][code] = counts["ended"].get(code, 0) + 1
                await asyncio.sleep(0.05)
            except asyncio.TimeoutError:
                return

    await asyncio.gather(*(stream(i) for i in range(size)))
    for ch in channels:
        await ch.close()
    return counts


async def _unregistered(t: Target, size: int, duration_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + duration_s
    counts: dict[str, Any] = {"opened": 0, "ended": {}}
    per_channel = limits.MAX_STREAMS_PER_CONNECTION
    channels = [
        grpc.aio.insecure_channel(f"unix:{t.engine_socket}", options=OWN_CONNECTION)
        for _ in range((size + per_channel - 1) // per_channel)
    ]

    async def stream(i: int) -> None:
        stub = pals_pb2_grpc.EngineLinkStub(channels[i // per_channel])
        while time.monotonic() < deadline:
            call = stub.Connect()
            counts["opened"] += 1
            try:
                await asyncio.wait_for(call.read(), deadline - time.monotonic())
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                counts["ended"][code] = counts["ended"].get(code, 0) + 1
                await asyncio.sleep(0.05)
            except asyncio.TimeoutError:
                call.cancel()
                return

    await asyncio.gather(*(stream(i) for i in range(size)))
    for ch in channels:
        await ch.close()
    return counts


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def attack_continuation(t: Target, size: int, duration_s: float) -> dict[str, Any]:
    """HEADERS (no END_HEADERS) and then CONTINUATION frames carrying one ever-growing header value."""
    deadline = time.monotonic() + duration_s
    sent, cut = 0, 0

    def one() -> None:
        nonlocal sent, cut
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2.0)
        try:
            s.connect(t.engine_socket)
            # Literal header without indexing, new name "x-big", value length 2^27 (HPACK integer, 7-bit prefix).
            value_len = 1 << 27
            length = bytes([0x7F]) + _hpack_int_tail(value_len - 127)
            block = b"\x00" + bytes([5]) + b"x-big" + length
            s.sendall(H2_PREFACE + _frame(4, 0, 0, b"") + _frame(1, 0, 1, block))
            chunk = _frame(9, 0, 1, b"a" * CONTINUATION_FRAME_BYTES)
            total = 0
            while total < CONTINUATION_TOTAL_BYTES and time.monotonic() < deadline:
                s.sendall(chunk)
                total += CONTINUATION_FRAME_BYTES
                sent += CONTINUATION_FRAME_BYTES
        except OSError:
            cut += 1
        finally:
            s.close()

    threads = [threading.Thread(target=one) for _ in range(size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(duration_s + 10)
    return {"connections": size, "bytes_sent": sent, "cut_by_daemon": cut}


def _hpack_int_tail(value: int) -> bytes:
    out = bytearray()
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def attack_scrapers(t: Target, size: int, duration_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + duration_s
    ok = [0] * size
    failed = [0] * size

    def scraper(i: int) -> None:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{t.metrics_port}/metrics", timeout=5) as r:
                    r.read()
                ok[i] += 1
            except OSError:
                failed[i] += 1

    threads = [threading.Thread(target=scraper, args=(i,)) for i in range(size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(duration_s + 10)
    return {"scrapers": size, "scrapes_ok": sum(ok), "scrapes_failed": sum(failed)}


def _register(engine_id: str, gpus: tuple[int, ...]) -> pals_pb2.EngineMessage:
    return pals_pb2.EngineMessage(
        register=pals_pb2.Register(
            engine_id=engine_id,
            model="mixtral-8x7b-instruct",
            gpu_indices=list(gpus),
            max_num_seqs=256,
            max_num_batched_tokens=8192,
            client_version="hostile",
        )
    )


async def _churn(t: Target, size: int, duration_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + duration_s
    cycles = 0
    async with grpc.aio.insecure_channel(f"unix:{t.engine_socket}") as channel:
        stub = pals_pb2_grpc.EngineLinkStub(channel)
        while cycles < size and time.monotonic() < deadline:
            call = stub.Connect()
            await call.write(_register("churn", t.gpu_indices))
            try:
                await asyncio.wait_for(call.read(), 2.0)
            except (grpc.aio.AioRpcError, asyncio.TimeoutError):
                pass
            call.cancel()
            cycles += 1
    return {"cycles": cycles}


async def _silent(t: Target, size: int, duration_s: float) -> dict[str, Any]:
    duration_s = max(duration_s, limits.EngineLimits().silence_timeout_s + 2)  # long enough to be timed out
    async with grpc.aio.insecure_channel(f"unix:{t.engine_socket}") as channel:
        call = pals_pb2_grpc.EngineLinkStub(channel).Connect()
        await call.write(_register("silent", t.gpu_indices))
        started = time.monotonic()
        ended = "open at the end"
        try:
            while time.monotonic() - started < duration_s:
                msg = await asyncio.wait_for(call.read(), duration_s)
                if msg is grpc.aio.EOF:
                    ended = "EOF"
                    break
        except grpc.aio.AioRpcError as exc:
            ended = exc.code().name
        except asyncio.TimeoutError:
            pass
        call.cancel()
        return {"ended": ended, "after_s": round(time.monotonic() - started, 3)}


def run_attack(name: str, t: Target, size: int, duration_s: float) -> dict[str, Any]:
    """Run one attack from this process (the child)."""
    sync = {
        "metrics-idle": attack_metrics_idle,
        "engine-idle": attack_engine_idle,
        "continuation": attack_continuation,
        "scrapers": attack_scrapers,
    }
    if name in sync:
        return sync[name](t, size, duration_s)
    coro = {"expert-flood": _expert_flood, "unregistered": _unregistered, "churn": _churn, "silent": _silent}[name]
    return asyncio.run(coro(t, size, duration_s))


# ------------------------------------------------------------------ a simulated node for the bench


def start_sim_daemon(workdir: Path, period_s: float, daemon_src: Path = REPO) -> tuple[subprocess.Popen[bytes], Target]:
    """A daemon on four simulated A100s, enforce mode, a 1,000 W budget (binding), metrics on a free port;
    the pals_daemon package of ``daemon_src`` (another checkout measures another version)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir.mkdir(parents=True, exist_ok=True)
    run = workdir / "run"
    argv = [sys.executable, "-m", "pals_daemon.cli.daemon_main", "--config", os.devnull, "--backend", "sim"]
    argv += ["--runtime-dir", str(run), "--state-dir", str(workdir / "state"), "--engine-socket-group", ""]
    argv += ["--period-s", str(period_s), "--metrics-port", str(port), "--budget-w", "1000", "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALS_") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = str(daemon_src)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave the other checkout as it is
    log = open(workdir / "daemon.log", "wb")  # noqa: SIM115 - kept open for the daemon's life
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=daemon_src)
    # systemd's default soft limit: what the daemon had before the unit set LimitNOFILE.
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (SYSTEMD_DEFAULT_NOFILE, SYSTEMD_DEFAULT_NOFILE))
    target = Target(proc.pid, str(run / "admin" / "admin.sock"), str(run / "engine.sock"), port, period_s, (0, 1, 2, 3))
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode}: {(workdir / 'daemon.log').read_text()}")
        try:
            with grpc.insecure_channel(f"unix:{target.admin_socket}") as ch:
                pals_pb2_grpc.PowerAdminStub(ch).GetStatus(pals_pb2.GetStatusRequest(), timeout=0.5)
            return proc, target
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attacks to run")
    parser.add_argument("--duration-s", type=float, default=5.0, help="length of each attack")
    parser.add_argument("--period-s", type=float, default=0.5, help="the daemon's control period")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--daemon-src", type=Path, default=REPO, help="checkout whose daemon to attack (default: this one)"
    )
    # Child mode: run one attack against a given target and print what it saw as JSON.
    parser.add_argument("--attack", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attack:
        target = Target(**{**json.loads(args.target), "gpu_indices": tuple(json.loads(args.target)["gpu_indices"])})
        print(json.dumps(run_attack(args.attack, target, args.size, args.duration_s)))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="pals-hostile-") as tmp:
        for name in args.attacks.split(","):
            # A fresh daemon per attack: what one attack leaves behind (RSS) is not charged to the next.
            proc, target = start_sim_daemon(Path(tmp) / name, args.period_s, args.daemon_src.resolve())
            try:
                figures = measure(target, name, ATTACKS[name], args.duration_s)
                results.append({**asdict(figures), "daemon_alive_at_end": proc.poll() is None})
                print(
                    f"{name:13s} x{figures.size:<5d} admin max {figures.admin_latency_max_s * 1e3:7.1f} ms  "
                    f"tick gap p99 {figures.tick_gap_p99_s:.3f} s max {figures.tick_gap_max_s:.3f} s  "
                    f"RSS +{figures.rss_growth_mb:6.1f} MB  fds max {figures.fds_max:4d}  {figures.attacker}",
                    flush=True,
                )
            finally:
                proc.terminate()
                proc.wait(30)
    doc = {
        "daemon_src": str(args.daemon_src),
        "command": "python bench/hostile_clients.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "period_s": args.period_s,
        "duration_s": args.duration_s,
        "cpus": os.cpu_count(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
