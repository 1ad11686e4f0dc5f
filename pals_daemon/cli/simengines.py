"""``pals-simengines``: attach simulated vLLM engines to a running pals-daemon over its engine socket.

Each engine replays a request load (Poisson arrivals at ``--rate``, or a trace CSV) on simulated GPUs, with the
measured A100 behaviour of ``--model`` (pals_daemon/sim/truth.py), and talks to the daemon through the client
that ships for vLLM (pals_daemon/sim/client_engine.py): it registers, streams telemetry and obeys the batch
limits the daemon sends. With the admin socket reachable it also follows the power caps the daemon enforces
(read with GetStatus), so the engines slow down under a budget as real ones would.

Meant for a daemon started with ``--backend sim`` (the engines name its simulated GPUs). The daemon's own
simulated GPUs do not see this process's load: their power readings stay at idle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence

import grpc

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.clock import Clock, ScaledClock
from pals_daemon.sim.client_engine import ClientSimEngine
from pals_daemon.sim.engine import Request, SimEngine
from pals_daemon.sim.gpu import SimGpu, make_sim_gpus, sim_uuid
from pals_daemon.sim.trace import load_trace_csv, poisson_requests
from pals_daemon.sim.truth import known_models, load_a100_truth
from pals_daemon.units import w_to_mw

DEFAULT_ENGINE_SOCKET = "/run/pals/engine.sock"
# How often the mirrored GPUs take the daemon's enforced caps (s): a tick is 0.5 s by default.
CAP_POLL_S = 0.5


def build_parser() -> argparse.ArgumentParser:
    """The pals-simengines argument parser."""
    parser = argparse.ArgumentParser(
        prog="pals-simengines",
        description=__doc__.split("\n\n")[0],
        epilog=f"Models: {', '.join(known_models())}.",
    )
    parser.add_argument(
        "--socket",
        default=os.environ.get("PALS_ENGINE_SOCKET", DEFAULT_ENGINE_SOCKET),
        help=f"the daemon's engine socket (default {DEFAULT_ENGINE_SOCKET}; env PALS_ENGINE_SOCKET)",
    )
    parser.add_argument(
        "--admin-socket",
        help="admin socket to read enforced caps from (default <engine socket dir>/admin/admin.sock; '' for none)",
    )
    parser.add_argument("--model", required=True, help="model to simulate (4x A100 TP4 measurements)")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, metavar="REQ_PER_S", help="Poisson arrivals per second, per engine")
    load.add_argument("--trace", metavar="CSV", help="trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)")
    parser.add_argument("--duration", type=float, default=60.0, metavar="S", help="seconds of load (default 60)")
    parser.add_argument("--engines", type=int, default=1, help="engines, each on the next 4 GPUs (default 1)")
    parser.add_argument("--first-gpu", type=int, default=0, help="index of the first GPU used (default 0)")
    parser.add_argument("--engine-id", default="sim", help="engine id prefix: <prefix>0, <prefix>1, ... (default sim)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length with --rate (default 512)")
    parser.add_argument("--output-tokens", type=int, default=128, help="output length with --rate (default 128)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="configured batch limit (default 64)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget per step (8192)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the arrivals (default 0)")
    return parser


def _requests(args: argparse.Namespace, engine_no: int) -> list[Request]:
    if args.trace:
        return load_trace_csv(args.trace, limit_s=args.duration)
    return poisson_requests(args.rate, args.duration, args.prompt_tokens, args.output_tokens, args.seed + engine_no)


async def _follow_caps(admin_socket: str, gpus: Sequence[SimGpu], stop: asyncio.Event) -> None:
    """Keep each mirrored GPU at the limit the daemon enforces on the GPU of the same index."""
    by_index = {g.identity.index: g for g in gpus}
    async with grpc.aio.insecure_channel(f"unix:{admin_socket}") as channel:
        stub = pals_pb2_grpc.PowerAdminStub(channel)
        while not stop.is_set():
            status = await stub.GetStatus(pals_pb2.GetStatusRequest(), timeout=5)
            for g in status.gpus:
                if g.index in by_index:
                    by_index[g.index].set_power_limit_mw(w_to_mw(g.enforced_limit_w))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), CAP_POLL_S)


async def attach(args: argparse.Namespace, clock: Clock | None = None) -> list[ClientSimEngine]:
    """Run the engines until their load is served (or SIGINT/SIGTERM); returns them for their totals."""
    clock = clock or ScaledClock(1.0)
    truth = load_a100_truth(args.model)
    n = truth.num_gpus
    engines: list[ClientSimEngine] = []
    all_gpus: list[SimGpu] = []
    for k in range(args.engines):
        first = args.first_gpu + k * n
        gpus = make_sim_gpus(truth.hardware.name, n, clock.now, first_index=first)
        all_gpus += gpus
        engine = SimEngine(
            f"{args.engine_id}{k}",
            truth,
            gpus,
            _requests(args, k),
            args.max_num_seqs,
            args.max_num_batched_tokens,
            start_s=clock.now(),
        )
        # The daemon's sim backend names GPU i sim_uuid(i): the same UUIDs register these engines there.
        uuids = [sim_uuid(g.identity.index) for g in gpus]
        engines.append(ClientSimEngine(engine, args.model, args.socket, clock, gpu_uuids=uuids))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    admin = args.admin_socket
    if admin is None:
        admin = os.path.join(os.path.dirname(args.socket), "admin", "admin.sock")
    followers = []
    if admin and os.access(admin, os.R_OK | os.W_OK):
        followers.append(asyncio.create_task(_follow_caps(admin, all_gpus, stop)))
    else:
        print(f"pals-simengines: no access to {admin or 'an admin socket'}: the engines run uncapped", file=sys.stderr)
    print(
        f"pals-simengines: {len(engines)} engine(s) of {args.model} on {args.socket}: "
        + ", ".join(f"{e.engine.engine_id} (GPUs {[g.identity.index for g in e.engine.gpus]})" for e in engines),
        flush=True,
    )
    try:
        await asyncio.gather(*(e.run(stop) for e in engines))
    finally:
        stop.set()
        for task in followers:
            with contextlib.suppress(Exception):
                await task
    return engines


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pals-simengines``."""
    args = build_parser().parse_args(argv)
    if args.engines < 1 or args.duration <= 0 or (args.rate is not None and not args.rate > 0):
        print("pals-simengines: --engines, --duration and --rate must be > 0", file=sys.stderr)
        return 2
    try:
        engines = asyncio.run(attach(args))
    except (ValueError, OSError) as exc:
        print(f"pals-simengines: {exc}", file=sys.stderr)
        return 1
    for e in engines:
        t = e.engine.totals
        print(
            f"{e.engine.engine_id}: {t.requests_finished} of {t.requests_arrived} requests served, "
            f"{t.output_tokens} output tokens, {e.client.directives_received} directives received"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
