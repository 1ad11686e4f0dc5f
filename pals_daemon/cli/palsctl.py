"""``palsctl``: the operator's command line for a running pals-daemon (over the admin socket).

Every error from the daemon or the connection is printed as one line on stderr with a non-zero exit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from pals_daemon import __version__
from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.cli import palsctl_cluster

DEFAULT_ADMIN_SOCKET = "/run/pals/admin/admin.sock"
RPC_TIMEOUT_S = 10.0
EXIT_ERROR = 1
EXIT_USAGE = 2
# What the daemon does with an engine whose model has no profile for the node's GPUs.
NO_PROFILE_NOTE = "NO PROFILE: GPUs at default limits or an equal budget share, engine's own batch limit"
TARGET_FIELDS = ("tokens_per_s", "ttft_ms", "tpot_ms")
# Trailing-metadata key of a warning the daemon attaches to a reply (e.g. targets for an engine not connected).
WARNING_METADATA_KEY = "pals-warning"


class CliError(Exception):
    """An error to print as one line."""


class UsageError(CliError):
    """A command line that cannot work (exit status 2, as argparse's)."""


_JOB_STATES = {
    pals_pb2.PROFILE_STATE_RUNNING: "running",
    pals_pb2.PROFILE_STATE_DONE: "done",
    pals_pb2.PROFILE_STATE_FAILED: "failed",
    pals_pb2.PROFILE_STATE_CANCELLED: "cancelled",
}


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _list_of(kind: Callable[[str], float], name: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {name}")
        return [kind(t) for t in items]

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line naming the command (not its internals) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _add_socket(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--socket",
        default=default,
        help=f"admin socket (default {DEFAULT_ADMIN_SOCKET}; env PALS_ADMIN_SOCKET)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The palsctl argument parser. ``--socket`` is accepted before or after the subcommand."""
    parser = _Parser(prog="palsctl", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"palsctl {__version__}")
    _add_socket(parser, os.environ.get("PALS_ADMIN_SOCKET", DEFAULT_ADMIN_SOCKET))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(where: argparse._SubParsersAction, name: str, **kwargs: object) -> argparse.ArgumentParser:
        child = where.add_parser(name, **kwargs)
        _add_socket(child, argparse.SUPPRESS)  # SUPPRESS: a later --socket wins, none keeps the top-level one
        return child

    status = command(sub, "status", help="GPUs, engines, budget and controller state")
    status.add_argument("--json", action="store_true", help="machine-readable output (every field, numbers as numbers)")
    budget = command(sub, "budget", help="show or change the node GPU power budget")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True, metavar="{get,set}")
    command(budget_sub, "get", help="show the budget")
    budget_set = command(budget_sub, "set", help="set the budget in watts ('clear' or 'none' removes it)")
    budget_set.add_argument("watts", help="budget in watts, or 'clear' / 'none'")
    budget_set.add_argument(
        "--ramp", type=_finite_float, default=0.0, metavar="S", help="reach it linearly over S s (default 0: at once)"
    )
    target = command(sub, "target", help="show or change engine targets")
    target_sub = target.add_subparsers(dest="target_command", required=True, metavar="{get,set}")
    target_get = command(target_sub, "get", help="show the targets of one engine, or of every engine")
    target_get.add_argument("engine", nargs="?", help="engine id (default: every engine with targets or connected)")
    target_get.add_argument("--json", action="store_true", help="machine-readable output")
    target_set = command(
        target_sub, "set", help="replace an engine's targets (unset ones are cleared; --clear removes them all)"
    )
    target_set.add_argument("engine", help="engine id (as in palsctl status; need not be connected yet)")
    target_set.add_argument("--tokens-per-s", type=_finite_float, help="throughput target, output tokens/s")
    target_set.add_argument("--ttft-ms", type=_finite_float, help="time-to-first-token SLO, ms")
    target_set.add_argument("--tpot-ms", type=_finite_float, help="time-per-output-token SLO, ms")
    target_set.add_argument("--clear", action="store_true", help="remove every target of the engine")
    watch = command(sub, "watch", help="print a timestamped status line after every control tick")
    watch.add_argument(
        "--interval",
        type=_finite_float,
        default=0.0,
        metavar="S",
        help="seconds between lines (default 0: after every tick)",
    )
    watch.add_argument("--count", type=int, default=0, help="stop after N lines (0: until interrupted)")
    watch.add_argument("--json", action="store_true", help="one JSON status object per line")
    profile = command(
        sub,
        "profile",
        help="sweep an engine over power caps x batch limits on live load and write a profile",
        description="Start an online profile sweep (the engine must serve a load that saturates the batch), "
        "or show (--status) or stop (--cancel) the engine's job.",
    )
    profile.add_argument("engine", help="engine id of a connected engine")
    profile.add_argument("--caps", type=_list_of(_finite_float, "watts"), metavar="W,W,...", help="per-GPU caps, W")
    profile.add_argument(
        "--batches", type=_list_of(_positive_int, "batch sizes"), metavar="N,N,...", help="max_num_seqs values"
    )
    profile.add_argument(
        "--clocks",
        type=_list_of(_positive_int, "clocks"),
        metavar="MHZ,MHZ,...",
        help="locked SM clocks to sweep too, at the highest cap (the clock_points of the profile)",
    )
    profile.add_argument("--hold", type=_finite_float, metavar="S", help="seconds each point is measured")
    profile.add_argument("--settle", type=_finite_float, metavar="S", help="seconds before measuring (default 2)")
    profile.add_argument("--output", metavar="PATH", help="profile file (default <state_dir>/profiles/...)")
    profile.add_argument("--parallelism", help="the profile's parallelism field (default tp<GPUs>)")
    profile.add_argument("--wait", action="store_true", help="print progress until the job ends")
    profile.add_argument(
        "--poll", type=_finite_float, default=1.0, metavar="S", help="seconds between polls with --wait (default 1)"
    )
    which = profile.add_mutually_exclusive_group()
    which.add_argument("--status", action="store_true", help="show the engine's running or last job")
    which.add_argument("--cancel", action="store_true", help="cancel the engine's running job")
    palsctl_cluster.add_parser(sub)
    return parser


def check_socket(path: str) -> None:
    """CliError with the reason when ``path`` cannot be the admin socket: absent, unreachable, not a socket."""
    try:
        mode = os.stat(path).st_mode
    except PermissionError:
        raise CliError(
            f"permission denied reaching {path}: the admin socket is root's (0600, in a 0700 directory); "
            "run palsctl as root"
        ) from None
    except OSError:
        raise CliError(f"no daemon socket at {path} (is pals-daemon running? --socket to choose another)") from None
    if not stat.S_ISSOCK(mode):
        raise CliError(f"{path} is not a socket (--socket to choose the admin socket)")
    if not os.access(path, os.R_OK | os.W_OK):
        raise CliError(f"permission denied on {path}: the admin socket is root's (mode 0600); run palsctl as root")


def _stub(socket_path: str) -> pals_pb2_grpc.PowerAdminStub:
    check_socket(socket_path)
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    return pals_pb2_grpc.PowerAdminStub(channel)


_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_to_dict(message: Message) -> dict[str, Any]:
    """The message as JSON-ready data: every field (false, zero and empty ones too; an unset ``optional`` field,
    whose absence means something, stays absent), enums as numbers, 64-bit integers as numbers (proto3 JSON
    writes them as strings)."""
    options: dict[str, Any] = {"preserving_proto_field_name": True, "use_integers_for_enums": True}
    try:
        data = json_format.MessageToDict(message, always_print_fields_with_no_presence=True, **options)
    except TypeError:  # protobuf < 5.26 names it differently
        data = json_format.MessageToDict(message, including_default_value_fields=True, **options)
    _int64_as_numbers(message.DESCRIPTOR, data)
    return data


def _int64_as_numbers(descriptor: Any, data: dict[str, Any]) -> None:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if field.is_repeated else [value]:
                _int64_as_numbers(field.message_type, item)
        elif field.type in _INT64_TYPES:
            data[field.name] = [int(v) for v in value] if field.is_repeated else int(value)


def _to_json(message: Message, indent: int | None = 2) -> str:
    return json.dumps(message_to_dict(message), indent=indent)


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
    lines += ["", f"{'GPU':>3}  {'SM lock':>7} {'decided':>7} {'in force':>8} {'supported':>11}  clock control"]
    for g in s.gpus:
        lock = str(g.locked_clock_requested_mhz) if g.HasField("locked_clock_requested_mhz") else "none"
        decided = str(g.locked_clock_decided_mhz) if g.HasField("locked_clock_decided_mhz") else "none"
        supported = f"{g.min_clock_mhz}-{g.max_clock_mhz}" if g.max_clock_mhz else "-"
        control = "yes" if g.clock_control else f"no: {g.clock_control_note or 'GPU not controlled'}"
        lines.append(f"{g.index:>3}  {lock:>7} {decided:>7} {g.sm_clock_mhz:>8} {supported:>11}  {control}")
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
                + ("" if e.has_profile or not e.connected else f"  {NO_PROFILE_NOTE}")
            )
    else:
        lines += ["", "no engines connected"]
    return "\n".join(lines)


def _timestamp(s: pals_pb2.NodeStatus) -> str:
    """The snapshot's time, local with its offset, to the millisecond."""
    when = s.timestamp_unix_s or time.time()
    return datetime.datetime.fromtimestamp(when).astimezone().isoformat(timespec="milliseconds")


def _watch_line(s: pals_pb2.NodeStatus) -> str:
    b = s.budget
    budget = _watts(b.effective_budget_w) if b.HasField("effective_budget_w") else "none"
    caps = " ".join(f"{g.enforced_limit_w:.0f}" for g in s.gpus)
    seqs = " ".join(f"{e.engine_id}={e.max_num_seqs_limit}" for e in s.engines if e.connected)
    return (
        f"{_timestamp(s)}  tick {s.controller.ticks}  power {_watts(b.node_power_w)}  budget {budget}  "
        f"caps [{caps}] W  seqs {seqs}"
    )


def format_job(job: pals_pb2.ProfileJob) -> str:
    """One line on a profile job."""
    state = _JOB_STATES.get(job.state, "unknown")
    if job.state == pals_pb2.PROFILE_STATE_RUNNING:
        where = ""
        if job.HasField("current"):
            lock = f", {job.current.clock_mhz} MHz" if job.current.HasField("clock_mhz") else ""
            where = f" ({job.current.cap_w:g} W, batch {job.current.batch}{lock}, {job.phase})"
        return (
            f"{job.engine_id}: running, point {job.points_done + 1}/{job.points_total}{where}, "
            f"elapsed {job.elapsed_s:.0f} s, ~{job.estimated_remaining_s:.0f} s left"
        )
    line = f"{job.engine_id}: {state} {job.points_done}/{job.points_total} points"
    if job.state == pals_pb2.PROFILE_STATE_DONE:
        line += f" -> {job.output_path}"
    if job.error:
        line += f": {job.error}"
    return line


def format_job_points(job: pals_pb2.ProfileJob) -> str:
    """The measured points as a table."""
    lines = [f"{'cap W':>7} {'batch':>5} {'clock':>8} {'tokens/s':>9} {'W/GPU':>7}"]
    for p in job.points:
        clock = f"{p.clock_mhz} MHz" if p.HasField("clock_mhz") else "unlocked"
        lines.append(f"{p.cap_w:>7g} {p.batch:>5} {clock:>8} {p.tokens_per_s:>9.1f} {p.gpu_power_w:>7.1f}")
    return "\n".join(lines)


def _run_profile(stub: pals_pb2_grpc.PowerAdminStub, args: argparse.Namespace) -> int:
    if args.status or args.cancel:
        if args.status:
            job = stub.GetProfile(pals_pb2.GetProfileRequest(engine_id=args.engine), timeout=RPC_TIMEOUT_S)
        else:
            job = stub.CancelProfile(pals_pb2.CancelProfileRequest(engine_id=args.engine), timeout=RPC_TIMEOUT_S)
        print(format_job(job))
        if job.points:
            print(format_job_points(job))
        for warning in job.warnings:
            print(f"warning: {warning}")
        return 0
    missing = [f"--{n}" for n in ("caps", "batches", "hold") if getattr(args, n) is None]
    if missing:
        raise UsageError(f"profile: {', '.join(missing)} required to start a sweep (or --status / --cancel)")
    request = pals_pb2.StartProfileRequest(
        engine_id=args.engine,
        caps_w=args.caps,
        batches=args.batches,
        hold_s=args.hold,
        output_path=os.path.abspath(args.output) if args.output else "",
        parallelism=args.parallelism or "",
        clocks_mhz=args.clocks or [],
    )
    if args.settle is not None:
        request.settle_s = args.settle
    job = stub.StartProfile(request, timeout=RPC_TIMEOUT_S)
    print(
        f"{job.engine_id}: started, {job.points_total} points, ~{job.estimated_remaining_s:.0f} s "
        f"(plus draining); output {job.output_path}",
        flush=True,
    )
    if not args.wait:
        return 0
    last = ""
    try:
        while job.state == pals_pb2.PROFILE_STATE_RUNNING:
            line = format_job(job)
            key = line.split(", elapsed")[0]
            if key != last:
                print(line, flush=True)
                last = key
            time.sleep(max(args.poll, 0.01))
            job = stub.GetProfile(pals_pb2.GetProfileRequest(engine_id=args.engine), timeout=RPC_TIMEOUT_S)
    except KeyboardInterrupt:
        print(f"\nthe job goes on; 'palsctl profile {args.engine} --cancel' stops it", file=sys.stderr)
        raise
    if job.points:
        print(format_job_points(job))
    for warning in job.warnings:
        print(f"warning: {warning}")
    if job.state != pals_pb2.PROFILE_STATE_DONE:
        raise CliError(format_job(job))
    print(f"profile written to {job.output_path}")
    return 0


BUDGET_CLEAR_WORDS = ("clear", "none")
# What a shell reports for a process killed by SIGPIPE (128 + 13): `palsctl watch | head` ends like `yes | head`.
EXIT_BROKEN_PIPE = 141


def _parse_budget(text: str) -> float | None:
    if text.lower() in BUDGET_CLEAR_WORDS:
        return None
    try:
        value = float(text)
    except ValueError:
        raise CliError(f"budget {text!r} is not a number of watts (or 'clear')") from None
    return value  # NaN/Inf/negatives go to the daemon, which refuses them with its own message


def _targets_text(t: pals_pb2.EngineTargets) -> str:
    parts = [f"{name}={getattr(t, name):g}" for name in TARGET_FIELDS if t.HasField(name)]
    return " ".join(parts) or "no targets"


def _target_get(stub: pals_pb2_grpc.PowerAdminStub, args: argparse.Namespace) -> None:
    status = stub.GetStatus(pals_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_S)
    engines = [e for e in status.engines if args.engine in (None, e.engine_id)]
    if args.engine is not None and not engines:
        raise CliError(f"engine {args.engine!r} is not connected and has no targets")
    if args.json:
        print(json.dumps({e.engine_id: json_format.MessageToDict(e.targets) for e in engines}, indent=2))
        return
    for e in engines:
        state = "connected" if e.connected else "not connected"
        print(f"{e.engine_id}  {_targets_text(e.targets)}  ({state})")


def _target_set(stub: pals_pb2_grpc.PowerAdminStub, args: argparse.Namespace) -> None:
    given = {name: getattr(args, name) for name in TARGET_FIELDS if getattr(args, name) is not None}
    if not given and not args.clear:
        raise UsageError(
            f"target set {args.engine}: give --tokens-per-s, --ttft-ms and/or --tpot-ms, "
            "or --clear to remove every target"
        )
    if given and args.clear:
        raise UsageError("target set: --clear removes every target; give it without target values")
    targets = pals_pb2.EngineTargets(**given)
    engine, call = stub.SetEngineTargets.with_call(
        pals_pb2.SetEngineTargetsRequest(engine_id=args.engine, targets=targets), timeout=RPC_TIMEOUT_S
    )
    print(json_format.MessageToJson(engine.targets, preserving_proto_field_name=True, indent=None))
    for key, value in call.trailing_metadata() or ():
        if key == WARNING_METADATA_KEY:
            print(f"palsctl: warning: {value}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Execute one parsed command."""
    if args.command == "cluster":
        try:
            return palsctl_cluster.run(args)
        except palsctl_cluster.ClusterCliError as exc:
            raise CliError(str(exc)) from exc
    stub = _stub(args.socket)
    if args.command == "status":
        status = stub.GetStatus(pals_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_S)
        print(_to_json(status) if args.json else format_status(status))
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
        if args.target_command == "get":
            _target_get(stub, args)
        else:
            _target_set(stub, args)
    elif args.command == "watch":
        stream = stub.WatchStatus(pals_pb2.WatchStatusRequest(interval_s=args.interval))
        for n, status in enumerate(stream, start=1):
            line = json.dumps({"time": _timestamp(status), **message_to_dict(status)}) if args.json else None
            print(line or _watch_line(status), flush=True)
            if args.count and n >= args.count:
                stream.cancel()
                break
    elif args.command == "profile":
        return _run_profile(stub, args)
    return 0


def _rpc_error_text(exc: grpc.RpcError, socket_path: str) -> str:
    code = exc.code()
    if code == grpc.StatusCode.UNIMPLEMENTED:
        # The engine socket answers PowerAdmin calls with "Method not found!".
        return (
            f"{socket_path} does not serve PowerAdmin: is it the engine socket? palsctl needs the admin socket "
            f"({DEFAULT_ADMIN_SOCKET} by default)"
        )
    return f"{code.name if code else 'ERROR'}: {exc.details()}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``palsctl``."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"palsctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"palsctl: {exc}", file=sys.stderr)
    except grpc.RpcError as exc:
        print(f"palsctl: {_rpc_error_text(exc, args.socket)}", file=sys.stderr)
    except BrokenPipeError:
        # The reader went away (`palsctl watch | head -2`): stop quietly. stdout is pointed at /dev/null so that
        # the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
