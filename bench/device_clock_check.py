"""Read-only check of the clock knob on a real (possibly shared) GPU; run from the repository root.

    python3 bench/device_clock_check.py            # writes to $OUT (default /tmp/pals_out)

1. Reads every GPU's clocks through pals_daemon's NVML backend: the supported SM clocks (at the highest memory
   clock), the applications clock target and default, the SM clock in force, the customer-boost maximum, the
   clock-event reasons (is someone's clock setting holding the clock down?), the power limits.
2. Starts ``pals-daemon --backend nvml --mode advise`` and saves ``palsctl status`` (text and --json) and the
   pals_gpu_* clock metrics: per GPU, whether the daemon would control its clock, why not, the clock in force.
3. SIGTERMs the daemon, reads everything again, and checks: exit status 0 within 5 s, power limits and
   applications clocks unchanged, no setter call anywhere (the guard below), every GPU's status row carries
   its supported range or a note. Prints PASS or FAIL; exit status 0 only on PASS.

READ-ONLY. Advise mode never writes (Daemon.enforcing is False), and this script re-executes itself with
bench/nvml_guard first on PYTHONPATH, so this process and the daemon it starts import a guard that makes every
pynvml nvmlDeviceSet*/Reset*/Clear* refuse and print "PALS-GUARD". Never nvidia-smi -lgc/-rgc/-ac/-pl here.

Files in $OUT (flat): clock_check.txt (log, with UTC date and device names), clocks_before.json,
clocks_after.json, status.txt, status.json, metrics.txt, daemon.log.
Environment: OUT=/tmp/pals_out, PYTHON=<this interpreter>, METRICS_PORT=9400, PALS_TMP=/tmp/pals_clock,
ADVISE_S=3 (seconds the daemon advises before the snapshot).
A local smoke test without a GPU runs against the tests' fake library: see tests/gpu/test_device_clock_check.py.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
GUARD_DIR = REPO / "bench" / "nvml_guard"
GUARD_MARK = "PALS_CLOCK_CHECK_GUARDED"
# Metric families the check saves (the clock knob's, and the clock in force).
METRIC_PREFIXES = ("pals_gpu_sm_clock_hertz", "pals_gpu_clock_")
# Chosen bounds: the daemon answers within seconds on a healthy node; SIGTERM exits within 5 s (README).
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


def _guarded() -> None:
    """Re-execute under the setter guard unless already there."""
    if os.environ.get(GUARD_MARK) == "1":
        return
    env = dict(os.environ)
    env[GUARD_MARK] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GUARD_DIR), str(REPO), env.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, str(pathlib.Path(__file__).resolve()), *sys.argv[1:]], env)


class Check:
    """The log file and the list of failures."""

    def __init__(self, out: pathlib.Path) -> None:
        self.out = out
        self.failures: list[str] = []
        self.log_path = out / "clock_check.txt"

    def say(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def fail(self, text: str) -> None:
        self.failures.append(text)
        self.say(f"FAIL: {text}")


def read_clocks() -> list[dict[str, Any]]:
    """Every GPU's clocks and limits through the daemon's own read path (getters only)."""
    import pynvml

    from pals_daemon.errors import GpuError
    from pals_daemon.gpu.nvml import NvmlBackend

    backend = NvmlBackend()
    out = []
    try:
        for device in backend.open():
            row: dict[str, Any] = {"index": device.identity.index, "uuid": device.identity.uuid,
                                   "name": device.identity.name}
            r = device.read()
            row.update(sm_clock_mhz=r.sm_clock_mhz, clock_event_reasons=hex(r.clock_event_reasons),
                       enforced_limit_mw=r.enforced_limit_mw, requested_limit_mw=r.requested_limit_mw)
            try:
                info = device.clock_info()
                row.update(supported_sm_clocks_mhz=list(info.supported_sm_clocks_mhz), app_clock_mhz=info.app_clock_mhz,
                           default_app_clock_mhz=info.default_app_clock_mhz)
            except GpuError as exc:
                row["clock_info_error"] = str(exc)
            handle = device._handle  # read-only getters the backend does not wrap
            for key, fn, args in (
                ("customer_boost_max_mhz", "nvmlDeviceGetClock",
                 (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_ID_CUSTOMER_BOOST_MAX)),
                ("max_sm_clock_mhz", "nvmlDeviceGetMaxClockInfo", (pynvml.NVML_CLOCK_SM,)),
                ("mem_clock_mhz", "nvmlDeviceGetClockInfo", (pynvml.NVML_CLOCK_MEM,)),
            ):
                try:
                    row[key] = int(getattr(pynvml, fn)(handle, *args))
                except pynvml.NVMLError as exc:
                    row[key] = f"error: {exc}"
            out.append(row)
        driver = backend.driver_version()
    finally:
        backend.close()
    for row in out:
        row["driver_version"] = driver
    return out


def settings(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a write would change: limits, applications clocks, supported list (the clock in force may move)."""
    return [
        (r["uuid"], r["requested_limit_mw"], r["enforced_limit_mw"], r.get("app_clock_mhz"),
         tuple(r.get("supported_sm_clocks_mhz", ())))
        for r in rows
    ]


def main() -> int:
    _guarded()
    out = pathlib.Path(os.environ.get("OUT", "/tmp/pals_out"))
    tmp = pathlib.Path(os.environ.get("PALS_TMP", "/tmp/pals_clock"))
    python = os.environ.get("PYTHON", sys.executable)
    port = int(os.environ.get("METRICS_PORT", "9400"))
    advise_s = float(os.environ.get("ADVISE_S", "3"))
    out.mkdir(parents=True, exist_ok=True)
    run_dir, state_dir = tmp / "run", tmp / "state"
    sock = run_dir / "admin" / "admin.sock"
    for d in (run_dir, state_dir):
        d.mkdir(parents=True, exist_ok=True)
    check = Check(out)
    check.say(f"===== device clock check {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}")
    check.say(f"host {platform.node()} {platform.platform()} python {platform.python_version()}")
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        check.say("nvidia-smi -L:\n" + listing.stdout.strip())

    # 1. before
    before = read_clocks()
    (out / "clocks_before.json").write_text(json.dumps(before, indent=2))
    for r in before:
        clocks = r.get("supported_sm_clocks_mhz") or []
        span = f"{min(clocks)}-{max(clocks)} MHz ({len(clocks)} clocks)" if clocks else r.get("clock_info_error")
        check.say(
            f"GPU {r['index']} {r['name']} driver {r['driver_version']}: SM {r['sm_clock_mhz']} MHz in force, "
            f"supported {span}, app clock {r.get('app_clock_mhz')} (default {r.get('default_app_clock_mhz')}), "
            f"boost max {r['customer_boost_max_mhz']}, reasons {r['clock_event_reasons']}, "
            f"limit {r['enforced_limit_mw']} mW"
        )

    # 2. the advising daemon
    daemon_log = tmp / "daemon.log"
    argv = [python, "-m", "pals_daemon.cli.daemon_main", "--config", "/dev/null", "--backend", "nvml",
            "--mode", "advise", "--runtime-dir", str(run_dir), "--state-dir", str(state_dir),
            "--engine-socket-group", "", "--metrics-port", str(port), "--log-level", "info"]
    with open(daemon_log, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not sock.exists():
        check.fail(f"daemon did not create {sock}")
    time.sleep(advise_s)
    ctl = [python, "-m", "pals_daemon.cli.palsctl", "--socket", str(sock), "status"]
    text = subprocess.run(ctl, capture_output=True, text=True, timeout=30)
    (out / "status.txt").write_text(text.stdout + text.stderr)
    as_json = subprocess.run([*ctl, "--json"], capture_output=True, text=True, timeout=30)
    (out / "status.json").write_text(as_json.stdout or as_json.stderr)
    if text.returncode != 0 or as_json.returncode != 0:
        check.fail(f"palsctl status exited {text.returncode}/{as_json.returncode}")
    check.say("palsctl status:\n" + text.stdout.rstrip())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            metrics = [ln for ln in response.read().decode().splitlines() if ln.startswith(METRIC_PREFIXES)]
        (out / "metrics.txt").write_text("\n".join(metrics) + "\n")
        if not any(ln.startswith("pals_gpu_clock_control") for ln in metrics):
            check.fail("no pals_gpu_clock_control metric")
    except OSError as exc:
        check.fail(f"metrics endpoint: {exc}")
    try:
        gpus = json.loads(as_json.stdout).get("gpus", [])
    except ValueError:
        gpus = []
        check.fail("palsctl status --json is not JSON")
    for g in gpus:
        if not g.get("max_clock_mhz") and not g.get("clock_control_note"):
            check.fail(f"GPU {g.get('index', 0)}: status shows neither a supported clock range nor a note")

    # 3. SIGTERM and the after-check
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        check.fail(f"daemon still running {STOP_TIMEOUT_S} s after SIGTERM")
    check.say(f"daemon exit status {rc}")
    if rc != 0:
        check.fail(f"daemon exit status {rc}, expected 0")
    shutil.copyfile(daemon_log, out / "daemon.log")
    log_text = daemon_log.read_text(errors="replace")
    if "mode advise" not in log_text:
        check.fail("daemon log lacks 'mode advise'")
    setter = re.compile(r"PALS-GUARD|LockedClocks|locked (clocks|at)|reset \(SM clock|restored to")
    if setter.search(log_text):
        check.fail("the daemon log mentions a setter")
    after = read_clocks()
    (out / "clocks_after.json").write_text(json.dumps(after, indent=2))
    if settings(before) == settings(after):
        check.say("PASS: power limits, applications clocks and supported clocks unchanged")
    else:
        check.fail(f"settings changed: before {settings(before)} after {settings(after)}")
    if check.failures:
        check.say(f"RESULT: FAIL ({len(check.failures)}): {'; '.join(check.failures)}")
        return 1
    check.say("RESULT: PASS (advise mode, read-only, exit 0 within 5 s, settings unchanged, no setter call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
