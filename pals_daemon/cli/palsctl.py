"""``palsctl``: the operator's command line for a running pals-daemon (over the admin socket).

Every error from the daemon or the connection is printed as one line on stderr with a non-zero exit.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

import grpc
from google.protobuf import json_format

from pals_daemon.api import pals_pb2, pals_pb2_grpc

DEFAULT_ADMIN_SOCKET = "/run/pals/admin.sock"
RPC_TIMEOUT_S = 10.0
EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """An error to print as one line."""


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The palsctl argument parser."""
    parser = argparse.ArgumentParser(prog="palsctl", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--socket",
        default=os.environ.get("PALS_ADMIN_SOCKET", DEFAULT_ADMIN_SOCKET),
        help=f"admin socket (default {DEFAULT_ADMIN_SOCKET}; env PALS_ADMIN_SOCKET)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="GPUs, engines, budget and controller state")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    budget = sub.add_parser("budget", help="show or change the node GPU power budget")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True)
    budget_sub.add_parser("get", help="show the budget")
    budget_set = budget_sub.add_parser("set", help="set the budget in watts ('none' removes it)")
    budget_set.add_argument("watts", help="budget in watts, or 'none'")
    budget_set.add_argument("--ramp", type=_finite_float, default=0.0, metavar="S", help="reach it linearly over S s")
    target = sub.add_parser("target", help="engine targets")
    target_sub = target.add_subparsers(dest="target_command", required=True)
    target_set = target_sub.add_parser("set", help="replace an engine's targets (unset ones are cleared)")
    target_set.add_argument("engine")
    target_set.add_argument("--tokens-per-s", type=_finite_float, help="throughput target, output tokens/s")
    target_set.add_argument("--ttft-ms", type=_finite_float, help="time-to-first-token SLO, ms")
    target_set.add_argument("--tpot-ms", type=_finite_float, help="time-per-output-token SLO, ms")
    watch = sub.add_parser("watch", help="print a status line after every control tick")
    watch.add_argument("--interval", type=_finite_float, default=0.0, metavar="S", help="seconds between lines")
    watch.add_argument("--count", type=int, default=0, help="stop after N lines (0: until interrupted)")
    return parser


def _stub(socket_path: str) -> pals_pb2_grpc.PowerAdminStub:
    if not os.path.exists(socket_path):
        raise CliError(f"no daemon socket at {socket_path} (is pals-daemon running? --socket to choose another)")
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    return pals_pb2_grpc.PowerAdminStub(channel)


def _watts(value: float) -> str:
    return f"{value:.0f} W"


def format_status(s: pals_pb2.NodeStatus) -> str:
    """A readable multi-line table of the status."""
    b, c = s.budget, s.controller
    budget = _watts(b.budget_w) if b.HasField("budget_w") else "none"
    if b.ramp_remaining_s > 0 and b.HasField("effective_budget_w"):
        budget += f" (now {_watts(b.effective_budget_w)}, ramp {b.ramp_remaining_s:.0f} s left)"
    lines = [
        f"mode {c.mode}   backend {c.backend}   period {c.period_s:g} s   ticks {c.ticks}   "
        f"last tick {c.last_tick_duration_s * 1000:.1f} ms",
        f"budget {budget}   node power {_watts(b.node_power_w)}   sum of enforced limits "
        f"{_watts(b.sum_enforced_limits_w)}   (range {_watts(b.min_budget_w)}-{_watts(b.max_budget_w)})",
        "",
        f"{'GPU':>3}  {'name':<18} {'power':>7} {'limit':>7} {'enforced':>8} {'decided':>7} {'range':>11} "
        f"{'SM MHz':>6} {'capped':>6}  engine",
    ]
    for g in s.gpus:
        state = "" if g.controlled else f"  NOT CONTROLLED: {g.fault}"
        lines.append(
            f"{g.index:>3}  {g.name[:18]:<18} {g.power_w:>6.0f}W {g.requested_limit_w:>6.0f}W "
            f"{g.enforced_limit_w:>7.0f}W {g.decided_limit_w:>6.0f}W {g.min_limit_w:>4.0f}-{g.max_limit_w:<4.0f}W  "
            f"{g.sm_clock_mhz:>6} {'yes' if g.power_capped else 'no':>6}  {g.engine_id or '-'}{state}"
        )
    if s.engines:
        lines += [
            "",
            f"{'engine':<16} {'model':<28} {'conn':>4} {'tok/s':>8} {'target':>8} {'tok/J':>7} "
            f"{'seqs':>5} {'QoS viol':>8}",
        ]
        for e in s.engines:
            target = f"{e.targets.tokens_per_s:.0f}" if e.targets.HasField("tokens_per_s") else "-"
            lines.append(
                f"{e.engine_id[:16]:<16} {e.model[:28]:<28} {'yes' if e.connected else 'no':>4} "
                f"{e.throughput_tokens_per_s:>8.1f} {target:>8} {e.tokens_per_joule:>7.3f} "
                f"{e.max_num_seqs_limit:>5} {e.qos_violation_fraction * 100:>7.1f}%"
            )
    else:
        lines += ["", "no engines connected"]
    return "\n".join(lines)


def _watch_line(s: pals_pb2.NodeStatus) -> str:
    b = s.budget
    budget = _watts(b.effective_budget_w) if b.HasField("effective_budget_w") else "none"
    caps = " ".join(f"{g.enforced_limit_w:.0f}" for g in s.gpus)
    seqs = " ".join(f"{e.engine_id}={e.max_num_seqs_limit}" for e in s.engines if e.connected)
    return f"tick {s.controller.ticks}  power {_watts(b.node_power_w)}  budget {budget}  caps [{caps}] W  seqs {seqs}"


def _parse_budget(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise CliError(f"budget {text!r} is not a number of watts (or 'none')") from None
    return value  # NaN/Inf/negatives go to the daemon, which refuses them with its own message


def run(args: argparse.Namespace) -> int:
    """Execute one parsed command."""
    stub = _stub(args.socket)
    if args.command == "status":
        status = stub.GetStatus(pals_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_S)
        if args.json:
            print(json_format.MessageToJson(status, preserving_proto_field_name=True))
        else:
            print(format_status(status))
    elif args.command == "budget":
        if args.budget_command == "get":
            budget = stub.GetBudget(pals_pb2.GetBudgetRequest(), timeout=RPC_TIMEOUT_S)
        else:
            watts = _parse_budget(args.watts)
            request = pals_pb2.SetBudgetRequest(ramp_s=args.ramp)
            if watts is None:
                request.clear = True
            else:
                request.budget_w = watts
            budget = stub.SetBudget(request, timeout=RPC_TIMEOUT_S)
        value = _watts(budget.budget_w) if budget.HasField("budget_w") else "none"
        print(
            f"budget {value}   sum of enforced limits {_watts(budget.sum_enforced_limits_w)}   "
            f"node power {_watts(budget.node_power_w)}"
        )
    elif args.command == "target":
        targets = pals_pb2.EngineTargets()
        for name in ("tokens_per_s", "ttft_ms", "tpot_ms"):
            value = getattr(args, name)
            if value is not None:
                setattr(targets, name, value)
        engine = stub.SetEngineTargets(
            pals_pb2.SetEngineTargetsRequest(engine_id=args.engine, targets=targets), timeout=RPC_TIMEOUT_S
        )
        print(json_format.MessageToJson(engine.targets, preserving_proto_field_name=True).replace("\n", " "))
    elif args.command == "watch":
        stream = stub.WatchStatus(pals_pb2.WatchStatusRequest(interval_s=args.interval))
        for n, status in enumerate(stream, start=1):
            print(_watch_line(status), flush=True)
            if args.count and n >= args.count:
                stream.cancel()
                break
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``palsctl``."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CliError as exc:
        print(f"palsctl: {exc}", file=sys.stderr)
    except grpc.RpcError as exc:
        code = exc.code().name if exc.code() else "ERROR"
        print(f"palsctl: {code}: {exc.details()}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
