"""Minimal sd_notify(3) client: readiness, watchdog and status messages to systemd, no dependencies."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)

__all__ = ["SystemdNotifier", "watchdog_interval_s"]


def _socket_address(raw: str) -> str | None:
    """Translate NOTIFY_SOCKET into an AF_UNIX address; None for unsupported forms (e.g. vsock:)."""
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        # Abstract namespace: the leading "@" stands for a NUL byte.
        return "\0" + raw[1:]
    return None


class SystemdNotifier:
    """Sends sd_notify datagrams to one socket; a failed send is logged at debug, never raised."""

    def __init__(self, address: str) -> None:
        """Bind to an AF_UNIX address: a filesystem path, or "\\0name" / "@name" for an abstract socket."""
        resolved = address if address.startswith("\0") else _socket_address(address)
        if resolved is None:
            raise ValueError(f"unsupported notify socket address {address!r}")
        self.address = resolved
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> SystemdNotifier | None:
        """The notifier for $NOTIFY_SOCKET, or None when not started by systemd with Type=notify."""
        raw = env.get("NOTIFY_SOCKET", "")
        if not raw:
            return None
        if _socket_address(raw) is None:
            log.debug("NOTIFY_SOCKET=%r is not a unix socket address; systemd notifications disabled", raw)
            return None
        return cls(raw)

    def notify(self, **fields: object) -> bool:
        """Send KEY=value lines in one datagram (keys are upper-cased); True when the kernel took it."""
        lines = []
        for key, value in fields.items():
            name = key.upper()
            text = str(value)
            if not name or "=" in name or "\n" in name:
                raise ValueError(f"bad sd_notify field name {key!r}")
            # One field per line: a newline inside a value would inject another field.
            lines.append(f"{name}={text.replace(chr(10), ' ')}")
        if not lines:
            return False
        return self._send("\n".join(lines).encode("utf-8", "replace"))

    def ready(self) -> bool:
        """Tell systemd start-up is complete (Type=notify)."""
        return self.notify(READY=1)

    def watchdog(self) -> bool:
        """Ping the watchdog (WatchdogSec=)."""
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        """Tell systemd an orderly shutdown has begun."""
        return self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        """Set the one-line status shown by `systemctl status`."""
        return self.notify(STATUS=text)

    def close(self) -> None:
        """Close the socket; a later send reopens it."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, payload: bytes) -> bool:
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # Non-blocking: a full systemd queue must never stall the control tick.
                    sock.setblocking(False)
                    self._sock = sock
                self._sock.sendto(payload, self.address)
            except OSError as exc:
                log.debug("sd_notify to %r failed: %s", self.address, exc)
                return False
            return True


def watchdog_interval_s(env: Mapping[str, str] = os.environ) -> float | None:
    """Recommended watchdog ping period (half of WATCHDOG_USEC) in seconds; None when no watchdog is ours."""
    raw_usec = env.get("WATCHDOG_USEC", "")
    if not raw_usec:
        return None
    raw_pid = env.get("WATCHDOG_PID", "")
    if raw_pid:
        # The watchdog may belong to a parent that exec'd us without clearing the environment.
        try:
            if int(raw_pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000 / 2
