"""``pals-daemon`` as an operator meets it: help, --version, config errors (one pass, exit 2, no traceback),
the NVML-missing hint, and ``restore`` reading only what it needs from a config with mistakes elsewhere.

Each case runs the real entry point in a subprocess (as systemd or a shell would); restore runs against the
fake libnvidia-ml.so.1 (tests/fake_nvml) through the real pynvml ctypes path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fake_nvml import FakeNvmlEnv
from fake_nvml.state import FakeNvmlState, fake_uuid

from pals_daemon import __version__
from pals_daemon.cli import daemon_main
from pals_daemon.state import DaemonState, OriginalLimit, StateStore

A100_ORIGINAL_MW = 400_000
CAPPED_MW = 150_000


def pals_daemon(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    env = dict(env or {})
    env.setdefault("PATH", "/usr/bin:/bin")
    return subprocess.run(
        [sys.executable, "-m", "pals_daemon.cli.daemon_main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
    )


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        daemon_main.main(list(args))
    return info.value.code, capsys.readouterr().out


def test_version_and_help_show_defaults_and_restore(capsys: pytest.CaptureFixture[str]) -> None:
    assert in_process(capsys, "--version") == (0, f"pals-daemon {__version__}\n")
    rc, help_text = in_process(capsys, "--help")
    assert rc == 0 and help_text.startswith("usage: pals-daemon [restore] [options]")
    flat = " ".join(help_text.split())
    for fragment in (
        "--metrics-port PORT Prometheus /metrics port (0 disables) (default 10400; env PALS_METRICS_PORT)",
        "--period-s S control period, s (default 0.5; env PALS_PERIOD_S)",
        "--backend {nvml,sim} GPU backend",
        "(default A100-SXM4; env PALS_SIM_GPU_KIND)",
    ):
        assert fragment in flat, fragment
    assert in_process(capsys, "restore", "--help")[1].startswith("usage: pals-daemon [restore] [options]")


def test_config_problems_in_one_pass_exit_2_without_traceback(tmp_path: Path) -> None:
    config = tmp_path / "pals.toml"
    config.write_text('backend = "sim"\nperiod_s = 0.5\ndirective_ttl_s = 0.6\n[sim]\ngpu_kind = "B200"\n')
    missing = tmp_path / "no-such-profiles"
    result = pals_daemon("--config", str(config), "--profiles-dir", str(missing), "--print-config")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "pals-daemon: invalid configuration:",
        "  directive_ttl_s: 0.6 s is less than two control periods (2 x period_s 0.5 s = 1 s): "
        "directives would expire between ticks",
        f"  profiles_dir: '{missing}' is not a directory",
        "  sim_gpu_kind: 'B200' is not one of A100-SXM4, H100-SXM5, H200-SXM",
    ]


def test_missing_nvml_suggests_the_sim_backend(tmp_path: Path) -> None:
    # No fake library on the path and none installed here: pynvml cannot load libnvidia-ml.so.1.
    result = pals_daemon(
        "--config",
        "/dev/null",
        "--runtime-dir",
        str(tmp_path / "run"),
        "--state-dir",
        str(tmp_path / "state"),
        "--engine-socket-group",
        "",
        "--metrics-port",
        "0",
        env={"LD_LIBRARY_PATH": str(tmp_path)},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(error) == 1, result.stderr
    assert error[0].endswith(
        "nvmlInit: NVML_ERROR_LIBRARY_NOT_FOUND (12) "
        "(no NVIDIA driver on this machine? `--backend sim` runs the daemon on simulated GPUs)"
    )


def test_restore_puts_gpus_back_despite_a_typo_in_an_unrelated_key(
    tmp_path: Path, fake_nvml_env: FakeNvmlEnv
) -> None:
    # A crashed daemon left both A100s capped at 150 W, with their 400 W originals recorded.
    fake = fake_nvml_env
    state = FakeNvmlState.of("A100-SXM4", "A100-SXM4")
    for gpu in state.gpus:
        gpu.limit_mw = CAPPED_MW
    fake.write_state(state)
    state_dir = tmp_path / "state"
    store = StateStore(state_dir)
    store.ensure_directory()
    record = DaemonState()
    for i in (0, 1):
        record = record.with_original(fake_uuid(i), OriginalLimit(gpu_index=i, limit_mw=A100_ORIGINAL_MW))
    store.save(record)
    config = tmp_path / "pals.toml"
    config.write_text(f'state_dir = "{state_dir}"\nperiod_s = "fast"\nmetrics_prot = 1\n[sim]\ngpu_kind = "B200"\n')

    # The daemon itself refuses this file...
    run = pals_daemon("--config", str(config), "--print-config", env=fake.env)
    assert run.returncode == 2 and "period_s" in run.stderr
    # ...restore reads state_dir from it, reports the rest, and restores.
    result = pals_daemon("restore", "--config", str(config), env=fake.env)
    assert result.returncode == 0, result.stderr
    assert [g.limit_mw for g in fake.read_state().gpus] == [A100_ORIGINAL_MW] * 2
    assert StateStore(state_dir).load().original_limits == {}
    warnings = [line for line in result.stderr.splitlines() if "(ignored by restore)" in line]
    assert len(warnings) == 3, result.stderr
    assert any("period_s: 'fast' must be a number" in w for w in warnings), warnings
    assert any("unknown key 'metrics_prot'" in w for w in warnings), warnings
    assert any("sim_gpu_kind" in w for w in warnings), warnings


def test_restore_with_a_bad_needed_key_falls_back_to_its_default(tmp_path: Path) -> None:
    config = tmp_path / "pals.toml"
    config.write_text('backend = "sim"\nlog_level = "loud"\n')
    result = pals_daemon("restore", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "log_level: 'loud' is not one of debug, info, warning, error; using the default info" in result.stderr
    assert "nothing to restore" in result.stderr
