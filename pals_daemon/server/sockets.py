"""Unix socket paths for gRPC: exclusive ownership, stale-socket cleanup, explicit modes on socket and directory.

gRPC silently unlinks and takes over a live socket path, and gives no peer credentials to handlers
(docs/ARCHITECTURE.md section 5): so before binding, take a lock beside the socket and refuse to start when another
daemon answers there; remove a stale socket; refuse any non-socket file. Authorization is the mode and group
of the socket AND of its directory, both set explicitly (never from the umask; the process umask is 0077
besides, so nothing is ever wider in between). A directory that another user could have prepared (a symlink,
owned by a non-root user other than us, or writable by others) is refused rather than repaired: whoever
controls it could swap the socket under the clients.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pathlib
import socket
import stat

from pals_daemon.errors import SocketInUseError, UnsafeSocketDirError


class SocketPath:
    """A socket path this process owns, guarded by an flock on ``<path>.lock`` for its lifetime.

    ``dir_mode`` and ``group`` are the policy: the directory gets ``dir_mode`` and group ``group`` (our own
    group when empty), the socket gets the mode given to restrict() and the same group.
    """

    def __init__(self, path: pathlib.Path, dir_mode: int = 0o700, group: str = "") -> None:
        self.path = path
        self.dir_mode = dir_mode
        self.group = group
        self._lock_fd: int | None = None

    def claim(self) -> None:
        """Prepare the directory, lock the path and clear a stale socket.

        SocketInUseError if another daemon holds the path or a non-socket file is there; UnsafeSocketDirError
        if the directory (or one above it) is not safe to put a socket in.
        """
        prepare_dir(self.path.parent, self.dir_mode, self._gid())
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
            self._unlock()
            raise SocketInUseError(f"{self.path} exists and is not a socket; refusing to replace it")
        if _answers(self.path):
            self._unlock()  # only the lock: the socket belongs to whoever answers there
            raise SocketInUseError(f"another process is listening on {self.path}")
        os.unlink(self.path)

    @property
    def grpc_address(self) -> str:
        """The address to give grpc's add_insecure_port."""
        return f"unix:{self.path}"

    def restrict(self, mode: int) -> None:
        """Set the bound socket's mode and group so that only the intended clients can connect."""
        os.chown(self.path, -1, self._gid(), follow_symlinks=False)
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
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _gid(self) -> int:
        return grp.getgrnam(self.group).gr_gid if self.group else os.getegid()


def prepare_dir(path: pathlib.Path, mode: int, gid: int) -> None:
    """Create ``path`` if missing, refuse it if unsafe, then give it exactly ``mode`` and group ``gid``."""
    _check_ancestors(path.parent)
    try:
        os.mkdir(path, 0o700)  # private until chmod below, whatever the umask
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeSocketDirError(f"socket directory {path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSocketDirError(f"socket directory {path} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise UnsafeSocketDirError(f"socket directory {path} is owned by uid {st.st_uid}, not by root or us")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeSocketDirError(
            f"socket directory {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "someone else could replace the socket"
        )
    # By descriptor, so a swap between the checks above and these calls cannot redirect them.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_ino != st.st_ino:
            raise UnsafeSocketDirError(f"socket directory {path} changed while it was being checked")
        os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _check_ancestors(path: pathlib.Path) -> None:
    """Each directory above the socket directory must not let another user rename what is in it.

    Owned by root or us, and not writable by others unless sticky (like /tmp, where only an entry's owner
    may rename it). Missing ones are created (root-owned, mode from the umask: they hold no socket).
    """
    path.mkdir(parents=True, exist_ok=True)
    for p in (path, *path.parents):
        st = os.stat(p)
        if st.st_uid not in (0, os.geteuid()):
            raise UnsafeSocketDirError(f"{p}, above a socket directory, is owned by uid {st.st_uid}")
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise UnsafeSocketDirError(f"{p}, above a socket directory, is writable by others and not sticky")


def _answers(path: pathlib.Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True
