"""palsctl without a daemon: the status table, argument checks, one-line errors, and the requests it sends."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.cli import palsctl


def hand_built_status() -> pals_pb2.NodeStatus:
    s = pals_pb2.NodeStatus()
    s.gpus.add(
        index=0,
        uuid="GPU-a",
        name="NVIDIA A100-SXM4-80GB",
        min_limit_w=100,
        max_limit_w=400,
        requested_limit_w=250,
        enforced_limit_w=250,
        decided_limit_w=250,
        power_w=240,
        sm_clock_mhz=1275,
        power_capped=True,
        controlled=True,
        engine_id="e1",
    )
    s.gpus.add(
        index=1,
        uuid="GPU-b",
        name="NVIDIA A100-SXM4-80GB",
        min_limit_w=100,
        max_limit_w=400,
        requested_limit_w=400,
        enforced_limit_w=400,
        power_w=60,
        controlled=False,
        fault="GPU 1: GPU is lost",
    )
    s.engines.add(
        engine_id="e1",
        model="mixtral-8x7b-instruct",
        connected=True,
        targets=pals_pb2.EngineTargets(tokens_per_s=500),
        throughput_tokens_per_s=512.25,
        tokens_per_joule=1.5,
        max_num_seqs_limit=96,
        qos_violation_fraction=0.25,
        has_profile=True,
    )
    s.budget.CopyFrom(
        pals_pb2.BudgetStatus(
            budget_w=600,
            effective_budget_w=650,
            ramp_remaining_s=12,
            min_budget_w=200,
            max_budget_w=800,
            sum_enforced_limits_w=650,
            node_power_w=300,
        )
    )
    s.controller.CopyFrom(pals_pb2.ControllerStatus(mode="enforce", backend="nvml", period_s=0.5, ticks=17))
    return s


def test_format_status_table() -> None:
    text = palsctl.format_status(hand_built_status())
    lines = text.splitlines()
    assert lines[0].startswith("mode enforce   backend nvml   period 0.5 s   ticks 17")
    assert "budget 600 W (now 650 W, ramp 12 s left)" in lines[1]
    assert "(range 200 W-800 W)" in lines[1]
    (gpu0,) = [line for line in lines if line.lstrip().startswith("0  NVIDIA")]
    (gpu1,) = [line for line in lines if line.lstrip().startswith("1  NVIDIA")]
    assert "100-400" in gpu0 and "yes" in gpu0 and gpu0.rstrip().endswith("e1")
    assert "NOT CONTROLLED" not in gpu0
    assert gpu1.endswith("NOT CONTROLLED: GPU 1: GPU is lost")
    (engine,) = [line for line in lines if line.startswith("e1 ")]
    assert "mixtral-8x7b-instruct" in engine
    assert engine.split()[2:] == ["yes", "512.2", "500", "1.500", "96", "25.0%"]


def test_format_status_without_budget_or_engines() -> None:
    s = hand_built_status()
    s.budget.ClearField("budget_w")
    s.budget.ClearField("effective_budget_w")
    s.budget.ramp_remaining_s = 0
    del s.engines[:]
    text = palsctl.format_status(s)
    assert "budget none " in text
    assert text.splitlines()[-1] == "no engines connected"


def test_missing_socket_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["status"], ["budget", "set", "500"], ["watch", "--count", "1"]):
        rc = palsctl.main(["--socket", str(tmp_path / "nope.sock"), *args])
        out, err = capsys.readouterr()
        assert rc == 1
        assert out == ""
        assert err.count("\n") == 1
        assert err.startswith(f"palsctl: no daemon socket at {tmp_path / 'nope.sock'}")


def test_socket_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PALS_ADMIN_SOCKET", str(tmp_path / "env.sock"))
    assert palsctl.main(["status"]) == 1
    assert f"no daemon socket at {tmp_path / 'env.sock'}" in capsys.readouterr().err


def test_dead_socket_is_one_line_error(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = short_tmp / "admin.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # a socket file nobody listens on
    started = time.monotonic()
    rc = palsctl.main(["--socket", str(path), "status"])
    _, err = capsys.readouterr()
    assert rc == 1
    assert err.startswith("palsctl: UNAVAILABLE") and err.count("\n") == 1, err
    assert time.monotonic() - started < palsctl.RPC_TIMEOUT_S


@pytest.mark.parametrize(
    "args",
    [
        ["budget", "set", "500", "--ramp", "nan"],
        ["budget", "set", "500", "--ramp", "inf"],
        ["budget", "set", "500", "--ramp", "soon"],
        ["target", "set", "e1", "--tokens-per-s", "nan"],
        ["target", "set", "e1", "--ttft-ms=-inf"],
        ["watch", "--interval", "nan"],
    ],
)
def test_argparse_rejects_non_finite_numbers(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        palsctl.main(["--socket", "/nonexistent", *args])
    assert info.value.code == palsctl.EXIT_USAGE
    assert "is not a" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ requests sent


class RecordingAdmin(pals_pb2_grpc.PowerAdminServicer):
    """A PowerAdmin that records requests and answers with fixed data."""

    def __init__(self) -> None:
        self.requests: list[object] = []

    def GetStatus(self, request, context):  # noqa: N802
        self.requests.append(request)
        return hand_built_status()

    def GetBudget(self, request, context):  # noqa: N802
        self.requests.append(request)
        return hand_built_status().budget

    def SetBudget(self, request, context):  # noqa: N802
        self.requests.append(request)
        if request.budget_w == 13:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "budget 13 W is below the minimum")
        reply = pals_pb2.BudgetStatus(sum_enforced_limits_w=390, node_power_w=120)
        if not request.clear:
            reply.budget_w = request.budget_w
        return reply

    def SetEngineTargets(self, request, context):  # noqa: N802
        self.requests.append(request)
        return pals_pb2.EngineStatus(engine_id=request.engine_id, targets=request.targets)


@pytest.fixture
def fake_admin(short_tmp: Path) -> Iterator[tuple[Path, RecordingAdmin]]:
    servicer = RecordingAdmin()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pals_pb2_grpc.add_PowerAdminServicer_to_server(servicer, server)
    path = short_tmp / "admin.sock"
    server.add_insecure_port(f"unix:{path}")
    server.start()
    yield path, servicer
    server.stop(None)


def run_ctl(path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = palsctl.main(["--socket", str(path), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_budget_requests(fake_admin, capsys: pytest.CaptureFixture[str]) -> None:
    path, admin = fake_admin
    rc, out, _ = run_ctl(path, capsys, "budget", "set", "750.5", "--ramp", "30")
    assert rc == 0
    assert admin.requests[-1] == pals_pb2.SetBudgetRequest(budget_w=750.5, ramp_s=30)
    assert out == "budget 750 W   sum of enforced limits 390 W   node power 120 W\n"

    rc, out, _ = run_ctl(path, capsys, "budget", "set", "None")
    assert rc == 0
    assert admin.requests[-1] == pals_pb2.SetBudgetRequest(clear=True)
    assert out.startswith("budget none ")

    rc, out, err = run_ctl(path, capsys, "budget", "set", "13")
    assert rc == 1 and out == ""
    assert err == "palsctl: INVALID_ARGUMENT: budget 13 W is below the minimum\n"

    count = len(admin.requests)
    rc, _, err = run_ctl(path, capsys, "budget", "set", "12W")
    assert rc == 1 and err.startswith("palsctl: budget '12W' is not a number")
    assert len(admin.requests) == count  # refused before anything was sent

    rc, out, _ = run_ctl(path, capsys, "budget", "get")
    assert rc == 0 and out.startswith("budget 600 W ")


def test_target_request_replaces_all_fields(fake_admin, capsys: pytest.CaptureFixture[str]) -> None:
    path, admin = fake_admin
    rc, out, _ = run_ctl(path, capsys, "target", "set", "e7", "--ttft-ms", "1500", "--tpot-ms", "40")
    assert rc == 0
    request = admin.requests[-1]
    assert request.engine_id == "e7"
    assert not request.targets.HasField("tokens_per_s")
    assert (request.targets.ttft_ms, request.targets.tpot_ms) == (1500.0, 40.0)
    assert out.count("\n") == 1 and '"ttft_ms": 1500.0' in out


def test_status_output(fake_admin, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = fake_admin
    rc, out, _ = run_ctl(path, capsys, "status")
    assert rc == 0
    assert out == palsctl.format_status(hand_built_status()) + "\n"
    rc, out, _ = run_ctl(path, capsys, "status", "--json")
    assert rc == 0
    assert '"fault": "GPU 1: GPU is lost"' in out


# ------------------------------------------------------------------------------------------ issue 10 (C)


def test_usage_errors_are_one_line_without_argparse_internals(capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        ("budget",): "palsctl budget: the following arguments are required: {get,set} (see 'palsctl budget --help')",
        ("target",): "palsctl target: the following arguments are required: {get,set} (see 'palsctl target --help')",
        (): "palsctl: the following arguments are required: COMMAND (see 'palsctl --help')",
    }
    for args, line in cases.items():
        with pytest.raises(SystemExit) as info:
            palsctl.main(["--socket", "/nonexistent", *args])
        assert info.value.code == palsctl.EXIT_USAGE
        err = capsys.readouterr().err
        assert err == line + "\n"
        assert "_command" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        palsctl.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("palsctl ")


def test_budget_set_clear_and_target_set_without_values(fake_admin, capsys: pytest.CaptureFixture[str]) -> None:
    path, admin = fake_admin
    rc, out, _ = run_ctl(path, capsys, "budget", "set", "clear")
    assert rc == 0 and out.startswith("budget none ")
    assert admin.requests[-1] == pals_pb2.SetBudgetRequest(clear=True)

    count = len(admin.requests)
    rc, out, err = run_ctl(path, capsys, "target", "set", "e1")
    assert (rc, out) == (palsctl.EXIT_USAGE, "")
    assert err.count("\n") == 1 and "--clear to remove every target" in err
    rc, _, err = run_ctl(path, capsys, "target", "set", "e1", "--clear", "--tpot-ms", "5")
    assert rc == palsctl.EXIT_USAGE and err.count("\n") == 1
    assert len(admin.requests) == count  # refused before anything was sent
    rc, out, _ = run_ctl(path, capsys, "target", "set", "e1", "--clear")
    assert (rc, out) == (0, "{}\n")
    assert admin.requests[-1] == pals_pb2.SetEngineTargetsRequest(engine_id="e1", targets=pals_pb2.EngineTargets())


def test_status_json_keeps_false_zero_fields_and_numbers(fake_admin, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = fake_admin
    rc, out, _ = run_ctl(path, capsys, "status", "--json")
    assert rc == 0
    status = json.loads(out)
    lost = status["gpus"][1]
    assert lost["index"] == 1 and lost["power_capped"] is False and lost["controlled"] is False
    assert lost["decided_limit_w"] == 0.0 and lost["sm_clock_mhz"] == 0 and lost["engine_id"] == ""
    assert status["controller"]["ticks"] == 17  # uint64: a number, not "17"
    assert status["engines"][0]["windows"] == 0 and status["engines"][0]["gpu_indices"] == []
    assert "power_instant_w" not in lost  # optional and unset: absent means "not reported"


def test_no_profile_engine_is_flagged_in_the_table() -> None:
    s = hand_built_status()
    s.engines[0].has_profile = False
    (engine,) = [line for line in palsctl.format_status(s).splitlines() if line.startswith("e1 ")]
    assert engine.endswith(palsctl.NO_PROFILE_NOTE)
