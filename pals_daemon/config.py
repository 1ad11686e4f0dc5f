"""Daemon configuration: defaults, then the TOML file, then PALS_* environment variables, then flags.

Every layer is validated together and every problem is reported at once (ConfigError.problems).
A key ``name`` is ``name`` in the file's top level (``[sim] gpu_kind`` for ``sim_gpu_kind``),
``PALS_NAME`` in the environment and ``--name-with-dashes`` on the command line. The ``[controller]`` table
(:mod:`pals_daemon.config_controller`) sets the controller's tuning the same way (``controller_hysteresis``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pals_daemon import config_controller
from pals_daemon.control.config import ControllerConfig
from pals_daemon.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = pathlib.Path("/etc/pals/pals.toml")
ENV_PREFIX = "PALS_"
BACKENDS = ("nvml", "sim")
MODES = ("enforce", "advise")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Tables in the TOML file whose keys are flattened as "<table>_<key>".
TABLES = ("sim", config_controller.TABLE)


@dataclass(frozen=True)
class DaemonConfig:
    """Validated daemon settings (units in the names)."""

    backend: str = "nvml"
    mode: str = "enforce"
    period_s: float = 0.5
    runtime_dir: str = "/run/pals"
    # Empty: "<runtime_dir>/admin/admin.sock" and "<runtime_dir>/engine.sock" (each directory's mode is part of
    # its socket's access policy: admin/ 0700 root, <runtime_dir> 0750 root:<engine group>).
    admin_socket: str = ""
    engine_socket: str = ""
    # Group allowed to connect engines (the engine socket is 0660 root:<group>); "" keeps root's group.
    engine_socket_group: str = "pals"
    state_dir: str = "/var/lib/pals"
    # Empty: the profiles shipped with the package.
    profiles_dir: str = ""
    metrics_address: str = "127.0.0.1"
    # 0 disables the metrics endpoint.
    metrics_port: int = 9400
    # An engine falls back to its own limits this long after the last directive.
    directive_ttl_s: float = 5.0
    # QoS (PALS: fraction of windows below the throughput target) is judged over windows this long: a
    # 0.5 s tick holds only 2-3 decode steps of Mixtral-8x7B at batch 64 (208 ms each: 64 / 308 tokens/s at
    # 200 W, data/a100_moe_tp4_power_cap_sweep.csv), so a per-tick rate would measure step phase, not service.
    qos_window_s: float = 5.0
    # Initial node GPU budget when none is persisted; None: no budget.
    budget_w: float | None = None
    # GPU indices to control; empty: all.
    gpus: tuple[int, ...] = ()
    # An NVML call slower than this marks its GPU wedged, then failed (no longer controlled); it also bounds
    # how long one hung GPU can hold up a tick. Chosen value: healthy calls take milliseconds, and 3 such
    # waits in one tick (read, decrease, increase) stay far under the unit's WatchdogSec=10s.
    gpu_timeout_s: float = 1.0
    log_level: str = "info"
    sim_gpu_kind: str = "A100-SXM4"
    sim_gpu_count: int = 4
    # Simulated seconds per wall-clock second.
    sim_speed: float = 1.0
    # The [controller] table; its period_s is replaced by this config's (see controller_config()).
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    config_file: str = field(default="", compare=False)

    @property
    def admin_socket_path(self) -> pathlib.Path:
        """Where the PowerAdmin socket lives."""
        return pathlib.Path(self.admin_socket or os.path.join(self.runtime_dir, "admin", "admin.sock"))

    @property
    def engine_socket_path(self) -> pathlib.Path:
        """Where the EngineLink socket lives."""
        return pathlib.Path(self.engine_socket or os.path.join(self.runtime_dir, "engine.sock"))

    def controller_config(self) -> ControllerConfig:
        """The controller's settings, at the period the daemon ticks at."""
        return dataclasses.replace(self.controller, period_s=self.period_s)


FIELDS: dict[str, dataclasses.Field[Any]] = {
    f.name: f for f in dataclasses.fields(DaemonConfig) if f.name not in ("config_file", "controller")
}
# Every key of every layer: the daemon's own, then the [controller] table's (controller_<field>).
KEYS: tuple[str, ...] = (*FIELDS, *config_controller.controller_keys())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(name: str, raw: Any, from_text: bool) -> Any:
    """Convert one raw value (TOML value, or text from env/flags) to the field's type."""
    if name not in FIELDS:
        return config_controller.coerce(name, raw, from_text)
    kind = FIELDS[name].type
    if name == "budget_w":
        if from_text and str(raw).strip().lower() in ("", "none", "unlimited"):
            return None
        return _as_float(raw, from_text)
    if name == "gpus":
        if from_text:
            text = str(raw).strip()
            return tuple(int(p) for p in text.split(",") if p.strip()) if text else ()
        if not isinstance(raw, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw):
            raise ValueError("must be a list of GPU indices")
        return tuple(raw)
    if kind == "float":
        return _as_float(raw, from_text)
    if kind == "int":
        if from_text:
            return int(str(raw).strip())
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise ValueError("must be an integer")
        return raw
    if not isinstance(raw, str):
        raise ValueError("must be a string")
    return raw


def _as_float(raw: Any, from_text: bool) -> float:
    if from_text:
        return float(str(raw).strip())
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ValueError("must be a number")
    return float(raw)


def _flatten_toml(doc: Mapping[str, Any], problems: list[str], where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if key in TABLES and isinstance(value, dict):
            for sub, sub_value in value.items():
                flat[f"{key}_{sub}"] = sub_value
        else:
            flat[key] = value
    for key in list(flat):
        if key in config_controller.EXCLUDED_KEYS:
            problems.append(f"{where}: {key!r} is not an operator setting: {config_controller.EXCLUDED_KEYS[key]}")
            del flat[key]
        elif key not in KEYS:
            problems.append(f"{where}: unknown key {key!r}")
            del flat[key]
    return flat


def _apply(values: dict[str, Any], raw: Mapping[str, Any], from_text: bool, where: str, problems: list[str]) -> None:
    for name, value in raw.items():
        try:
            values[name] = _coerce(name, value, from_text)
        except (TypeError, ValueError) as exc:
            problems.append(f"{where} {name}: {value!r} {exc}" if str(exc) else f"{where} {name}: bad value {value!r}")


def _validate(cfg: DaemonConfig) -> list[str]:
    problems = []
    if cfg.backend not in BACKENDS:
        problems.append(f"backend: {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    if cfg.mode not in MODES:
        problems.append(f"mode: {cfg.mode!r} is not one of {', '.join(MODES)}")
    if cfg.log_level not in LOG_LEVELS:
        problems.append(f"log_level: {cfg.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    for name in ("period_s", "directive_ttl_s", "qos_window_s", "sim_speed", "gpu_timeout_s"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value <= 0:
            problems.append(f"{name}: must be a finite number > 0, got {value!r}")
    if math.isfinite(cfg.period_s) and math.isfinite(cfg.directive_ttl_s) and cfg.directive_ttl_s < 2 * cfg.period_s:
        problems.append("directive_ttl_s: must be at least two control periods, or directives expire between ticks")
    if cfg.budget_w is not None and (not math.isfinite(cfg.budget_w) or cfg.budget_w <= 0):
        problems.append(f"budget_w: must be a finite number of watts > 0, got {cfg.budget_w!r}")
    if not 0 <= cfg.metrics_port <= 65535:
        problems.append(f"metrics_port: {cfg.metrics_port} is not a TCP port (0 disables)")
    if not 1 <= cfg.sim_gpu_count <= 64:
        problems.append(f"sim_gpu_count: must be 1..64, got {cfg.sim_gpu_count}")
    if any(i < 0 for i in cfg.gpus) or len(set(cfg.gpus)) != len(cfg.gpus):
        problems.append(f"gpus: indices must be distinct and >= 0, got {list(cfg.gpus)}")
    if cfg.engine_socket_group and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}\$?", cfg.engine_socket_group):
        problems.append(f"engine_socket_group: {cfg.engine_socket_group!r} is not a group name")
    for name in ("runtime_dir", "state_dir"):
        if not os.path.isabs(getattr(cfg, name)):
            problems.append(f"{name}: must be an absolute path, got {getattr(cfg, name)!r}")
    for name in ("admin_socket", "engine_socket"):
        if getattr(cfg, name) and not os.path.isabs(getattr(cfg, name)):
            problems.append(f"{name}: must be an absolute path, got {getattr(cfg, name)!r}")
    if cfg.admin_socket_path == cfg.engine_socket_path:
        problems.append("admin_socket and engine_socket must differ: their modes authorize different clients")
    elif cfg.admin_socket_path.parent == cfg.engine_socket_path.parent:
        problems.append(
            "admin_socket and engine_socket must be in different directories: each directory's mode is "
            "part of its socket's access policy (admin 0700 root, engine 0750 root:<group>)"
        )
    return problems


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add --config and one flag per setting (default None: "not given on the command line")."""
    parser.add_argument("--config", help=f"TOML config file (default {DEFAULT_CONFIG_PATH}; env PALS_CONFIG)")
    for name in KEYS:
        # No argparse choices: it would stop at the first bad value, load_config reports every problem at once.
        choices = {"backend": BACKENDS, "mode": MODES, "log_level": LOG_LEVELS}.get(name)
        metavar = "{" + ",".join(choices) + "}" if choices else None
        parser.add_argument(
            _flag(name), dest=name, default=None, metavar=metavar, help=f"(env {ENV_PREFIX}{name.upper()})"
        )


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> DaemonConfig:
    """Build the configuration from defaults, file, environment and flags; raise ConfigError with every problem."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None and k in KEYS}
    problems: list[str] = []
    values: dict[str, Any] = {}

    explicit = config_path or env.get(ENV_PREFIX + "CONFIG")
    path = pathlib.Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    if path.exists():
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"{path}: {exc}")
        else:
            _apply(values, _flatten_toml(doc, problems, str(path)), False, f"{path}:", problems)
    elif explicit:
        problems.append(f"config file {path} does not exist")

    env_values = {n: env[ENV_PREFIX + n.upper()] for n in KEYS if ENV_PREFIX + n.upper() in env}
    _apply(values, env_values, True, "environment", problems)
    _apply(values, flags, True, "flag", problems)

    own = {k: v for k, v in values.items() if k in FIELDS}
    period_s = own.get("period_s", DaemonConfig.period_s)
    controller, controller_problems = config_controller.build(
        {k: v for k, v in values.items() if k not in FIELDS}, period_s
    )
    cfg = DaemonConfig(**own, controller=controller, config_file=str(path) if path.exists() else "")
    problems.extend(_validate(cfg))
    problems.extend(controller_problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def describe(cfg: DaemonConfig) -> dict[str, Any]:
    """The effective settings as plain data (for logs and ``pals-daemon --print-config``)."""
    out = {name: getattr(cfg, name) for name in FIELDS}
    out["gpus"] = list(cfg.gpus)
    out.update(config_controller.describe(cfg.controller_config()))
    return out
