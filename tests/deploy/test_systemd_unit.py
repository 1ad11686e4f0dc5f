"""The systemd unit verifies cleanly, stays hardened, and the example config matches the daemon's keys."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from pals_daemon.config_controller import controller_keys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNIT = DEPLOY / "pals-daemon.service"
EXAMPLE = DEPLOY / "pals.toml.example"
MAX_EXPOSURE = 3.0

TOP_LEVEL_KEYS = {
    "backend",
    "mode",
    "period_s",
    "runtime_dir",
    "admin_socket",
    "engine_socket",
    "engine_socket_group",
    "state_dir",
    "profiles_dir",
    "metrics_address",
    "metrics_port",
    "directive_ttl_s",
    "qos_window_s",
    "budget_w",
    "gpus",
    "gpu_timeout_s",
    "log_level",
}
SIM_KEYS = {"gpu_kind", "gpu_count", "speed"}
CLOCKS_KEYS = {"enabled"}
# [controller]: every operator setting of ControllerConfig (pals_daemon/config_controller.py generates the section).
CONTROLLER_KEYS = {spec.field for spec in controller_keys().values()}
CONTROLLER_UNSET = {spec.field for spec in controller_keys().values() if spec.default is None}
# TOML has no null: keys whose default is "unset" appear only as a commented-out line.
UNSET_BY_DEFAULT = {"budget_w"}

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file into section -> key -> values (a repeated key such as DeviceAllow= keeps all)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        assert not line.endswith("\\"), "line continuations are not expected in this unit"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


@pytest.fixture
def runnable_unit(tmp_path) -> pathlib.Path:
    """A copy of the unit whose commands run an existing executable (pals-daemon is not installed here)."""
    exe = shutil.which("true") or sys.executable
    text = UNIT.read_text().replace("/usr/bin/pals-daemon", exe)
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    # SYSTEMD_LOG_LEVEL=notice keeps debug chatter out while still showing every warning.
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "notice", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, env=env, check=False)


@needs_systemd_analyze
def test_systemd_analyze_verify_clean(runnable_unit: pathlib.Path) -> None:
    result = _analyze("verify", str(runnable_unit))
    # verify exits 0 even for unknown keys or unparsable values: the warnings on stderr are what matter.
    about_unit = [line for line in (result.stderr + result.stdout).splitlines() if runnable_unit.name in line]
    assert result.returncode == 0, result.stderr
    assert not about_unit, "\n".join(about_unit)


@needs_systemd_analyze
def test_verify_catches_a_bad_directive(tmp_path, runnable_unit: pathlib.Path) -> None:
    # Guards the test above: a typo must show up on stderr under the unit's name.
    bad = tmp_path / "bad" / UNIT.name
    bad.parent.mkdir()
    bad.write_text(runnable_unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=strcit"))
    result = _analyze("verify", str(bad))
    assert any(UNIT.name in line and "strcit" in line for line in result.stderr.splitlines()), result.stderr


@needs_systemd_analyze
def test_security_exposure(runnable_unit: pathlib.Path) -> None:
    result = _analyze("security", "--offline=yes", "--no-pager", str(runnable_unit))
    if "--offline" in result.stderr and ("unrecognized" in result.stderr or "unknown" in result.stderr):
        pytest.skip("systemd-analyze is older than 250 (no --offline)")
    match = re.search(r"Overall exposure level for \S+:\s*([0-9.]+)", result.stdout)
    assert match, f"no exposure level in output:\n{result.stdout}\n{result.stderr}"
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_required_directives(unit) -> None:
    svc = unit["Service"]

    def one(key: str) -> str:
        assert key in svc, f"missing {key}="
        assert len(svc[key]) == 1, f"{key}= given {len(svc[key])} times"
        return svc[key][0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecStart").split()[0].endswith("/pals-daemon")
    stop_post = one("ExecStopPost").split()
    assert stop_post[0].endswith("/pals-daemon") and "restore" in stop_post
    assert one("WatchdogSec") == "10s"
    assert one("Restart") == "on-failure"
    assert one("UMask") == "0077"
    assert one("DevicePolicy") == "closed"
    assert "PrivateDevices" not in svc, "PrivateDevices= hides /dev/nvidia*"
    assert one("CapabilityBoundingSet").split() == ["CAP_SYS_ADMIN", "CAP_CHOWN"]
    assert one("AmbientCapabilities") == ""
    device_allow = {v.split()[0]: v.split()[1] for v in svc["DeviceAllow"]}
    assert device_allow == {"/dev/nvidiactl": "rw", "char-nvidia-frontend": "rw"}
    assert one("RuntimeDirectory") == "pals"
    assert one("RuntimeDirectoryPreserve") == "restart"
    assert one("StateDirectory") == "pals"
    assert one("StateDirectoryMode") == "0700"
    assert one("ConfigurationDirectory") == "pals"
    assert one("ProtectSystem") == "strict"
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert one("SystemCallFilter") == "@system-service"
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
    ):
        assert one(key) == "yes", key
    assert "nvidia-persistenced.service" in unit["Unit"]["After"][0].split()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_limit_nofile_covers_every_client_bound_with_headroom(unit) -> None:
    # The connection caps bound what clients can make the daemon hold; LimitNOFILE must sit well above
    # their sum (plus the daemon's own ~50 descriptors), and above systemd's default soft limit of 1024.
    from pals_daemon.server import limits

    (value,) = unit["Service"]["LimitNOFILE"]
    nofile = int(value)
    client_bound = limits.MAX_ENGINE_CONNECTIONS + limits.MAX_ADMIN_CONNECTIONS + limits.MAX_METRICS_CONNECTIONS
    assert nofile >= 4 * (client_bound + 50)
    assert nofile > 1024


def test_example_config_parses_with_exactly_the_daemon_keys() -> None:
    text = EXAMPLE.read_text()
    doc = tomllib.loads(text)
    top = {k for k, v in doc.items() if not isinstance(v, dict)}
    assert set(doc) - top == {"sim", "clocks", "controller"}
    assert top == TOP_LEVEL_KEYS - UNSET_BY_DEFAULT
    assert set(doc["sim"]) == SIM_KEYS
    assert set(doc["clocks"]) == CLOCKS_KEYS
    assert set(doc["controller"]) == CONTROLLER_KEYS - CONTROLLER_UNSET
    for key in UNSET_BY_DEFAULT:
        assert re.search(rf"^# {key} = ", text, re.MULTILINE), f"{key} should be shown commented out"


def test_example_config_documents_every_default() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^#? ?([a-z_]+) = ", line)
        if match and match.group(1) in TOP_LEVEL_KEYS | SIM_KEYS | CONTROLLER_KEYS:
            comments = [prev for prev in lines[max(0, i - 4) : i] if prev.startswith("#")]
            assert any(c.startswith("# Default:") for c in comments), f"{match.group(1)} lacks a '# Default:' line"
    assert "PALS_" in "".join(lines[:12]) and "--sim-gpu-kind" in "".join(lines[:12])


def test_example_config_loads_as_the_daemon_defaults() -> None:
    config = pytest.importorskip("pals_daemon.config")
    cfg = config.load_config(env={}, config_path=str(EXAMPLE))
    assert config.describe(cfg) == config.describe(config.DaemonConfig())
