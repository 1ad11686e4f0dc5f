"""Performance profiles: measured (or modelled) throughput and GPU power over a (power cap, batch) grid.

A profile file is JSON with schema ``pals.profile/v1`` (documented in profiles/README.md). Loading is
strict: any missing, unknown or out-of-range field raises :class:`ProfileError` naming the file and field,
because a silently wrong profile would make the controller mis-provision every engine that serves the model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pals_daemon.errors import PalsError

SCHEMA = "pals.profile/v1"
METHODS = ("measured", "modelled")

_REQUIRED_KEYS = ("schema", "model", "aliases", "gpu", "num_gpus", "parallelism", "source", "method", "points")
_OPTIONAL_KEYS = ("notes", "clock_points")
_POINT_KEYS = ("cap_w", "batch", "tokens_per_s", "gpu_power_w")
_OPTIONAL_POINT_KEYS = ("tpot_ms", "ttft_ms", "modelled")
# Averaged GPU power may overshoot a cap briefly (the cap acts on a moving average); more than this
# factor above the cap means a unit or column mix-up, not measurement noise.
_MAX_POWER_OVER_CAP = 1.25
# No GPU's SM clock is near 10 GHz: a larger clock_mhz is a unit mix-up (kHz, Hz).
_MAX_CLOCK_MHZ = 10_000


class ProfileError(PalsError):
    """A profile file or directory is invalid (the message names the file and the field)."""


@dataclass(frozen=True)
class ProfilePoint:
    """One measured operating point: per-GPU power cap and batch -> engine throughput and per-GPU power."""

    cap_w: float
    batch: int
    tokens_per_s: float
    gpu_power_w: float
    tpot_ms: float | None = None  # median time per output token (inter-token latency), where known
    ttft_ms: float | None = None  # median time to first token, where known
    modelled: bool = False  # True: the numbers come from a model (say which in the profile's notes)
    # Locked SM clock ceiling (MHz) of a point of the clock dimension (Profile.clock_points); None: unlocked.
    clock_mhz: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this point; optional fields only when set."""
        out: dict[str, Any] = {
            # Whole-watt caps print as integers ("cap_w": 150), which is how people write them.
            "cap_w": int(self.cap_w) if self.cap_w.is_integer() else self.cap_w,
            "batch": self.batch,
        }
        if self.clock_mhz is not None:
            out["clock_mhz"] = self.clock_mhz
        out |= {
            "tokens_per_s": self.tokens_per_s,
            "gpu_power_w": self.gpu_power_w,
        }
        if self.tpot_ms is not None:
            out["tpot_ms"] = self.tpot_ms
        if self.ttft_ms is not None:
            out["ttft_ms"] = self.ttft_ms
        if self.modelled:
            out["modelled"] = True
        return out


@dataclass(frozen=True)
class Profile:
    """A served model's throughput/power response on one GPU kind and parallelism."""

    model: str
    aliases: tuple[str, ...]
    gpu: str
    num_gpus: int
    parallelism: str
    source: str
    method: str
    points: tuple[ProfilePoint, ...]
    notes: str = ""
    # The clock dimension (optional): points under a locked SM clock, a full clock x batch grid at each of
    # their caps (each cap and batch one of ``points``'). Kept apart so that cap-only readers see the same grid.
    clock_points: tuple[ProfilePoint, ...] = ()

    @property
    def clocks_mhz(self) -> tuple[int, ...]:
        """The distinct locked clocks of the clock dimension, ascending (empty: no clock dimension)."""
        return tuple(sorted({p.clock_mhz for p in self.clock_points if p.clock_mhz is not None}))

    @property
    def caps_w(self) -> tuple[float, ...]:
        """The distinct measured caps, ascending."""
        return tuple(sorted({p.cap_w for p in self.points}))

    @property
    def batches(self) -> tuple[int, ...]:
        """The distinct measured batch sizes, ascending."""
        return tuple(sorted({p.batch for p in self.points}))

    def names(self) -> tuple[str, ...]:
        """Every name this profile answers to: the model name and its aliases."""
        return (self.model, *self.aliases)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this profile (points sorted by cap, then batch)."""
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "model": self.model,
            "aliases": list(self.aliases),
            "gpu": self.gpu,
            "num_gpus": self.num_gpus,
            "parallelism": self.parallelism,
            "source": self.source,
            "method": self.method,
        }
        if self.notes:
            out["notes"] = self.notes
        out["points"] = [p.to_dict() for p in sorted(self.points, key=lambda p: (p.cap_w, p.batch))]
        if self.clock_points:
            out["clock_points"] = [
                p.to_dict() for p in sorted(self.clock_points, key=lambda p: (p.cap_w, -(p.clock_mhz or 0), p.batch))
            ]
        return out


def dumps_profile(profile: Profile) -> str:
    """Serialize a profile deterministically: header keys one per line, one point per line."""
    data = profile.to_dict()
    lists = {key: data.pop(key) for key in ("points", "clock_points") if key in data}
    lines = ["{"]
    for key, value in data.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    for n, (key, points) in enumerate(lists.items()):
        lines.append(f"  {json.dumps(key)}: [")
        rows = [
            "    " + json.dumps(p, separators=(", ", ": "), allow_nan=False)
            for p in points  # fixed key order from to_dict
        ]
        lines.append(",\n".join(rows))
        lines.append("  ]," if n < len(lists) - 1 else "  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_point(raw: object, where: str, clocked: bool = False) -> ProfilePoint:
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{where}: a point must be an object, got {type(raw).__name__}")
    keys = (*_POINT_KEYS, "clock_mhz") if clocked else _POINT_KEYS
    missing = [k for k in keys if k not in raw]
    unknown = sorted(set(raw) - set(keys) - set(_OPTIONAL_POINT_KEYS))
    if missing or unknown:
        raise ProfileError(f"{where}: missing keys {missing}, unknown keys {unknown}")
    cap_w, batch, tps, power_w = (raw[k] for k in _POINT_KEYS)
    if not _is_number(cap_w) or cap_w <= 0:
        raise ProfileError(f"{where}: cap_w must be a positive finite number, got {cap_w!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ProfileError(f"{where}: batch must be an integer >= 1, got {batch!r}")
    if not _is_number(tps) or tps <= 0:
        raise ProfileError(f"{where}: tokens_per_s must be a positive finite number, got {tps!r}")
    if not _is_number(power_w) or power_w <= 0:
        raise ProfileError(f"{where}: gpu_power_w must be a positive finite number, got {power_w!r}")
    if power_w > cap_w * _MAX_POWER_OVER_CAP:
        raise ProfileError(f"{where}: gpu_power_w {power_w} is far above cap_w {cap_w} (per-GPU watts?)")
    latency: dict[str, float | None] = {}
    for key in ("tpot_ms", "ttft_ms"):
        value = raw.get(key)
        if value is not None and (not _is_number(value) or value <= 0):
            raise ProfileError(f"{where}: {key} must be a positive finite number, got {value!r}")
        latency[key] = None if value is None else float(value)
    modelled = raw.get("modelled", False)
    if not isinstance(modelled, bool):
        raise ProfileError(f"{where}: modelled must be true or false, got {modelled!r}")
    clock = raw.get("clock_mhz")
    if clocked and (not isinstance(clock, int) or isinstance(clock, bool) or not 1 <= clock <= _MAX_CLOCK_MHZ):
        raise ProfileError(f"{where}: clock_mhz must be an integer in [1, {_MAX_CLOCK_MHZ}], got {clock!r}")
    return ProfilePoint(
        cap_w=float(cap_w),
        batch=batch,
        tokens_per_s=float(tps),
        gpu_power_w=float(power_w),
        tpot_ms=latency["tpot_ms"],
        ttft_ms=latency["ttft_ms"],
        modelled=modelled,
        clock_mhz=clock if clocked else None,
    )


def _require_str(data: Mapping[str, Any], key: str, origin: str, allow_empty: bool = False) -> str:
    value = data[key]
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise ProfileError(f"{origin}: {key!r} must be a non-empty string, got {value!r}")
    return value


def profile_from_dict(data: object, origin: str = "<profile>") -> Profile:
    """Validate a decoded JSON object and build a :class:`Profile`; raise ProfileError on any problem."""
    if not isinstance(data, Mapping):
        raise ProfileError(f"{origin}: top level must be an object, got {type(data).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise ProfileError(f"{origin}: missing keys {missing}")
    unknown = sorted(set(data) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if unknown:
        raise ProfileError(f"{origin}: unknown keys {unknown}")
    if data["schema"] != SCHEMA:
        raise ProfileError(f"{origin}: schema must be {SCHEMA!r}, got {data['schema']!r}")
    model = _require_str(data, "model", origin)
    gpu = _require_str(data, "gpu", origin)
    parallelism = _require_str(data, "parallelism", origin)
    source = _require_str(data, "source", origin)
    method = data["method"]
    if method not in METHODS:
        raise ProfileError(f"{origin}: method must be one of {list(METHODS)}, got {method!r}")
    notes = data.get("notes", "")
    if not isinstance(notes, str):
        raise ProfileError(f"{origin}: 'notes' must be a string")
    aliases = data["aliases"]
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise ProfileError(f"{origin}: 'aliases' must be a list of non-empty strings")
    num_gpus = data["num_gpus"]
    if not isinstance(num_gpus, int) or isinstance(num_gpus, bool) or num_gpus < 1:
        raise ProfileError(f"{origin}: 'num_gpus' must be an integer >= 1, got {num_gpus!r}")
    raw_points = data["points"]
    if not isinstance(raw_points, list) or not raw_points:
        raise ProfileError(f"{origin}: 'points' must be a non-empty list")
    points = tuple(_parse_point(p, f"{origin}: points[{i}]") for i, p in enumerate(raw_points))
    if method == "measured" and any(p.modelled for p in points):
        raise ProfileError(f"{origin}: method 'measured' but some points are modelled (use method 'modelled')")
    seen: set[tuple[float, int]] = set()
    for p in points:
        if (p.cap_w, p.batch) in seen:
            raise ProfileError(f"{origin}: duplicate point cap_w={p.cap_w} batch={p.batch}")
        seen.add((p.cap_w, p.batch))
    caps = sorted({p.cap_w for p in points})
    batches = sorted({p.batch for p in points})
    # The performance model interpolates bilinearly, which needs every cell of the grid.
    if len(caps) < 2 or len(batches) < 2:
        raise ProfileError(f"{origin}: points must span at least 2 caps and 2 batch sizes")
    absent = [(c, b) for c in caps for b in batches if (c, b) not in seen]
    if absent:
        raise ProfileError(f"{origin}: points must form a full cap x batch grid; missing {absent[:5]}")
    clock_points = _parse_clock_points(data.get("clock_points", []), origin, set(caps), batches)
    if method == "measured" and any(p.modelled for p in clock_points):
        raise ProfileError(f"{origin}: method 'measured' but some clock points are modelled (use method 'modelled')")
    return Profile(
        model=model,
        aliases=tuple(aliases),
        gpu=gpu,
        num_gpus=num_gpus,
        parallelism=parallelism,
        source=source,
        method=method,
        points=points,
        notes=notes,
        clock_points=clock_points,
    )


def _parse_clock_points(
    raw_points: object, origin: str, caps: set[float], batches: list[int]
) -> tuple[ProfilePoint, ...]:
    """The clock dimension: points with clock_mhz, a full clock x batch grid at each cap they name."""
    if not isinstance(raw_points, list):
        raise ProfileError(f"{origin}: 'clock_points' must be a list")
    points = tuple(_parse_point(p, f"{origin}: clock_points[{i}]", clocked=True) for i, p in enumerate(raw_points))
    seen: set[tuple[float, int | None, int]] = set()
    for p in points:
        if p.cap_w not in caps or p.batch not in batches:
            raise ProfileError(f"{origin}: clock point cap_w={p.cap_w} batch={p.batch} is not on the cap x batch grid")
        if (p.cap_w, p.clock_mhz, p.batch) in seen:
            raise ProfileError(
                f"{origin}: duplicate clock point cap_w={p.cap_w} clock_mhz={p.clock_mhz} batch={p.batch}"
            )
        seen.add((p.cap_w, p.clock_mhz, p.batch))
    for cap, clock in {(p.cap_w, p.clock_mhz) for p in points}:
        absent = [b for b in batches if (cap, clock, b) not in seen]
        if absent:
            raise ProfileError(f"{origin}: clock points at cap_w={cap} clock_mhz={clock} lack batches {absent[:5]}")
    return points


def load_profile(path: str | Path) -> Profile:
    """Read and strictly validate one profile JSON file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from exc
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise ProfileError(f"{path}: not valid JSON: {exc}") from exc
    return profile_from_dict(data, origin=str(path))


def _reject_constant(name: str) -> float:
    # json accepts NaN/Infinity by default; a profile must not contain them.
    raise ValueError(f"non-finite constant {name}")


def _name_key(name: str) -> str:
    return name.strip().lower()


def _basename(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _gpu_key(gpu: str) -> str:
    # "NVIDIA A100-SXM4-80GB" and "A100-SXM4" compare as "a100sxm480gb" / "a100sxm4".
    key = re.sub(r"[^a-z0-9]", "", gpu.lower())
    return key.removeprefix("nvidia")


def gpu_matches(profile_gpu: str, gpu_kind: str) -> bool:
    """True when a GPU kind (e.g. an NVML name) names the profile's GPU or a variant of it."""
    a, b = _gpu_key(profile_gpu), _gpu_key(gpu_kind)
    return bool(a) and bool(b) and (a in b or b in a)


class ProfileRegistry:
    """The loaded profiles, looked up by model name or alias (case-insensitive, also by HF basename)."""

    def __init__(self, profiles: Iterable[Profile] = ()) -> None:
        self._profiles: list[Profile] = []
        self._by_name: dict[str, list[Profile]] = {}
        for profile in profiles:
            self.add(profile)

    def add(self, profile: Profile) -> None:
        """Register a profile; raise ProfileError if a name already maps to another profile on the same GPU."""
        keys = {_name_key(n) for n in profile.names()} | {_name_key(_basename(n)) for n in profile.names()}
        for key in keys:
            for other in self._by_name.get(key, []):
                if gpu_matches(other.gpu, profile.gpu) and other.parallelism == profile.parallelism:
                    raise ProfileError(
                        f"name {key!r} is claimed by two profiles on {profile.gpu} {profile.parallelism}: "
                        f"{other.model!r} and {profile.model!r}"
                    )
        self._profiles.append(profile)
        for key in sorted(keys):
            self._by_name.setdefault(key, []).append(profile)

    @property
    def profiles(self) -> tuple[Profile, ...]:
        """All registered profiles in registration order."""
        return tuple(self._profiles)

    def __len__(self) -> int:
        return len(self._profiles)

    def find(self, model_name: str, gpu_kind: str | None = None) -> Profile | None:
        """The profile for ``model_name`` (exact name, alias, or the part after the last '/'), or None.

        With ``gpu_kind`` only profiles measured on that GPU kind qualify: another GPU's power numbers
        would be wrong, so no profile is better than a mismatched one.
        """
        for key in (_name_key(model_name), _name_key(_basename(model_name))):
            for profile in self._by_name.get(key, []):
                if gpu_kind is None or gpu_matches(profile.gpu, gpu_kind):
                    return profile
        return None


def load_profiles(directory: str | Path) -> ProfileRegistry:
    """Load every ``*.json`` profile in ``directory`` (sorted by file name); any invalid file is an error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ProfileError(f"{directory}: not a directory")
    return ProfileRegistry(load_profile(path) for path in sorted(directory.glob("*.json")))


def load_profile_tree(directory: str | Path) -> ProfileRegistry:
    """Profiles in ``directory`` and its immediate subdirectories (the package ships A100 at the top, H100 in h100/).

    Any invalid file is an error: a half-read profile set would silently change what the controller does.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ProfileError(f"{directory}: not a directory")
    paths = sorted(directory.glob("*.json")) + sorted(directory.glob("*/*.json"))
    return ProfileRegistry(load_profile(path) for path in paths)
