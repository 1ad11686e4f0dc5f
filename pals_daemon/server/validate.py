"""Validation of every field that arrives over gRPC: proto doubles accept NaN and Inf, so check them all."""

from __future__ import annotations

import math
import re

from pals_daemon.control.types import EngineTargets
from pals_daemon.errors import InvalidRequestError

ENGINE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
MAX_MODEL_NAME_CHARS = 256
# Far above any real engine (vLLM's largest documented max_num_seqs is 1024-ish); a guard against garbage.
MAX_NUM_SEQS = 1 << 16
MAX_NUM_BATCHED_TOKENS = 1 << 24
MAX_RAMP_S = 86_400.0
MAX_TARGET_TOKENS_PER_S = 1e9
MAX_SLO_MS = 3_600_000.0
# Smallest target (tokens/s or ms; chosen): below it a target means nothing, and a denormal like 5e-324
# overflowed the controller's throughput/target ratio (found by tests/server/test_fuzz.py).
MIN_TARGET = 1e-3
# Shortest non-empty report window (chosen): an engine step takes milliseconds.
MIN_WINDOW_S = 1e-6
# Finished requests in one StepReport: the client sends at most 10,000 (pals_daemon/vllm/client.py). Each
# costs ~6 us to validate (2-core CI machine), so this also bounds one report's event-loop time (~60 ms).
MAX_FINISHED_PER_REPORT = 10_000
# Per-report counters (chosen guards, each far above any real engine: an H100 decodes ~1e4 tokens/s, so
# 2^32 tokens is hours of work in one report). uint64 fields would otherwise let one report claim 1.8e19.
MAX_TOKENS_PER_REPORT = 1 << 32
MAX_COUNT_PER_REPORT = 1 << 24  # steps, running, waiting, arrived requests
MAX_EXPERT_LAYERS = 1024
# Expert counters in one ExpertLoadReport, all layers together: 61 layers x 256 experts (DeepSeek-V3) is
# 15,616; 4x that leaves room. Checked (by length, O(layers)) before the counters are summed (~0.3 us each):
# a report of a million zero counters cost ~300 ms of event-loop time.
MAX_EXPERT_ENTRIES = 1 << 16
MAX_CLIENT_VERSION_CHARS = 128
# NVML UUIDs are "GPU-" + 36 characters (MIG: "MIG-" + 36); the rest is a guard.
MAX_GPU_UUID_CHARS = 96
MAX_GPUS_PER_ENGINE = 64
# Engine ids with targets (persisted and in every status): chosen as 16x the engines of the largest node (64 GPUs,
# one engine each), leaving room for ids of engines that came and went.
MAX_TARGET_ENGINES = 1024
# Error messages quote at most this much of a bad value: gRPC clients refuse trailing metadata over 16 KiB,
# so echoing a 1 MiB field would turn a clear INVALID_ARGUMENT into an opaque RESOURCE_EXHAUSTED.
MAX_QUOTED_CHARS = 80


def finite(value: float, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` if finite and within [low, high], else InvalidRequestError naming the field."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be within [{low:g}, {high:g}], got {value:g}")
    return float(value)


def count(value: int, name: str, high: int) -> int:
    """``value`` if within [0, high], else InvalidRequestError naming the field."""
    if not 0 <= value <= high:
        raise InvalidRequestError(f"{name} must be within [0, {high}], got {value}")
    return int(value)


def quoted(value: str) -> str:
    """``value`` for an error message: repr'd, and cut short when long."""
    if len(value) <= MAX_QUOTED_CHARS:
        return repr(value)
    return f"{value[:MAX_QUOTED_CHARS]!r}... ({len(value)} characters)"


def engine_id(value: str) -> str:
    """A well-formed engine id (letters, digits, '.', '_', ':', '-'; at most 64 characters)."""
    if not ENGINE_ID_PATTERN.fullmatch(value):
        raise InvalidRequestError(
            f"engine_id {quoted(value)} is not 1-64 characters of letters, digits, '.', '_', ':' or '-'"
        )
    return value


def gpu_uuids(values: list[str], name: str = "gpu_uuids") -> list[str]:
    """GPU UUIDs of a plausible length and count (checked before they are looked up and quoted)."""
    if len(values) > MAX_GPUS_PER_ENGINE:
        raise InvalidRequestError(f"{name}: at most {MAX_GPUS_PER_ENGINE}, got {len(values)}")
    for value in values:
        if not 0 < len(value) <= MAX_GPU_UUID_CHARS or not value.isprintable():
            raise InvalidRequestError(f"{name}: {quoted(value)} is not a GPU UUID")
    return values


def targets(tokens_per_s: float | None, ttft_ms: float | None, tpot_ms: float | None) -> EngineTargets:
    """Validated engine targets (each optional, each finite and > 0)."""
    return EngineTargets(
        tokens_per_s=None if tokens_per_s is None else _positive(tokens_per_s, "tokens_per_s", MAX_TARGET_TOKENS_PER_S),
        ttft_ms=None if ttft_ms is None else _positive(ttft_ms, "ttft_ms", MAX_SLO_MS),
        tpot_ms=None if tpot_ms is None else _positive(tpot_ms, "tpot_ms", MAX_SLO_MS),
    )


def _positive(value: float, name: str, high: float) -> float:
    value = finite(value, name, 0.0, high)
    if value < MIN_TARGET:
        raise InvalidRequestError(f"{name} must be > 0 (at least {MIN_TARGET:g}), got {value:g}")
    return value
