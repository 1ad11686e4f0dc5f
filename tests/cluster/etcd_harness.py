"""Real etcd members on loopback for the cluster tests (Debian's etcd-server; .ci/run installs it).

Absent etcd: the test is skipped with the reason, except under CI (CI=true), where it fails: CI installs etcd,
so a missing binary there is a broken stage, not a reason to pass.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ETCD = shutil.which("etcd")
START_TIMEOUT_S = 20.0


def require_etcd() -> str:
    """The etcd binary's path; skip (fail under CI) when absent."""
    if ETCD is None:
        reason = "etcd is not installed (apt-get install -y etcd-server); the cluster tests start real members"
        if os.environ.get("CI"):
            pytest.fail("CI must run the cluster tests: " + reason)
        pytest.skip(reason)
    return ETCD


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"


@dataclass
class EtcdCluster:
    """``size`` members started with one --initial-cluster; kill/start each by index."""

    root: Path
    size: int = 3
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i in range(self.size):
            self.members.append(
                Member(f"m{i}", free_port(), free_port(), self.root / f"m{i}", self.root / f"m{i}.log")
            )

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self, i: int, *, new: bool = True) -> None:
        m = self.members[i]
        initial = ",".join(f"{x.name}=http://127.0.0.1:{x.peer_port}" for x in self.members)
        args = [
            require_etcd(), "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.url, "--advertise-client-urls", m.url,
            "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-cluster", initial, "--initial-cluster-state", "new" if new else "existing",
            "--initial-cluster-token", f"pals-test-{self.root.name}",
            # Fast elections on loopback (defaults 100 / 1000 ms).
            "--heartbeat-interval", "50", "--election-timeout", "400",
        ]
        m.proc = subprocess.Popen(args, stdout=open(m.log_path, "ab"), stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def start_all(self) -> None:
        for i in range(self.size):
            self.start(i)
        self.wait_healthy()

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for m in self.members:
                if m.proc is None or m.proc.poll() is not None:
                    continue
                try:
                    r = requests.get(m.url + "/health", timeout=0.5)
                    if r.ok and r.json().get("health") == "true":
                        return
                except (requests.RequestException, ValueError):
                    pass
            time.sleep(0.1)
        raise AssertionError("etcd did not become healthy: " + " | ".join(
            m.log_path.read_text(errors="replace")[-500:] for m in self.members if m.log_path.exists()))

    def kill(self, i: int) -> None:
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(10)

    def stop_all(self) -> None:
        for i in range(self.size):
            self.kill(i)
