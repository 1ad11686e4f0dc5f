"""``pals-simengines`` against the real ``pals-daemon`` process (sim backend): simulated engines attached over
the engine socket through the shipped vLLM client (EngineLinkClient), obeying the daemon's directives and
following its caps; and an engine whose model has no profile, flagged in the log (once), status and metrics.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest
from test_daemon_subprocess import (  # the subprocess fixtures: one way to start the daemon for every test
    ctl,
    empty_config,  # noqa: F401  (fixture)
    free_port,
    start_daemon,  # noqa: F401  (fixture)
)

from pals_daemon.cli import palsctl, simengines
from pals_daemon.sim.gpu import sim_uuid
from pals_daemon.vllm.client import EngineLinkClient

# Chosen bound on waiting for the daemon to see an engine (it registers within a report interval).
WAIT_S = 10.0


def test_simulated_engines_attach_obey_directives_and_follow_caps(start_daemon, capsys) -> None:  # noqa: F811
    daemon = start_daemon("--backend", "sim", "--metrics-port", "0", "--period-s", "0.2")
    assert ctl(capsys, daemon.admin_socket, "budget", "set", "800")[0] == 0
    args = simengines.build_parser().parse_args(
        ["--socket", str(daemon.engine_socket), "--model", "mixtral-8x7b-instruct", "--rate", "4", "--duration", "3"]
    )
    (attached,) = asyncio.run(simengines.attach(args))
    totals = attached.engine.totals
    assert totals.requests_arrived > 0 and totals.requests_finished == totals.requests_arrived
    assert attached.client.registrations == 1 and attached.client.reports_sent > 0
    assert attached.client.directives_received > 0
    # The mirrored GPUs followed the caps the daemon enforces under 800 W (4 x 200 W).
    assert [g.read().requested_limit_mw for g in attached.engine.gpus] == [200_000] * 4
    # The daemon logs the disconnect when it sees the stream end, which may be just after attach() returns.
    deadline = time.monotonic() + WAIT_S
    while "engine sim0 disconnected" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = daemon.log()
    assert "engine sim0 connected (mixtral-8x7b-instruct on GPUs [0, 1, 2, 3])" in log
    assert "engine sim0 disconnected" in log


def test_engine_without_profile_is_logged_once_and_flagged(start_daemon, capsys) -> None:  # noqa: F811
    port = free_port()
    daemon = start_daemon("--backend", "sim", "--metrics-port", str(port), "--period-s", "0.1")
    client = EngineLinkClient(
        str(daemon.engine_socket), "mystery0", "no-such-model", [sim_uuid(i) for i in range(4)], 64, 8192, 0.05
    )
    client.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            rc, out, _ = ctl(capsys, daemon.admin_socket, "status", "--json")
            engines = {e["engine_id"]: e for e in json.loads(out)["engines"]}
            mystery = engines.get("mystery0")
            if mystery and mystery["connected"] and "no profile" in daemon.log():
                break
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        time.sleep(0.5)  # several more ticks: still one line
        assert mystery["has_profile"] is False and mystery["model"] == "no-such-model"
        lines = [line for line in daemon.log().splitlines() if "no profile" in line]
        assert len(lines) == 1, lines
        assert lines[0].endswith(
            "engine 'mystery0': no profile for model 'no-such-model' on NVIDIA A100-SXM4-80GB GPUs; its GPUs get "
            "their default limit (with a budget: an equal share of it) and it keeps its own batch limit "
            "(`palsctl profile mystery0 ...` measures one)"
        )
        rc, out, _ = ctl(capsys, daemon.admin_socket, "status")
        assert any(line.startswith("mystery0 ") and line.endswith(palsctl.NO_PROFILE_NOTE) for line in out.splitlines())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert 'pals_engine_has_profile{engine="mystery0",model="no-such-model"} 0.0' in body.splitlines()
    finally:
        client.close()


@pytest.mark.parametrize("argv", [["--model", "m", "--rate", "0"], ["--model", "m", "--rate", "1", "--engines", "0"]])
def test_bad_arguments_exit_2(argv: list[str], capsys) -> None:
    assert simengines.main(argv) == 2
    assert capsys.readouterr().err == "pals-simengines: --engines, --duration and --rate must be > 0\n"
