"""What an operator reads: palsctl's one-line errors and exit codes, its JSON, and the daemon's warnings, against
the real ``pals-daemon`` process (sim backend) over its real sockets.

The permission cases are real kernel refusals: palsctl runs in a forked child that drops to user nobody when the
test runs as root (else the directory is made unreadable to its owner).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from test_daemon_subprocess import (  # the subprocess fixtures: one way to start the daemon for every test
    clean_env,
    ctl,
    empty_config,  # noqa: F401  (fixture)
    start_daemon,  # noqa: F401  (fixture)
)

from pals_daemon.cli import palsctl

NOBODY = 65534
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def palsctl_without_privilege(argv: list[str]) -> tuple[int, str]:
    """palsctl.main(argv) in a forked child without root's privilege; (exit status, stderr)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        rc = 99
        try:
            os.close(read_end)
            sys.stderr = open(write_end, "w")  # noqa: SIM115 - pytest's capture objects are not fd 2
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            if os.getuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            rc = palsctl.main(argv)
        finally:
            sys.stderr.flush()
            os._exit(rc)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        err = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_permission_denied_is_not_reported_as_absent(start_daemon) -> None:  # noqa: F811
    daemon = start_daemon("--backend", "sim", "--metrics-port", "0")
    sock = str(daemon.admin_socket)
    admin_dir = daemon.admin_socket.parent
    assert admin_dir.stat().st_mode & 0o777 == 0o700
    if os.getuid() != 0:
        admin_dir.chmod(0)  # the owner locked out too, as the 0700 root directory locks out other users
    try:
        rc, err = palsctl_without_privilege(["--socket", sock, "status"])
    finally:
        admin_dir.chmod(0o700)
    assert rc == 1
    assert err == (
        f"palsctl: permission denied reaching {sock}: the admin socket is root's (0600, in a 0700 directory); "
        "run palsctl as root\n"
    )

    if os.getuid() == 0:  # the directories open to all, the socket itself still 0600 root
        modes = {d: d.stat().st_mode & 0o777 for d in (admin_dir, admin_dir.parent, admin_dir.parent.parent)}
        for d in modes:
            d.chmod(0o755)
        try:
            rc, err = palsctl_without_privilege(["--socket", sock, "status"])
        finally:
            for d, mode in modes.items():
                d.chmod(mode)
        assert (rc, err) == (
            1,
            f"palsctl: permission denied on {sock}: the admin socket is root's (mode 0600); run palsctl as root\n",
        )

    # Truly absent (every directory on the way searchable): said so.
    rc, err = palsctl_without_privilege(["--socket", "/nonexistent/admin.sock", "status"])
    assert (rc, err) == (
        1,
        "palsctl: no daemon socket at /nonexistent/admin.sock (is pals-daemon running? --socket to choose another)\n",
    )


def test_palsctl_messages_against_a_live_daemon(start_daemon, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    daemon = start_daemon("--backend", "sim", "--metrics-port", "0", "--period-s", "0.1")
    sock = daemon.admin_socket

    # Pointed at the engine socket: say so, not "UNIMPLEMENTED: Method not found!".
    rc, out, err = ctl(capsys, daemon.engine_socket, "status")
    assert (rc, out) == (1, "")
    assert err == (
        f"palsctl: {daemon.engine_socket} does not serve PowerAdmin: is it the engine socket? palsctl needs the "
        "admin socket (/run/pals/admin/admin.sock by default)\n"
    )

    # --socket after the subcommand.
    capsys.readouterr()
    assert palsctl.main(["budget", "get", "--socket", str(sock)]) == 0
    assert capsys.readouterr().out.startswith("budget none ")

    # `budget set clear`, as the docs say.
    assert ctl(capsys, sock, "budget", "set", "1000")[0] == 0
    rc, out, err = ctl(capsys, sock, "budget", "set", "clear")
    assert rc == 0 and out.startswith("budget none "), err
    assert daemon.state()["budget_w"] is None

    # Targets for an engine that is not connected: accepted, with a warning in the reply.
    rc, out, err = ctl(capsys, sock, "target", "set", "engine-typo", "--tpot-ms", "80")
    assert rc == 0
    assert json.loads(out) == {"tpot_ms": 80.0}
    assert err == (
        "palsctl: warning: engine 'engine-typo' is not connected: the targets are kept and apply when it connects\n"
    )
    assert "engine 'engine-typo' is not connected" in daemon.log()
    rc, out, err = ctl(capsys, sock, "target", "get")
    assert (rc, out) == (0, "engine-typo  tpot_ms=80  (not connected)\n")
    rc, out, _ = ctl(capsys, sock, "target", "get", "engine-typo", "--json")
    assert json.loads(out) == {"engine-typo": {"tpotMs": 80.0}}
    rc, out, err = ctl(capsys, sock, "target", "get", "nobody")
    assert (rc, out, err) == (1, "", "palsctl: engine 'nobody' is not connected and has no targets\n")

    # `target set ENGINE` without values clears nothing unless asked to.
    rc, out, err = ctl(capsys, sock, "target", "set", "engine-typo")
    assert (rc, out) == (2, "")
    assert err == (
        "palsctl: target set engine-typo: give --tokens-per-s, --ttft-ms and/or --tpot-ms, "
        "or --clear to remove every target\n"
    )
    assert daemon.state()["targets"]["engine-typo"]["tpot_ms"] == 80.0
    rc, out, err = ctl(capsys, sock, "target", "set", "engine-typo", "--clear")
    assert rc == 0 and err == "", err
    assert "engine-typo" not in daemon.state()["targets"]

    # status --json: false and zero fields present, 64-bit counters as numbers.
    rc, out, _ = ctl(capsys, sock, "status", "--json")
    status = json.loads(out)
    gpu = status["gpus"][0]
    assert gpu["index"] == 0 and gpu["power_capped"] is False and gpu["limit_drift"] is False
    assert gpu["fault"] == "" and isinstance(gpu["clock_event_reasons"], int)
    assert isinstance(status["controller"]["ticks"], int) and status["controller"]["ticks"] > 0
    assert "budget_w" not in status["budget"]  # optional: absent means no budget
    assert status["budget"]["ramp_remaining_s"] == 0.0

    # watch: timestamped lines, or one JSON object per line.
    rc, out, _ = ctl(capsys, sock, "watch", "--count", "2")
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 2 and all(re.match(TIMESTAMP + r"  tick \d+  power ", line) for line in lines), lines
    rc, out, _ = ctl(capsys, sock, "watch", "--count", "2", "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 2 and all(re.fullmatch(TIMESTAMP, r["time"]) for r in records)
    assert records[1]["controller"]["ticks"] > records[0]["controller"]["ticks"]


def test_watch_into_a_closed_pipe_ends_quietly(start_daemon) -> None:  # noqa: F811
    daemon = start_daemon("--backend", "sim", "--metrics-port", "0", "--period-s", "0.1")
    argv = [sys.executable, "-m", "pals_daemon.cli.palsctl", "--socket", str(daemon.admin_socket), "watch"]
    # `palsctl watch | head -2`
    watch = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    head = subprocess.run(["head", "-2"], stdin=watch.stdout, capture_output=True, text=True, timeout=30)
    watch.stdout.close()
    rc = watch.wait(timeout=30)
    assert len(head.stdout.splitlines()) == 2
    assert rc == palsctl.EXIT_BROKEN_PIPE
    assert watch.stderr.read() == b""


def test_server_reflection_on_both_sockets(start_daemon) -> None:  # noqa: F811
    """What grpcurl does: list the services by reflection, build the request from the reflected schema, call."""
    daemon = start_daemon("--backend", "sim", "--metrics-port", "0")
    common = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    for sock, service in ((daemon.admin_socket, "pals.v1.PowerAdmin"), (daemon.engine_socket, "pals.v1.EngineLink")):
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            reflected = ProtoReflectionDescriptorDatabase(channel)
            assert set(reflected.get_services()) == common | {service}, sock
            pool = descriptor_pool.DescriptorPool(reflected)
            assert pool.FindServiceByName(service).full_name == service
    with grpc.insecure_channel(f"unix:{daemon.admin_socket}") as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName("pals.v1.PowerAdmin").methods_by_name["GetStatus"]
        request_class = message_factory.GetMessageClass(method.input_type)
        reply_class = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/pals.v1.PowerAdmin/GetStatus",
            request_serializer=request_class.SerializeToString,
            response_deserializer=reply_class.FromString,
        )
        reply = call(request_class(), timeout=5)
        assert len(reply.gpus) == 4 and reply.controller.backend == "sim"


def test_persisted_budget_overriding_the_configured_one_is_logged(start_daemon, capsys) -> None:  # noqa: F811
    first = start_daemon("--backend", "sim", "--metrics-port", "0")
    assert ctl(capsys, first.admin_socket, "budget", "set", "1000")[0] == 0
    assert first.terminate() == 0
    second = start_daemon("--backend", "sim", "--metrics-port", "0", "--budget-w", "1200")
    rc, out, _ = ctl(capsys, second.admin_socket, "budget", "get")
    assert rc == 0 and out.startswith("budget 1000 W")
    line = (
        f"WARNING pals_daemon.server.daemon: budget 1000 W from {second.state_dir / 'state.json'} overrides "
        "budget_w 1200 W of the configuration (`palsctl budget set` changes it)"
    )
    assert line in second.log()
