"""Tests for the sd_notify client against real AF_UNIX datagram sockets."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from pals_daemon.server.sdnotify import SystemdNotifier, watchdog_interval_s


@pytest.fixture
def listener(tmp_path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in tmp_path standing in for systemd's notify socket."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


def test_from_environment_none_when_unset() -> None:
    assert SystemdNotifier.from_environment({}) is None
    assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": ""}) is None


def test_from_environment_none_for_unsupported_address() -> None:
    # systemd >= 254 may hand out vsock addresses (VMs); we only speak AF_UNIX.
    assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}) is None


def test_ready_watchdog_stopping_status_on_path_socket(listener) -> None:
    sock, path = listener
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier is not None
    with notifier:
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert notifier.status("controlling 4 GPUs")
        assert sock.recv(4096) == b"STATUS=controlling 4 GPUs"
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_sends_all_fields_in_one_datagram(listener) -> None:
    sock, path = listener
    notifier = SystemdNotifier(path)
    assert notifier.notify(READY=1, status="up")
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    notifier.close()


def test_newline_in_value_cannot_inject_a_field(listener) -> None:
    sock, path = listener
    notifier = SystemdNotifier(path)
    assert notifier.status("bad\nREADY=1")
    assert sock.recv(4096) == b"STATUS=bad READY=1"
    notifier.close()


def test_bad_field_name_is_a_programming_error(listener) -> None:
    _, path = listener
    with pytest.raises(ValueError):
        SystemdNotifier(path).notify(**{"A=B": 1})


def test_abstract_socket() -> None:
    name = f"pals-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier is not None
        assert notifier.address == "\0" + name
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        notifier.close()
    finally:
        sock.close()


def test_send_failure_is_logged_not_raised(tmp_path, caplog) -> None:
    notifier = SystemdNotifier(str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.DEBUG, logger="pals_daemon.server.sdnotify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    assert any("sd_notify" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    notifier.close()


def test_recovers_when_listener_appears_later(tmp_path) -> None:
    path = str(tmp_path / "late.sock")
    notifier = SystemdNotifier(path)
    assert notifier.watchdog() is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()
        notifier.close()


def test_full_receiver_queue_does_not_block(listener) -> None:
    _, path = listener
    notifier = SystemdNotifier(path)
    # Nobody reads: the queue fills, and sends must then fail fast instead of blocking the tick.
    results = [notifier.status("x" * 1024) for _ in range(10_000)]
    assert results[0] is True
    assert results[-1] is False
    notifier.close()


def test_constructor_rejects_unsupported_address() -> None:
    with pytest.raises(ValueError):
        SystemdNotifier("relative/path.sock")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "abc"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "ten"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "500000"}, 0.25),
    ],
)
def test_watchdog_interval_s(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(env) == expected
