"""Persisted daemon state: the node budget, engine targets and every GPU's original power limit.

The original limits are the record that lets any exit path (graceful stop, crash, SIGKILL followed by
``pals-daemon restore`` from systemd's ExecStopPost) put each GPU back as it was found. They are saved
before the daemon's first write to a GPU and dropped only after the GPU was restored.

Writes are atomic (temporary file, fsync, rename, fsync of the directory). The file is read only when it
is a regular file owned by this user and not writable by anyone else, in a directory of the same kind:
a state file planted by another local user could otherwise make the daemon "restore" a GPU to any limit.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import stat
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

from pals_daemon.control.types import EngineTargets
from pals_daemon.errors import StateError

STATE_FILE_NAME = "state.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class OriginalLimit:
    """A GPU's power limit as found before the daemon first changed it."""

    gpu_index: int
    limit_mw: int


@dataclass(frozen=True)
class DaemonState:
    """Everything that must survive a restart."""

    budget_w: float | None = None
    targets: dict[str, EngineTargets] = field(default_factory=dict)
    # Keyed by GPU UUID: indices can change across reboots, UUIDs cannot.
    original_limits: dict[str, OriginalLimit] = field(default_factory=dict)

    def with_budget(self, budget_w: float | None) -> DaemonState:
        """A copy with a new budget."""
        return replace(self, budget_w=budget_w)

    def with_targets(self, engine_id: str, targets: EngineTargets) -> DaemonState:
        """A copy with one engine's targets replaced."""
        return replace(self, targets={**self.targets, engine_id: targets})

    def with_original(self, uuid: str, original: OriginalLimit) -> DaemonState:
        """A copy recording a GPU's original limit, unless one is already recorded (the first one wins)."""
        if uuid in self.original_limits:
            return self
        return replace(self, original_limits={**self.original_limits, uuid: original})

    def without_original(self, uuid: str) -> DaemonState:
        """A copy without a GPU's original limit (after it was restored)."""
        return replace(self, original_limits={k: v for k, v in self.original_limits.items() if k != uuid})


def _check_owned_private(st: os.stat_result, what: str, allow_dir: bool) -> None:
    if allow_dir and not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{what} is not a directory")
    if not allow_dir and not stat.S_ISREG(st.st_mode):
        raise StateError(f"{what} is not a regular file")
    if st.st_uid != os.geteuid():
        raise StateError(f"{what} is owned by uid {st.st_uid}, not by this daemon (uid {os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateError(f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


class StateStore:
    """Reads and atomically writes the state file in a private directory."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.directory = pathlib.Path(state_dir)
        self.path = self.directory / STATE_FILE_NAME

    def ensure_directory(self) -> None:
        """Create the directory (0700) if missing and check that it is safe."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            st = os.lstat(self.directory)
        except OSError as exc:
            raise StateError(f"cannot stat state directory {self.directory}: {exc}") from exc
        if stat.S_ISLNK(st.st_mode):
            raise StateError(f"state directory {self.directory} is a symbolic link")
        _check_owned_private(st, f"state directory {self.directory}", allow_dir=True)

    def load(self) -> DaemonState:
        """The saved state, or a fresh one when there is no file; StateError when the file is unsafe."""
        self.ensure_directory()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return DaemonState()
        except OSError as exc:  # ELOOP: a symbolic link
            raise StateError(f"cannot open state file {self.path} safely: {exc}") from exc
        with os.fdopen(fd, "rb") as handle:
            _check_owned_private(os.fstat(handle.fileno()), f"state file {self.path}", allow_dir=False)
            raw = handle.read()
        try:
            return decode_state(json.loads(raw))
        except (ValueError, TypeError, KeyError) as exc:
            raise StateError(f"state file {self.path} is corrupt: {exc}") from exc

    def save(self, state: DaemonState) -> None:
        """Write the state atomically (readers see the old or the new file, never a torn one)."""
        self.ensure_directory()
        data = json.dumps(encode_state(state), indent=2, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.directory)
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


def encode_state(state: DaemonState) -> dict[str, Any]:
    """State as JSON-ready data."""
    return {
        "version": SCHEMA_VERSION,
        "budget_w": state.budget_w,
        "targets": {
            eid: {"tokens_per_s": t.tokens_per_s, "ttft_ms": t.ttft_ms, "tpot_ms": t.tpot_ms}
            for eid, t in state.targets.items()
        },
        "original_limits": {
            uuid: {"gpu_index": o.gpu_index, "limit_mw": o.limit_mw} for uuid, o in state.original_limits.items()
        },
    }


def _positive_or_none(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number or null, got {value!r}")
    return float(value)


def decode_state(doc: Any) -> DaemonState:
    """Parse and validate state data (ValueError on anything unexpected)."""
    if not isinstance(doc, dict) or doc.get("version") != SCHEMA_VERSION:
        raise ValueError(f"expected a version {SCHEMA_VERSION} state object")
    targets = {}
    for eid, t in dict(doc.get("targets", {})).items():
        targets[str(eid)] = EngineTargets(
            tokens_per_s=_positive_or_none(t.get("tokens_per_s"), "tokens_per_s"),
            ttft_ms=_positive_or_none(t.get("ttft_ms"), "ttft_ms"),
            tpot_ms=_positive_or_none(t.get("tpot_ms"), "tpot_ms"),
        )
    originals = {}
    for uuid, o in dict(doc.get("original_limits", {})).items():
        index, limit = o["gpu_index"], o["limit_mw"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (index, limit)):
            raise ValueError(f"original limit of {uuid} is malformed")
        originals[str(uuid)] = OriginalLimit(gpu_index=index, limit_mw=limit)
    return DaemonState(
        budget_w=_positive_or_none(doc.get("budget_w"), "budget_w"),
        targets=targets,
        original_limits=originals,
    )
