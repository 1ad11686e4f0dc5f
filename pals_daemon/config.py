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
from pals_daemon.sim.hardware import hardware_profile, known_hardware

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
TABLES = ("sim", "clocks", config_controller.TABLE)
# Spellings of a boolean in the environment or on the command line (TOML has its own true/false).
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
DEFAULT_METRICS_PORT = 10400
# What `pals-daemon restore` reads: it must restore the GPUs whatever else the file gets wrong.
RESTORE_KEYS = ("backend", "state_dir", "log_level")

# One line per key for --help (deploy/systemd/pals.toml.example says more).
HELP = {
    "backend": "GPU backend: nvml (real GPUs, root) or sim (simulated GPUs, no driver needed)",
    "mode": "enforce: apply caps and batch limits; advise: compute and export them, change nothing",
    "period_s": "control period, s",
    "runtime_dir": "directory of the sockets",
    "admin_socket": "PowerAdmin socket ('' = <runtime_dir>/admin/admin.sock)",
    "engine_socket": "EngineLink socket ('' = <runtime_dir>/engine.sock)",
    "engine_socket_group": "group allowed to connect engines ('' = root's group)",
    "state_dir": "persistent state: original limits, budget, targets",
    "profiles_dir": "directory of model profiles ('' = the profiles shipped with the package)",
    "metrics_address": "Prometheus /metrics listen address",
    "metrics_port": "Prometheus /metrics port (0 disables)",
    "directive_ttl_s": "seconds an engine keeps a batch-limit directive (>= 2 periods)",
    "qos_window_s": "length of the QoS windows, s",
    "budget_w": "initial node GPU budget, W, when none is persisted ('none': no budget)",
    "gpus": "comma-separated GPU indices to control ('' = all)",
    "gpu_timeout_s": "an NVML call slower than this marks its GPU wedged, s",
    "log_level": "log level",
    "sim_gpu_kind": "simulated GPU model (sim backend)",
    "sim_gpu_count": "number of simulated GPUs (sim backend)",
    "sim_speed": "simulated seconds per wall-clock second (sim backend)",
}


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
    # 0 disables the metrics endpoint. Not 9400 (dcgm-exporter's default, on the same GPU nodes) nor any port of
    # 9100-9999 (the Prometheus exporter range, fully allocated): 10400 (README "Metrics").
    metrics_port: int = DEFAULT_METRICS_PORT
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
    # [clocks] enabled: the operator's switch for the locked-SM-clock knob. On by default: on Hopper the power
    # cap rarely binds at light and medium load, so without the clock the daemon saves close to nothing there;
    # every lock is recorded and reset on every exit path like a power limit, a GPU without the feature falls
    # back to cap-only control, and an operator's own clock setting is left alone. false: the daemon never
    # locks a clock (it still resets clocks a crashed run left locked).
    clocks_enabled: bool = True
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
    if kind == "bool":
        if from_text:
            text = str(raw).strip().lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise ValueError(f"must be one of {', '.join(_TRUE + _FALSE)}")
        if not isinstance(raw, bool):
            raise ValueError("must be true or false")
        return raw
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
    if 0 < cfg.period_s < math.inf and 0 < cfg.directive_ttl_s < 2 * cfg.period_s:
        problems.append(
            f"directive_ttl_s: {cfg.directive_ttl_s:g} s is less than two control periods "
            f"(2 x period_s {cfg.period_s:g} s = {2 * cfg.period_s:g} s): directives would expire between ticks"
        )
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
    if cfg.profiles_dir and not os.path.isdir(cfg.profiles_dir):
        problems.append(f"profiles_dir: {cfg.profiles_dir!r} is not a directory")
    try:
        hardware_profile(cfg.sim_gpu_kind)
    except ValueError:
        problems.append(f"sim_gpu_kind: {cfg.sim_gpu_kind!r} is not one of {', '.join(known_hardware())}")
    if cfg.admin_socket_path == cfg.engine_socket_path:
        problems.append("admin_socket and engine_socket must differ: their modes authorize different clients")
    elif cfg.admin_socket_path.parent == cfg.engine_socket_path.parent:
        problems.append(
            "admin_socket and engine_socket must be in different directories: each directory's mode is "
            "part of its socket's access policy (admin 0700 root, engine 0750 root:<group>)"
        )
    return problems


def _default_text(name: str) -> str:
    if name not in FIELDS:
        value = config_controller.controller_keys()[name].default
        return "none" if value is None else str(value)
    value = FIELDS[name].default
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "''"
    return repr(value) if value == "" else str(value)


def _help(name: str) -> str:
    if name in HELP:
        return HELP[name]
    key = config_controller.controller_keys().get(name)
    text = key.description.split(". ")[0] if key is not None and key.description else name
    return text.replace("%", "%%")  # argparse formats help with %


def add_config_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Add --config and one flag per setting (default None: "not given on the command line")."""
    parser.add_argument("--config", help=f"TOML config file (default {DEFAULT_CONFIG_PATH}; env PALS_CONFIG)")
    for name in names or KEYS:
        # No argparse choices: it would stop at the first bad value, load_config reports every problem at once.
        choices = {"backend": BACKENDS, "mode": MODES, "log_level": LOG_LEVELS}.get(name)
        metavar = "{" + ",".join(choices) + "}" if choices else name.rsplit("_", 1)[-1].upper()
        parser.add_argument(
            _flag(name),
            dest=name,
            default=None,
            metavar=metavar,
            help=f"{_help(name)} (default {_default_text(name)}; env {ENV_PREFIX}{name.upper()})",
        )


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> DaemonConfig:
    """Build the configuration from defaults, file, environment and flags; raise ConfigError with every problem."""
    problems: list[str] = []
    values, path = _read_layers(flags, env, config_path, problems)
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


def load_restore_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> tuple[DaemonConfig, list[str]]:
    """The settings ``pals-daemon restore`` needs (RESTORE_KEYS), and every problem found in the layers.

    Never raises: a restore after a crash must put the GPUs back even when an unrelated key is wrong (it is
    reported, not fatal). A needed key that is wrong falls back to its default, and is reported too.
    """
    problems: list[str] = []
    values, path = _read_layers(flags, env, config_path, problems)
    kept = {k: v for k, v in values.items() if k in RESTORE_KEYS}
    for problem in _validate(DaemonConfig(**{k: v for k, v in values.items() if k in FIELDS})):
        name = problem.split(":", 1)[0]
        if name in RESTORE_KEYS:
            problems.append(f"{problem}; using the default {_default_text(name)}")
            kept.pop(name, None)
        else:
            problems.append(problem)
    return DaemonConfig(**kept, config_file=str(path) if path.exists() else ""), problems


def _read_layers(
    flags: Mapping[str, Any] | None,
    env: Mapping[str, str] | None,
    config_path: str | None,
    problems: list[str],
) -> tuple[dict[str, Any], pathlib.Path]:
    """Coerced values of file, environment and flags (later layers win); problems appended, never raised."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None and k in KEYS}
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
    return values, path


def describe(cfg: DaemonConfig) -> dict[str, Any]:
    """The effective settings as plain data (for logs and ``pals-daemon --print-config``)."""
    out = {name: getattr(cfg, name) for name in FIELDS}
    out["gpus"] = list(cfg.gpus)
    out.update(config_controller.describe(cfg.controller_config()))
    return out
