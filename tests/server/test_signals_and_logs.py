"""Issue 10 B3 and B6 against the real ``pals-daemon`` process on two fake A100s (tests/fake_nvml).

B3: SIGHUP, SIGUSR1 and SIGUSR2 are logged and ignored (the daemon keeps running, the GPUs keep their caps);
a second SIGTERM or SIGINT while the daemon restores the GPUs (an engine stream open, each limit write made
slow by the fake) is logged and ignored: the restore runs to its end and the exit status is 0.
B6: a client's GOAWAY debug text, newlines included, never becomes a log line of its own.
"""

from __future__ import annotations

import signal
import socket
import struct
import time

import grpc
from fake_nvml import FakeNvmlEnv
from test_daemon_subprocess import (  # the subprocess fixtures: one way to start the daemon for every test
    A100_ORIGINAL_MW,
    DaemonProcess,
    empty_config,  # noqa: F401  (fixture)
    fake_limits,
    start_daemon,  # noqa: F401  (fixture)
    two_a100,  # noqa: F401  (fixture)
)

from pals_daemon.api import pals_pb2, pals_pb2_grpc

BUDGET_W = 300
# Each SetPowerManagementLimit sleeps this long in the fake (under the daemon's 1 s GPU timeout), so the
# restore of two GPUs takes ~0.8 s and a second signal 0.2 s after the first lands in the middle of it.
SLOW_WRITE_MS = 400
ADMIN_ANSWER_S = 1.0


def capped(start_daemon, fake: FakeNvmlEnv) -> DaemonProcess:  # noqa: F811
    daemon = start_daemon("--backend", "nvml", "--metrics-port", "0", "--period-s", "0.2", env=fake.env)
    with grpc.insecure_channel(f"unix:{daemon.admin_socket}") as channel:
        pals_pb2_grpc.PowerAdminStub(channel).SetBudget(pals_pb2.SetBudgetRequest(budget_w=BUDGET_W), timeout=5)
    assert sum(fake_limits(fake)) <= BUDGET_W * 1000
    return daemon


def admin_answers(daemon: DaemonProcess) -> pals_pb2.NodeStatus:
    with grpc.insecure_channel(f"unix:{daemon.admin_socket}") as channel:
        started = time.perf_counter()
        status = pals_pb2_grpc.PowerAdminStub(channel).GetStatus(pals_pb2.GetStatusRequest(), timeout=ADMIN_ANSWER_S)
        assert time.perf_counter() - started < ADMIN_ANSWER_S
        return status


def test_hup_usr1_usr2_are_ignored_and_logged(start_daemon, two_a100: FakeNvmlEnv) -> None:  # noqa: F811
    daemon = capped(start_daemon, two_a100)
    limits = fake_limits(two_a100)
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        daemon.proc.send_signal(sig)
        time.sleep(0.1)
        assert daemon.proc.poll() is None, daemon.log()
        admin_answers(daemon)
    ticks = admin_answers(daemon).controller.ticks
    time.sleep(0.5)
    assert admin_answers(daemon).controller.ticks > ticks  # the loop runs on
    assert fake_limits(two_a100) == limits  # and the caps stay
    log = daemon.log()
    assert log.count("SIGHUP received and ignored (no reload") == 2, log
    assert "SIGUSR1 received and ignored" in log and "SIGUSR2 received and ignored" in log
    assert daemon.terminate() == 0, daemon.log()
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2


def _second_signal_during_restore(start_daemon, fake: FakeNvmlEnv, second: signal.Signals) -> None:  # noqa: F811
    daemon = capped(start_daemon, fake)
    state = fake.read_state()
    state.slow("nvmlDeviceSetPowerManagementLimit", SLOW_WRITE_MS)
    fake.write_state(state)
    with grpc.insecure_channel(f"unix:{daemon.engine_socket}") as channel:
        # An engine stream open through the stop (the case that aborted the restore).
        requests = iter(
            [
                pals_pb2.EngineMessage(
                    register=pals_pb2.Register(
                        engine_id="e1",
                        model="mixtral-8x7b-instruct",
                        gpu_indices=[0, 1],
                        max_num_seqs=256,
                        max_num_batched_tokens=8192,
                    )
                )
            ]
        )
        stream = pals_pb2_grpc.EngineLinkStub(channel).Connect(requests)
        assert next(stream).WhichOneof("body") == "registered"
        daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        daemon.proc.send_signal(second)
        rc = daemon.proc.wait(15)
        stream.cancel()
    log = daemon.log()
    assert rc == 0, log
    assert f"{second.name} again while stopping: ignored" in log, log
    assert fake_limits(fake) == [A100_ORIGINAL_MW] * 2, log
    assert daemon.state()["original_limits"] == {}


def test_a_second_sigterm_during_the_restore_is_ignored(start_daemon, two_a100: FakeNvmlEnv) -> None:  # noqa: F811
    _second_signal_during_restore(start_daemon, two_a100, signal.SIGTERM)


def test_a_sigint_during_the_restore_is_ignored(start_daemon, two_a100: FakeNvmlEnv) -> None:  # noqa: F811
    _second_signal_during_restore(start_daemon, two_a100, signal.SIGINT)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


FORGED = "ERROR pals_daemon.server.daemon: GPU 0 no longer controlled (forged)"


def test_goaway_debug_text_cannot_forge_a_log_line(start_daemon, two_a100: FakeNvmlEnv) -> None:  # noqa: F811
    daemon = start_daemon("--backend", "nvml", "--metrics-port", "0", "--log-level", "debug", env=two_a100.env)
    for path in (daemon.engine_socket, daemon.admin_socket):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""))
            time.sleep(0.1)
            debug = f"x\n{FORGED}\r\n<3>{FORGED}\x1b[2J\n".encode()
            s.sendall(_frame(7, 0, 0, struct.pack(">II", 0, 2) + debug))  # GOAWAY, PROTOCOL_ERROR
            time.sleep(0.3)
    admin_answers(daemon)
    assert daemon.terminate() == 0
    lines = daemon.log().splitlines()
    # gRPC core did log the debug text (at its default verbosity): each part is on a marked, escaped line.
    quoted = [line for line in lines if "forged" in line]
    assert quoted, "\n".join(lines)
    for line in quoted:
        assert line.startswith("grpc-core: "), line
        assert "\x1b" not in line and "\r" not in line
    assert not any(line.startswith(("ERROR", "<3>")) for line in lines), "\n".join(lines)
    assert fake_limits(two_a100) == [A100_ORIGINAL_MW] * 2
