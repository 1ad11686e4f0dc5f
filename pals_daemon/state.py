"""Persisted daemon state: the node budget, engine targets and every GPU's original power limit and clocks.

The original limits are the record that lets any exit path (graceful stop, crash, SIGKILL followed by
``pals-daemon restore`` from systemd's ExecStopPost, start-up after a crash) put each GPU back as it was
found. They are saved before the daemon's first write to a GPU and dropped only after the GPU was restored.
Each record carries the GPU's UUID (its key), the boot id and the driver version it was taken under, so a
record from an earlier boot or driver is recognised as such and never applied to another board.

Writes are atomic (temporary file, fsync, rename, fsync of the directory). The file is trusted only when it
is a regular file owned by this user, not writable by anyone else, and valid against the schema: a state
file planted or altered by another local user could otherwise make the daemon "restore" a GPU to any limit.
An untrusted file is set aside (renamed, never followed or read again) and the daemon starts afresh; an
unsafe directory is a hard error, since nothing written there could be trusted either.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import pathlib
import stat
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

from pals_daemon.control.types import EngineTargets
from pals_daemon.errors import StateError

log = logging.getLogger(__name__)

STATE_FILE_NAME = "state.json"
# Version 2 added boot_id and driver_version to each original-limit record; version 3 the budget ramp. The
# optional "original_clocks" object came without a version bump on purpose: a version that ignores unknown keys
# still reads every power-limit record.
SCHEMA_VERSION = 3
# Older versions still read (an upgrade must not lose the records of GPUs left capped).
READABLE_VERSIONS = (1, 2, 3)
# The kernel's random UUID for this boot (proc(5): /proc/sys/kernel/random/boot_id).
BOOT_ID_PATH = pathlib.Path("/proc/sys/kernel/random/boot_id")
# Chosen engineering bound on a boot id / driver version string in a record (both are ~36 and ~10 chars).
MAX_TAG_LEN = 80
# Suffix of a set-aside state file: state.json.unsafe-<UTC timestamp>.
UNSAFE_SUFFIX = ".unsafe-"
# Prefix of save()'s temporary files; one left by a kill -9 mid-save is removed at the next load().
TEMP_PREFIX = ".state-"


@dataclass(frozen=True)
class BudgetRamp:
    """A budget ramp in progress: from ``start_w`` at wall time ``start_unix_s`` to the budget over ``ramp_s``.

    Wall time, not the monotonic clock: a restart must resume the ramp where it is, not start it again or
    jump to its end.
    """

    start_w: float
    start_unix_s: float
    ramp_s: float


@dataclass(frozen=True)
class OriginalLimit:
    """A GPU's power limit as found before the daemon first changed it, and under which boot and driver."""

    gpu_index: int
    limit_mw: int
    # None: unknown (a version-1 record, or the value could not be read when the record was made).
    boot_id: str | None = None
    driver_version: str | None = None


@dataclass(frozen=True)
class OriginalClock:
    """A GPU's SM clocks before the daemon first locked them: at the driver default (not locked), since the
    daemon never touches a GPU whose clocks someone else set. Restoring is nvmlDeviceResetGpuLockedClocks."""

    gpu_index: int
    boot_id: str | None = None
    driver_version: str | None = None


@dataclass(frozen=True)
class DaemonState:
    """Everything that must survive a restart."""

    budget_w: float | None = None
    # The ramp towards budget_w, while one is in progress (None: budget_w is in force).
    budget_ramp: BudgetRamp | None = None
    targets: dict[str, EngineTargets] = field(default_factory=dict)
    # Keyed by GPU UUID: indices can change across reboots, UUIDs cannot.
    original_limits: dict[str, OriginalLimit] = field(default_factory=dict)
    # Keyed by GPU UUID: GPUs whose clocks the daemon locked (or is about to), to be reset on exit.
    original_clocks: dict[str, OriginalClock] = field(default_factory=dict)

    def with_budget(self, budget_w: float | None, ramp: BudgetRamp | None = None) -> DaemonState:
        """A copy with a new budget (reached by ``ramp`` when given)."""
        return replace(self, budget_w=budget_w, budget_ramp=ramp if budget_w is not None else None)

    def with_targets(self, engine_id: str, targets: EngineTargets) -> DaemonState:
        """A copy with one engine's targets replaced; empty targets remove the engine's entry."""
        if targets == EngineTargets():
            return replace(self, targets={k: v for k, v in self.targets.items() if k != engine_id})
        return replace(self, targets={**self.targets, engine_id: targets})

    def with_original(self, uuid: str, original: OriginalLimit) -> DaemonState:
        """A copy recording a GPU's original limit, unless one is already recorded (the first one wins)."""
        if uuid in self.original_limits:
            return self
        return replace(self, original_limits={**self.original_limits, uuid: original})

    def without_original(self, uuid: str) -> DaemonState:
        """A copy without a GPU's original limit (after it was restored)."""
        return replace(self, original_limits={k: v for k, v in self.original_limits.items() if k != uuid})

    def with_original_clock(self, uuid: str, original: OriginalClock) -> DaemonState:
        """A copy recording a GPU's original clocks, unless already recorded (the first one wins)."""
        if uuid in self.original_clocks:
            return self
        return replace(self, original_clocks={**self.original_clocks, uuid: original})

    def without_original_clock(self, uuid: str) -> DaemonState:
        """A copy without a GPU's clock record (after its clocks were reset, or were found taken over)."""
        return replace(self, original_clocks={k: v for k, v in self.original_clocks.items() if k != uuid})


def current_boot_id() -> str | None:
    """This boot's id, or None where the kernel does not offer it."""
    try:
        return BOOT_ID_PATH.read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def origin_notes(original: OriginalLimit | OriginalClock, boot_id: str | None, driver_version: str | None) -> list[str]:
    """How a record's boot and driver differ from now (empty when the same or unknown now)."""
    notes = []
    if original.boot_id is None:
        notes.append("recorded under an unknown boot (older state file)")
    elif boot_id is not None and original.boot_id != boot_id:
        notes.append(f"recorded under an earlier boot ({original.boot_id}; this boot is {boot_id})")
    if original.driver_version is not None and driver_version is not None and original.driver_version != driver_version:
        notes.append(f"recorded under driver {original.driver_version} (now {driver_version})")
    return notes


def _unsafe_reason(st: os.stat_result, what: str, allow_dir: bool) -> str | None:
    """Why ``st`` may not be trusted, or None when it is a private regular file (directory) of this user."""
    if stat.S_ISLNK(st.st_mode):
        return f"{what} is a symbolic link"
    if allow_dir and not stat.S_ISDIR(st.st_mode):
        return f"{what} is not a directory"
    if not allow_dir and not stat.S_ISREG(st.st_mode):
        return f"{what} is not a regular file"
    if st.st_uid != os.geteuid():
        return f"{what} is owned by uid {st.st_uid}, not by this daemon (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


class StateStore:
    """Reads and atomically writes the state file in a private directory."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.directory = pathlib.Path(state_dir)
        self.path = self.directory / STATE_FILE_NAME
        # Where load() moved untrusted state files (for logs, status and tests).
        self.set_aside: list[pathlib.Path] = []

    def ensure_directory(self) -> None:
        """Create the directory (0700) if missing; StateError when it is unsafe (nothing there can be trusted)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            st = os.lstat(self.directory)
        except OSError as exc:
            raise StateError(f"cannot stat state directory {self.directory}: {exc}") from exc
        reason = _unsafe_reason(st, f"state directory {self.directory}", allow_dir=True)
        if reason is not None:
            raise StateError(f"{reason}; refusing to use it (fix or remove it)")

    def load(self) -> DaemonState:
        """The saved state; a fresh one when there is no file or the file was set aside as untrusted.

        StateError only when the directory itself is unsafe.
        """
        self.ensure_directory()
        self._remove_stale_temp_files()
        try:
            raw = self._read_trusted()
        except _Untrusted as exc:
            self._set_aside(str(exc))
            return DaemonState()
        if raw is None:
            return DaemonState()
        try:
            return decode_state(json.loads(raw))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._set_aside(f"state file {self.path} fails the schema: {exc}")
            return DaemonState()

    def _remove_stale_temp_files(self) -> None:
        """Remove save()'s temporary files left by a process killed mid-save (only our own regular files)."""
        for entry in os.scandir(self.directory):
            if not entry.name.startswith(TEMP_PREFIX):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                    os.unlink(entry.path)
                    log.info("removed %s, left by an interrupted save", entry.path)
            except OSError as exc:
                log.warning("cannot remove %s, left by an interrupted save: %s", entry.path, exc)

    def _read_trusted(self) -> bytes | None:
        """The file's bytes (None when absent); _Untrusted when it is not a private regular file of ours."""
        what = f"state file {self.path}"
        try:
            # lstat first: opening a FIFO would block, and a symbolic link must never be followed.
            reason = _unsafe_reason(os.lstat(self.path), what, allow_dir=False)
        except FileNotFoundError:
            return None
        if reason is not None:
            raise _Untrusted(reason)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:  # ELOOP: replaced by a link since the lstat
            raise _Untrusted(f"cannot open {what} safely: {exc}") from exc
        with os.fdopen(fd, "rb") as handle:
            # Checked again on the open file: it may have been swapped since the lstat.
            reason = _unsafe_reason(os.fstat(handle.fileno()), what, allow_dir=False)
            if reason is not None:
                raise _Untrusted(reason)
            return handle.read()

    def _set_aside(self, reason: str) -> None:
        """Rename the untrusted file (the link itself for a symlink) out of the way and log why."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.path.with_name(f"{STATE_FILE_NAME}{UNSAFE_SUFFIX}{stamp}")
        n = 0
        while os.path.lexists(target):
            n += 1
            target = self.path.with_name(f"{STATE_FILE_NAME}{UNSAFE_SUFFIX}{stamp}-{n}")
        try:
            # rename(2) acts on the directory entry: a symbolic link is moved, not followed.
            os.rename(self.path, target)
        except OSError as exc:
            raise StateError(f"{reason}, and it could not be set aside: {exc}") from exc
        self.set_aside.append(target)
        log.error(
            "%s; set aside as %s and NOT trusted: starting with fresh state (any GPU limits recorded there are "
            "not restored: check the GPUs' limits with nvidia-smi)",
            reason,
            target,
        )

    def save(self, state: DaemonState) -> None:
        """Write the state atomically (readers see the old or the new file, never a torn one)."""
        self.ensure_directory()
        data = json.dumps(encode_state(state), indent=2, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.directory)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, self.path)
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


class _Untrusted(Exception):
    """The state file may not be read (its message says why)."""


def encode_state(state: DaemonState) -> dict[str, Any]:
    """State as JSON-ready data."""
    return {
        "version": SCHEMA_VERSION,
        "budget_w": state.budget_w,
        "budget_ramp": None
        if state.budget_ramp is None
        else {
            "start_w": state.budget_ramp.start_w,
            "start_unix_s": state.budget_ramp.start_unix_s,
            "ramp_s": state.budget_ramp.ramp_s,
        },
        "targets": {
            eid: {"tokens_per_s": t.tokens_per_s, "ttft_ms": t.ttft_ms, "tpot_ms": t.tpot_ms}
            for eid, t in state.targets.items()
        },
        "original_limits": {
            uuid: {
                "gpu_index": o.gpu_index,
                "limit_mw": o.limit_mw,
                "boot_id": o.boot_id,
                "driver_version": o.driver_version,
            }
            for uuid, o in state.original_limits.items()
        },
        "original_clocks": {
            uuid: {"gpu_index": o.gpu_index, "boot_id": o.boot_id, "driver_version": o.driver_version}
            for uuid, o in state.original_clocks.items()
        },
    }


def _positive_or_none(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number or null, got {value!r}")
    return float(value)


def _tag_or_none(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_TAG_LEN or not value.isprintable():
        raise ValueError(f"{what} must be a short printable string or null, got {value!r}")
    return value


def _mapping(value: Any, what: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object, got {type(value).__name__}")
    return value


def decode_state(doc: Any) -> DaemonState:
    """Parse and validate state data of any readable version (ValueError on anything unexpected)."""
    if not isinstance(doc, dict) or doc.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"expected a state object of version {' or '.join(map(str, READABLE_VERSIONS))}")
    version = doc["version"]
    targets = {}
    for eid, t in _mapping(doc.get("targets", {}), "targets").items():
        t = _mapping(t, f"targets of {eid}")
        targets[str(eid)] = EngineTargets(
            tokens_per_s=_positive_or_none(t.get("tokens_per_s"), "tokens_per_s"),
            ttft_ms=_positive_or_none(t.get("ttft_ms"), "ttft_ms"),
            tpot_ms=_positive_or_none(t.get("tpot_ms"), "tpot_ms"),
        )
    originals = {}
    for uuid, o in _mapping(doc.get("original_limits", {}), "original_limits").items():
        o = _mapping(o, f"original limit of {uuid}")
        index, limit = o["gpu_index"], o["limit_mw"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (index, limit)):
            raise ValueError(f"original limit of {uuid} is malformed")
        if version == 1:
            # Version 1 recorded no boot id or driver: accepted, as from an unknown boot.
            boot_id = driver = None
        else:
            boot_id = _tag_or_none(o["boot_id"], f"boot_id of {uuid}")
            driver = _tag_or_none(o["driver_version"], f"driver_version of {uuid}")
        originals[str(uuid)] = OriginalLimit(index, limit, boot_id=boot_id, driver_version=driver)
    clocks = {}
    # Absent in files written before the clock knob: no clock was ever locked by those versions.
    for uuid, o in _mapping(doc.get("original_clocks", {}), "original_clocks").items():
        o = _mapping(o, f"original clocks of {uuid}")
        index = o["gpu_index"]
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"original clocks of {uuid} are malformed")
        clocks[str(uuid)] = OriginalClock(
            index,
            boot_id=_tag_or_none(o["boot_id"], f"boot_id of {uuid}"),
            driver_version=_tag_or_none(o["driver_version"], f"driver_version of {uuid}"),
        )
    budget_w = _positive_or_none(doc.get("budget_w"), "budget_w")
    ramp = None
    raw_ramp = doc.get("budget_ramp")
    if raw_ramp is not None and budget_w is not None:
        raw_ramp = _mapping(raw_ramp, "budget_ramp")
        start_w = _positive_or_none(raw_ramp["start_w"], "budget_ramp.start_w")
        start_unix_s = _positive_or_none(raw_ramp["start_unix_s"], "budget_ramp.start_unix_s")
        ramp_s = _positive_or_none(raw_ramp["ramp_s"], "budget_ramp.ramp_s")
        if start_w is None or start_unix_s is None or ramp_s is None:
            raise ValueError("budget_ramp needs start_w, start_unix_s and ramp_s")
        ramp = BudgetRamp(start_w, start_unix_s, ramp_s)
    return DaemonState(
        budget_w=budget_w,
        budget_ramp=ramp,
        targets=targets,
        original_limits=originals,
        original_clocks=clocks,
    )
