"""``pals-daemon``: run the daemon, or ``pals-daemon restore`` to put GPU limits back after an exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import uvloop

from pals_daemon.clock import Clock, MonotonicClock, ScaledClock
from pals_daemon.config import DaemonConfig, add_config_flags, describe, load_config
from pals_daemon.errors import ConfigError, PalsError
from pals_daemon.gpu.backend import GpuBackend
from pals_daemon.model.profile import load_profile_tree
from pals_daemon.restore import restore_originals
from pals_daemon.server.daemon import default_profiles_dir
from pals_daemon.server.runner import Runner
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
    clock = make_clock(cfg)
    runner = Runner(cfg, make_backend(cfg, clock), load_profile_tree(profiles_dir(cfg)), clock)
    await runner.start()
    if cfg.cluster_endpoints:
        from pals_daemon.cluster.agent import start_agent  # optional extra: pals-daemon[cluster]

        start_agent(cfg, runner)
    await runner.run()


def _config_from(argv: Sequence[str], prog: str, description: str) -> tuple[argparse.Namespace, DaemonConfig]:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--print-config", action="store_true", help="print the effective settings and exit")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    return args, load_config(vars(args), config_path=args.config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pals-daemon``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "restore" if argv[:1] == ["restore"] else "run"
    if command == "restore":
        argv = argv[1:]
    try:
        args, cfg = _config_from(argv, f"pals-daemon {command}".strip(), __doc__)
    except ConfigError as exc:
        print(f"pals-daemon: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(describe(cfg), indent=2))
        return 0
    setup_logging(cfg.log_level)
    try:
        if command == "restore":
            return restore(cfg)
        uvloop.run(serve(cfg))
    except (PalsError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0


def restore(cfg: DaemonConfig) -> int:
    """Restore every recorded GPU limit; exit status 1 when a record had to be kept."""
    if cfg.backend == "sim":
        log.info("sim backend: simulated GPUs do not outlive the daemon; nothing to restore")
        return 0
    problems = restore_originals(
        make_backend(cfg, MonotonicClock()), StateStore(cfg.state_dir), cluster_mode=bool(cfg.cluster_endpoints)
    )
    for p in problems:
        log.error("%s", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
