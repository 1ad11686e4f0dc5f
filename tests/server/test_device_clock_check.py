"""bench/device_clock_check.py runs end to end against the fake libnvidia-ml.so.1 (a smoke test: the script is
meant for a lent GPU), reads the clocks, and never calls a setter; its guard blocks a setter that is tried."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fake_nvml import FakeNvmlEnv, FakeNvmlState
from test_daemon_subprocess import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "device_clock_check.py"
GUARD = REPO / "bench" / "nvml_guard"


def env_for(fake: FakeNvmlEnv, out: Path, tmp: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in fake.env.items() if not k.startswith("PALS_") and k not in ("NOTIFY_SOCKET",)}
    env.update(OUT=str(out), PALS_TMP=str(tmp), METRICS_PORT=str(port), ADVISE_S="0.5")
    return env


def test_clock_check_passes_read_only_on_the_fake(
    fake_nvml_env: FakeNvmlEnv, tmp_path: Path, short_tmp: Path
) -> None:
    state = FakeNvmlState.of("H100-SXM5", "H100-SXM5")
    state.gpus[1].locked_min_mhz, state.gpus[1].locked_max_mhz = 345, 1500  # someone's lock: reported, kept
    fake_nvml_env.write_state(state)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=env_for(fake_nvml_env, out, short_tmp / "c", free_port()),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT: PASS" in result.stdout
    before = json.loads((out / "clocks_before.json").read_text())
    assert [len(r["supported_sm_clocks_mhz"]) for r in before] == [110, 110]
    assert [r["sm_clock_mhz"] for r in before] == [1980, 1500]
    status = json.loads((out / "status.json").read_text())
    assert status["gpus"][0]["max_clock_mhz"] == 1980
    assert "someone else" in status["gpus"][1]["clock_control_note"]
    setters = [e for e in fake_nvml_env.log() if "Set" in e.function or "Reset" in e.function]
    assert setters == []
    assert fake_nvml_env.read_state().gpus[1].locked_max_mhz == 1500


def test_guard_blocks_setters(fake_nvml_env: FakeNvmlEnv) -> None:
    code = (
        "import pynvml\n"
        "pynvml.nvmlInit()\n"
        "h = pynvml.nvmlDeviceGetHandleByIndex(0)\n"
        "try:\n"
        "    pynvml.nvmlDeviceSetGpuLockedClocks(h, 345, 1000)\n"
        "except pynvml.NVMLError as e:\n"
        "    print('refused', e.value)\n"
    )
    env = dict(fake_nvml_env.env, PYTHONPATH=str(GUARD))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "refused 4" in result.stdout and "PALS-GUARD" in result.stderr
    assert fake_nvml_env.clock_calls() == []
