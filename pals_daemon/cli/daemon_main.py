"""``pals-daemon``: run the daemon, or ``pals-daemon restore`` to put GPU limits back after an exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import uvloop

from pals_daemon import __version__
from pals_daemon.clock import Clock, MonotonicClock, ScaledClock
from pals_daemon.config import (
    RESTORE_KEYS,
    DaemonConfig,
    add_config_flags,
    describe,
    load_config,
    load_restore_config,
)
from pals_daemon.errors import ConfigError, GpuLibraryError, PalsError
from pals_daemon.gpu.backend import GpuBackend
from pals_daemon.model.profile import load_profile_tree
from pals_daemon.restore import restore_originals
from pals_daemon.server.daemon import default_profiles_dir
from pals_daemon.server.logsafety import EscapingFormatter, filter_native_stderr
from pals_daemon.server.runner import Runner
from pals_daemon.server.signals import ignore_early
from pals_daemon.state import StateStore

log = logging.getLogger("pals_daemon")


def setup_logging(level: str) -> None:
    """Plain lines under journald (it adds its own timestamps), timestamped otherwise."""
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(EscapingFormatter(fmt))  # client text never starts a log line of its own


def make_clock(cfg: DaemonConfig) -> Clock:
    """Wall clock for real GPUs; the scaled clock for the simulated node."""
    return ScaledClock(cfg.sim_speed) if cfg.backend == "sim" else MonotonicClock()


def make_backend(cfg: DaemonConfig, clock: Clock) -> GpuBackend:
    """The configured GPU backend (imported lazily: the nvml module needs nothing at import, sim needs data)."""
    if cfg.backend == "nvml":
        from pals_daemon.gpu.nvml import NvmlBackend

        return NvmlBackend()
    from pals_daemon.sim.gpu import SimBackend, make_sim_gpus

    return SimBackend(make_sim_gpus(cfg.sim_gpu_kind, cfg.sim_gpu_count, clock.now))


def profiles_dir(cfg: DaemonConfig) -> str:
    """The configured profiles directory, or the packaged one."""
    return cfg.profiles_dir or str(default_profiles_dir())


async def serve(cfg: DaemonConfig) -> None:
    """Run the daemon until SIGTERM/SIGINT."""
    ignore_early()  # HUP/USR1/USR2 until the runner takes them over (their default would kill the daemon)
    clock = make_clock(cfg)
    backend = make_backend(cfg, clock)
    directory = profiles_dir(cfg)
    profiles = load_profile_tree(directory)
    log.info("%d profile(s) from %s", len(profiles.profiles), directory)
    runner = Runner(cfg, backend, profiles, clock)
    await runner.start()
    await runner.run()


USAGE = "pals-daemon [restore] [options]"
DESCRIPTION = "\n".join(
    (
        "Run the pals-daemon (the default command), or `pals-daemon restore`: put every GPU back to the power limit",
        "recorded in <state_dir>/state.json (systemd's ExecStopPost; it reads only backend, state_dir and log_level",
        "from the configuration, so an unrelated mistake there cannot stop the GPUs being restored).",
        "Settings: defaults, then the TOML file, then PALS_<KEY> variables, then these flags.",
    )
)


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of ``pals-daemon`` (``command`` "run") or ``pals-daemon restore``."""
    parser = argparse.ArgumentParser(
        prog="pals-daemon" if command == "run" else "pals-daemon restore",
        usage=USAGE,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pals-daemon {__version__}")
    parser.add_argument("--print-config", action="store_true", help="print the effective settings and exit")
    add_config_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pals-daemon``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "restore" if argv[:1] == ["restore"] else "run"
    if command == "restore":
        argv = argv[1:]
    args = build_parser(command).parse_args(argv)
    if command == "restore":
        cfg, problems = load_restore_config(vars(args), config_path=args.config)
        if args.print_config:
            print(json.dumps({k: describe(cfg)[k] for k in RESTORE_KEYS}, indent=2))
            return 0
        setup_logging(cfg.log_level)
        for problem in problems:
            log.warning("configuration: %s (ignored by restore)", problem)
        try:
            return restore(cfg)
        except (PalsError, OSError) as exc:
            log.error("%s", _with_hint(cfg, exc))
            return 1
    try:
        cfg = load_config(vars(args), config_path=args.config)
    except ConfigError as exc:
        print(f"pals-daemon: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(describe(cfg), indent=2))
        return 0
    if command == "run":
        filter_native_stderr()  # gRPC core's own log lines quote clients: escape them too
    setup_logging(cfg.log_level)
    try:
        uvloop.run(serve(cfg))
    except (PalsError, OSError) as exc:
        log.error("%s", _with_hint(cfg, exc))
        return 1
    return 0


def _with_hint(cfg: DaemonConfig, exc: BaseException) -> str:
    """The error, with what to try when the NVIDIA library is missing (a machine without the driver)."""
    if cfg.backend == "nvml" and isinstance(exc, GpuLibraryError):
        return f"{exc} (no NVIDIA driver on this machine? `--backend sim` runs the daemon on simulated GPUs)"
    return str(exc)


def restore(cfg: DaemonConfig) -> int:
    """Restore every recorded GPU limit; exit status 1 when a record had to be kept."""
    if cfg.backend == "sim":
        log.info("sim backend: simulated GPUs do not outlive the daemon; nothing to restore")
        return 0
    problems = restore_originals(make_backend(cfg, MonotonicClock()), StateStore(cfg.state_dir))
    for p in problems:
        log.error("%s", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
