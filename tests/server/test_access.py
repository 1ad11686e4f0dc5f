"""Access control, tested rather than assumed: who can reach which socket, and what each socket offers.

The other-uid clients run under setpriv as uid 65534 with an explicit group list, and connect with a raw
AF_UNIX connect() from the system python (the test venv lives under /root, which uid 65534 cannot
traverse; connect() is where the kernel applies the directory and socket modes, so EACCES there is the proof).
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from daemon_harness import (
    ORIGINAL_MW,
    Dirs,
    drive,
    make_config,
    make_runner,
    running,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pals_daemon.api import pals_pb2, pals_pb2_grpc
from pals_daemon.errors import SocketInUseError, UnsafeSocketDirError

NOBODY_UID = 65534
# The group of gid 65534 ("nogroup" on Debian/Ubuntu, "nobody" on Fedora) serves as the engine group.
ENGINE_GROUP = grp.getgrgid(NOBODY_UID).gr_name
OTHER_GID = 1  # "daemon": a group that is not the engine group
SYSTEM_PYTHON = "/usr/bin/python3"
SETPRIV = shutil.which("setpriv")

# Run as the other uid: prints the errno name of connect() on each path, or "ok".
CONNECT_PROBE = """
import errno, json, socket, sys
out = {}
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        out[path] = "ok"
    except OSError as exc:
        out[path] = errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        s.close()
print(json.dumps(out))
"""


def connect_as(uid: int | None, gid: int | None, *paths: Path) -> dict[str, str]:
    """connect() to each path as ``uid``/``gid`` (no supplementary groups); None: as this process (root)."""
    argv = [SYSTEM_PYTHON, "-I", "-S", "-c", CONNECT_PROBE, *map(str, paths)]
    if uid is not None:
        assert SETPRIV is not None, "setpriv (util-linux) is needed to run a client as another uid"
        argv = [SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    result = json.loads(done.stdout)
    return {Path(p).name: v for p, v in result.items()}


def open_path_to(runtime: Path) -> None:
    """Let other users traverse the directories above the runtime dir (short_tmp is 0700 from mkdtemp)."""
    os.chmod(runtime.parent, 0o755)


# ------------------------------------------------------------------------------------------ other uids


def test_other_uid_cannot_reach_admin_socket_but_engine_group_reaches_engine_socket(dirs: Dirs) -> None:
    async def body() -> None:
        open_path_to(dirs.runtime)
        async with running(dirs, engine_socket_group=ENGINE_GROUP) as node:
            admin, engine = node.config.admin_socket_path, node.config.engine_socket_path
            # Root reaches both (the probe works, so the refusals below are the modes, not the probe).
            assert connect_as(None, None, admin, engine) == {"admin.sock": "ok", "engine.sock": "ok"}
            # uid 65534 in the engine group: the engine socket, never the admin socket.
            in_group = await asyncio.to_thread(connect_as, NOBODY_UID, NOBODY_UID, admin, engine)
            assert in_group == {"admin.sock": "EACCES", "engine.sock": "ok"}
            # uid 65534 outside the engine group: neither.
            outsider = await asyncio.to_thread(connect_as, NOBODY_UID, OTHER_GID, admin, engine)
            assert outsider == {"admin.sock": "EACCES", "engine.sock": "EACCES"}

            # Two layers each: with the admin directory opened up, the admin socket's own 0600 still refuses;
            # with the engine socket opened up, the engine directory's 0750 still refuses an outsider.
            os.chmod(admin.parent, 0o755)
            opened = await asyncio.to_thread(connect_as, NOBODY_UID, NOBODY_UID, admin)
            assert opened == {"admin.sock": "EACCES"}
            os.chmod(admin.parent, 0o700)
            os.chmod(engine, 0o666)
            opened = await asyncio.to_thread(connect_as, NOBODY_UID, OTHER_GID, engine)
            assert opened == {"engine.sock": "EACCES"}
            os.chmod(engine, 0o660)
            # The daemon was not disturbed by any of it.
            status = await node.admin.GetStatus(pals_pb2.GetStatusRequest())
            assert len(status.gpus) == 4

    drive(body())


def test_socket_and_directory_modes_are_explicit_whatever_the_umask(dirs: Dirs) -> None:
    async def body() -> None:
        os.umask(0)  # the widest umask: every mode below must come from an explicit chmod
        gid = grp.getgrnam(ENGINE_GROUP).gr_gid
        async with running(dirs, engine_socket_group=ENGINE_GROUP) as node:
            admin, engine = node.config.admin_socket_path, node.config.engine_socket_path
            assert admin.parent == dirs.runtime / "admin" and engine.parent == dirs.runtime
            expected = {
                admin: (stat.S_ISSOCK, 0o600, 0, os.getegid()),
                admin.parent: (stat.S_ISDIR, 0o700, 0, os.getegid()),
                engine: (stat.S_ISSOCK, 0o660, 0, gid),
                engine.parent: (stat.S_ISDIR, 0o750, 0, gid),
            }
            for path, (is_kind, mode, uid, group) in expected.items():
                st = os.lstat(path)
                assert is_kind(st.st_mode), path
                assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, group), path
            # Lock files are private too.
            for path in (admin, engine):
                lock = os.lstat(path.with_name(path.name + ".lock"))
                assert stat.S_IMODE(lock.st_mode) == 0o600

    drive(body())


# ------------------------------------------------------------------------------------------ services per socket

ADMIN_CALLS: list[tuple[str, Any]] = [
    ("GetStatus", pals_pb2.GetStatusRequest()),
    ("GetBudget", pals_pb2.GetBudgetRequest()),
    ("SetBudget", pals_pb2.SetBudgetRequest(budget_w=400)),
    ("SetBudget", pals_pb2.SetBudgetRequest(clear=True)),
    (
        "SetEngineTargets",
        pals_pb2.SetEngineTargetsRequest(engine_id="e1", targets=pals_pb2.EngineTargets(tokens_per_s=1)),
    ),
    ("StartProfile", pals_pb2.StartProfileRequest(engine_id="e1", caps_w=[200], batches=[8], hold_s=1)),
    ("GetProfile", pals_pb2.GetProfileRequest(engine_id="e1")),
    ("CancelProfile", pals_pb2.CancelProfileRequest(engine_id="e1")),
]


def test_engine_socket_offers_no_power_admin_and_nothing_changes(dirs: Dirs) -> None:
    async def body() -> None:
        async with running(dirs, budget_w=1000.0) as node:
            before = (node.calls(), node.enforced_mw(), node.state_bytes())
            daemon = node.runner.daemon
            # A PowerAdmin client pointed at the engine socket: every method is UNIMPLEMENTED there.
            wrong = pals_pb2_grpc.PowerAdminStub(node.engine_channel)
            for method, request in ADMIN_CALLS:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await getattr(wrong, method)(request)
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, (method, info.value.details())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in wrong.WatchStatus(pals_pb2.WatchStatusRequest()):
                    pass
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            await asyncio.sleep(0.3)  # a few ticks: nothing refused may leak in later
            assert daemon.budget.target_w == 1000.0
            assert daemon.state.targets == {}
            assert daemon.profiler.jobs == {}
            assert (node.calls(), node.enforced_mw(), node.state_bytes()) == before
            # And the other way round: the admin socket offers no EngineLink.
            call = pals_pb2_grpc.EngineLinkStub(node.admin_channel).Connect()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert daemon.engines.sessions() == []
            # Health on each socket knows only that socket's service.
            for channel, own, other in (
                (node.engine_channel, "pals.v1.EngineLink", "pals.v1.PowerAdmin"),
                (node.admin_channel, "pals.v1.PowerAdmin", "pals.v1.EngineLink"),
            ):
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(service=own))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await health.Check(health_pb2.HealthCheckRequest(service=other))
                assert info.value.code() == grpc.StatusCode.NOT_FOUND

    drive(body())


# ------------------------------------------------------------------------------------------ start-up refusals


def _assert_refused_untouched(runner: Any, gpus: Any) -> None:
    assert all(not g.calls for g in gpus)
    assert runner._servers == []


def test_a_foreign_listener_on_the_socket_path_is_refused(dirs: Dirs) -> None:
    async def body() -> None:
        cfg = make_config(dirs)
        cfg.engine_socket_path.parent.mkdir(parents=True)
        # A live listener that holds no pals lock (another program, or a daemon from an older layout).
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
            other.bind(str(cfg.engine_socket_path))
            other.listen()
            runner, gpus = make_runner(dirs)
            with pytest.raises(SocketInUseError, match="another process is listening"):
                await runner.start()
            _assert_refused_untouched(runner, gpus)
            # Its socket is still there and still answers.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(cfg.engine_socket_path))
        assert [g.read().enforced_limit_mw for g in gpus] == [ORIGINAL_MW] * 4

    drive(body())


def test_a_live_daemon_keeps_its_sockets_and_a_dead_ones_are_replaced(dirs: Dirs, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(dirs) as node:
            second, second_gpus = make_runner(Dirs(dirs.runtime, tmp_path / "other-state"))
            with pytest.raises(SocketInUseError):
                await second.start()
            _assert_refused_untouched(second, second_gpus)
            assert len((await node.admin.GetStatus(pals_pb2.GetStatusRequest())).gpus) == 4
        # After that daemon: leave stale sockets behind (bound, closed, never unlinked) and start again.
        cfg = make_config(dirs)
        for path in (cfg.admin_socket_path, cfg.engine_socket_path):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.bind(str(path))
        async with running(dirs) as node:
            assert len((await node.admin.GetStatus(pals_pb2.GetStatusRequest())).gpus) == 4

    drive(body())


@pytest.mark.parametrize("which", ["admin", "engine"])
def test_a_regular_file_at_a_socket_path_is_refused_and_kept(dirs: Dirs, which: str) -> None:
    async def body() -> None:
        runner, gpus = make_runner(dirs)
        planted = getattr(runner.config, f"{which}_socket_path")
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.write_text("not a socket\n")
        with pytest.raises(SocketInUseError, match="not a socket"):
            await runner.start()
        assert planted.read_text() == "not a socket\n"
        _assert_refused_untouched(runner, gpus)

    drive(body())


def _symlinked_admin_dir(dirs: Dirs, elsewhere: Path) -> str:
    elsewhere.mkdir(mode=0o700)
    dirs.runtime.mkdir()
    (dirs.runtime / "admin").symlink_to(elsewhere)
    return "is a symlink"


def _foreign_owned_engine_dir(dirs: Dirs, elsewhere: Path) -> str:
    dirs.runtime.mkdir(mode=0o755)
    os.chown(dirs.runtime, NOBODY_UID, NOBODY_UID)
    return "owned by uid 65534"


def _world_writable_admin_dir(dirs: Dirs, elsewhere: Path) -> str:
    (dirs.runtime / "admin").mkdir(parents=True)
    os.chmod(dirs.runtime / "admin", 0o777)
    return "writable by group or others"


def _world_writable_parent(dirs: Dirs, elsewhere: Path) -> str:
    os.chmod(dirs.runtime.parent, 0o777)  # not sticky: anyone could rename run/ away and put their own
    return "writable by others and not sticky"


@pytest.mark.parametrize(
    "prepare", [_symlinked_admin_dir, _foreign_owned_engine_dir, _world_writable_admin_dir, _world_writable_parent]
)
def test_an_unsafe_socket_directory_is_refused(dirs: Dirs, tmp_path: Path, prepare: Any) -> None:
    async def body() -> None:
        fragment = prepare(dirs, tmp_path / "elsewhere")
        runner, gpus = make_runner(dirs)
        with pytest.raises(UnsafeSocketDirError, match=fragment):
            await runner.start()
        _assert_refused_untouched(runner, gpus)
        # Nothing was bound, and nothing was created through a symlink.
        assert not runner.config.admin_socket_path.exists()
        assert not runner.config.engine_socket_path.exists()
        elsewhere = tmp_path / "elsewhere"
        assert not elsewhere.exists() or list(elsewhere.iterdir()) == []

    drive(body())
