"""Unix socket paths for gRPC: exclusive ownership, stale-socket cleanup, explicit modes.

gRPC silently unlinks and takes over a live socket path, and gives no peer credentials to handlers
(DESIGN.md section 4): so before binding, take a lock beside the socket and refuse to start when another
daemon answers there; remove a stale socket; refuse any non-socket file. Authorization is the socket's
mode and group, set right after binding (and the process umask is 0077, so it is never wider meanwhile).
"""

from __future__ import annotations

import fcntl
import grp
import os
import pathlib
import socket
import stat

from pals_daemon.errors import SocketInUseError


class SocketPath:
    """A socket path this process owns, guarded by an flock on ``<path>.lock`` for its lifetime."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    def claim(self) -> None:
        """Lock the path and clear a stale socket; SocketInUseError if another daemon holds it."""
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise SocketInUseError(f"{self.path} is locked by another pals-daemon ({lock_path})") from exc
        self._lock_fd = fd
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            self.release()
            raise SocketInUseError(f"{self.path} exists and is not a socket; refusing to replace it")
        if _answers(self.path):
            self.release()
            raise SocketInUseError(f"another process is listening on {self.path}")
        os.unlink(self.path)

    @property
    def grpc_address(self) -> str:
        """The address to give grpc's add_insecure_port."""
        return f"unix:{self.path}"

    def restrict(self, mode: int, group: str = "") -> None:
        """Set the bound socket's mode (and group) so that only the intended clients can connect."""
        if group:
            os.chown(self.path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(self.path, mode)

    def release(self) -> None:
        """Remove the socket (if it is still ours) and drop the lock."""
        if self._lock_fd is None:
            return
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None


def _answers(path: pathlib.Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True
