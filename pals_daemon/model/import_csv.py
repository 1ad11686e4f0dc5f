"""Build pals.profile/v1 JSON files from the A100 power-cap sweep CSV and the ML.ENERGY v3 batch sweep CSV.

Usage: ``pals-profile import CSV OUT_DIR [--format a100-sweep|mlenergy]`` (pals_daemon/cli/profile.py), or
``python -m pals_daemon.model.import_csv data/a100_moe_tp4_power_cap_sweep.csv profiles/``.

a100-sweep: data/a100_moe_tp4_power_cap_sweep.csv, the PALS first author's public sweep, repository
``mrhankendi/AI_LLM`` file ``moe_summary_tp4.xlsx`` converted to CSV (data/README.md). Columns used: gpu,
model, tp, cap_w, batch, avg_Tokens_per_s, avg_gpu_power (per-GPU W). Every point is measured.

mlenergy: data/mlenergy_v3_vllm_batch_sweep.csv, ML.ENERGY Benchmark v3 (ml-energy/leaderboard,
Apache-2.0): vLLM 0.11.1 at the default 700 W limit on H100, sweeping max_num_seqs. The batch dimension is
measured; the cap dimension is MODELLED (see :func:`profiles_from_mlenergy_csv`).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from pals_daemon.model.clock_points import h100_clock_points
from pals_daemon.model.profile import Profile, ProfileError, ProfilePoint, dumps_profile, profile_from_dict

CSV_ORIGIN = "mrhankendi/AI_LLM moe_summary_tp4.xlsx"
MLENERGY_ORIGIN = "ml-energy/leaderboard public/data/models/*.json, Apache-2.0"
FORMATS = ("a100-sweep", "mlenergy")

# Hugging Face names of the models in the sweep (model cards of the listed repositories).
HF_ALIASES: dict[str, tuple[str, ...]] = {
    "deepseek-moe-16b-base": ("deepseek-ai/deepseek-moe-16b-base",),
    "phi-3.5-moe-instruct": ("microsoft/Phi-3.5-MoE-instruct",),
    "mixtral-8x7b-instruct": ("mistralai/Mixtral-8x7B-Instruct-v0.1",),
    "olmoe-1b-7b": ("allenai/OLMoE-1B-7B-0924",),
    "qwen1.5-moe-a2.7b": ("Qwen/Qwen1.5-MoE-A2.7B",),
}

# Rounding keeps the files readable; it is far below the sweep's run-to-run noise (several %).
_DECIMALS = 3
_REQUIRED_COLUMNS = ("gpu", "model", "tp", "cap_w", "batch", "avg_Tokens_per_s", "avg_gpu_power")
_MLENERGY_COLUMNS = (
    "model_id",
    "task",
    "architecture",
    "gpu_model",
    "num_gpus",
    "tp",
    "ep",
    "dp",
    "max_num_seqs",
    "avg_power_watts",
    "output_throughput_tok_s",
    "median_itl_ms",
)

# --- H100 constants (data/gpu_power_limits.csv row H100-SXM5-80GB unless stated) ---
H100_GPU = "H100 80GB HBM3"  # NVML name of the H100 SXM5 80GB (the 700 W part); matches it, not NVL/PCIe
H100_MIN_CAP_W = 200.0  # min_power_limit_w
H100_MAX_CAP_W = 700.0  # max_power_limit_w = default_power_limit_w: the limit ML.ENERGY v3 measured at
H100_CAP_STEP_W = 50.0  # modelled grid spacing (a choice, not a measurement)
H100_IDLE_W = 73.5  # idle_power_w 72-75, midpoint: the DVFS model's floor
CLOCK_NOTES = (
    " Clock dimension MODELLED (clock_points, every one modelled=true; at the 700 W cap): the measured 700 W point "
    "scaled by the ratio of step time and power that the fitted decode physics (pals_daemon/sim/fitted.py, "
    "pals_daemon/model/clock_points.py) gives between the locked clock and the top clock (1980 MHz) at that batch."
)
A100_IDLE_W = 60.0  # data/gpu_power_limits.csv row A100-SXM4-80GB idle_power_w 52-68, midpoint
# Throughput under a binding cap relative to uncapped, as a function of x = (cap - P_idle) / (P_uncapped -
# P_idle): g(x) = (softmin(1, x/KNEE) / softmin(1, 1/KNEE))^EXPONENT, softmin of sharpness SHARPNESS.
# Fitted (fit_dvfs_transfer) on every capped point of the measured A100 MoE sweep (data/
# a100_moe_tp4_power_cap_sweep.csv, 5 models, uncapped = the 400 W point): 3.3% MAPE across all models,
# against 7.7% for a pure power law. Decode is memory-bound and loses little until the cap bites deep
# (g(0.8) = 0.98, g(0.5) = 0.76). Transferring it to H100 is a MODELLED assumption.
DVFS_KNEE = 0.663
DVFS_SHARPNESS = 7.37
DVFS_EXPONENT = 0.938
# Text tasks in order of preference: one task per configuration, the first one present.
MLENERGY_TASKS = ("lm-arena-chat", "gpqa", "sourcegraph-fim")


def _row_ranges(rows: list[int]) -> str:
    rows = sorted(rows)
    parts: list[str] = []
    start = prev = rows[0]
    for r in rows[1:]:
        if r != prev + 1:
            parts.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = r
        prev = r
    parts.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(parts)


def _number(text: str | None, where: str, column: str = "") -> float:
    label = f"{where}: {column}" if column else where
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"{label}: not a number: {text!r}") from exc
    if not math.isfinite(value):
        raise ProfileError(f"{label}: not a finite number: {text!r}")
    if value < 0:
        raise ProfileError(f"{label}: negative: {text!r}")
    return value


def _read_csv(csv_path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows with their file line numbers (the header is line 1); ProfileError on a missing column."""
    try:
        with csv_path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise ProfileError(f"{csv_path}: missing columns {missing}")
            return list(enumerate(reader, start=2))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ProfileError(f"{csv_path}: cannot read: {exc}") from exc


def detect_format(csv_path: str | Path) -> str:
    """``a100-sweep`` or ``mlenergy`` from the CSV header; ProfileError if neither."""
    try:
        with Path(csv_path).open(newline="", encoding="utf-8") as fh:
            header = set(next(csv.reader(fh), []))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ProfileError(f"{csv_path}: cannot read: {exc}") from exc
    if set(_REQUIRED_COLUMNS) <= header:
        return "a100-sweep"
    if set(_MLENERGY_COLUMNS) <= header:
        return "mlenergy"
    raise ProfileError(f"{csv_path}: header matches neither format {list(FORMATS)}")


def profiles_from_csv(csv_path: str | Path, source_name: str | None = None) -> list[Profile]:
    """One validated profile per (model, gpu, tp) in the sweep CSV, sorted by model name."""
    csv_path = Path(csv_path)
    source_name = source_name or f"data/{csv_path.name}"
    groups: dict[tuple[str, str, int], list[tuple[int, ProfilePoint]]] = {}
    # Row numbers are file line numbers (the header is line 1) so that a profile can cite them.
    for line_no, row in _read_csv(csv_path, _REQUIRED_COLUMNS):
        where = f"{csv_path}:{line_no}"
        tp = int(_number(row["tp"], where, "tp"))
        batch = _number(row["batch"], where, "batch")
        if batch != int(batch):
            raise ProfileError(f"{where}: batch {batch} is not an integer")
        point = ProfilePoint(
            cap_w=_number(row["cap_w"], where, "cap_w"),
            batch=int(batch),
            tokens_per_s=round(_number(row["avg_Tokens_per_s"], where, "avg_Tokens_per_s"), _DECIMALS),
            gpu_power_w=round(_number(row["avg_gpu_power"], where, "avg_gpu_power"), _DECIMALS),
        )
        groups.setdefault((row["model"], row["gpu"], tp), []).append((line_no, point))
    profiles = []
    for (model, gpu, tp), rows in sorted(groups.items()):
        data = {
            "schema": "pals.profile/v1",
            "model": model,
            "aliases": list(HF_ALIASES.get(model, ())),
            "gpu": gpu,
            "num_gpus": tp,
            "parallelism": f"tp{tp}",
            "source": f"{source_name} rows {_row_ranges([r for r, _ in rows])} (from {CSV_ORIGIN})",
            "method": "measured",
            "points": [
                {
                    "cap_w": p.cap_w,
                    "batch": p.batch,
                    "tokens_per_s": p.tokens_per_s,
                    "gpu_power_w": p.gpu_power_w,
                }
                for _, p in rows
            ],
        }
        # Validate through the same path as loading, so an importer bug cannot write a bad file.
        profiles.append(profile_from_dict(data, origin=f"{csv_path} model {model}"))
    return profiles


def _parallelism(tp: int, ep: int, dp: int) -> str:
    return f"tp{tp}" + (f"-ep{ep}" if ep > 1 else "") + (f"-dp{dp}" if dp > 1 else "")


def dvfs_throughput_fraction(
    x: float, knee: float = DVFS_KNEE, sharpness: float = DVFS_SHARPNESS, exponent: float = DVFS_EXPONENT
) -> float:
    """Modelled throughput / uncapped throughput at dynamic-power fraction ``x`` (1 at x = 1)."""

    def softmin1(v: float) -> float:
        return v * (1.0 + v**sharpness) ** (-1.0 / sharpness)

    return (softmin1(max(x, 1e-3) / knee) / softmin1(1.0 / knee)) ** exponent


def fit_dvfs_transfer(profiles: Sequence[Profile], idle_w: float = A100_IDLE_W) -> tuple[float, float, float]:
    """(knee, sharpness, exponent) of :func:`dvfs_throughput_fraction` fitted to measured cap sweeps."""
    import numpy as np

    from pals_daemon.model.perf_model import _levenberg_marquardt

    xs, ys = [], []
    for profile in profiles:
        top_cap = max(profile.caps_w)
        by_key = {(p.cap_w, p.batch): p for p in profile.points}
        for p in profile.points:
            top = by_key[(top_cap, p.batch)]
            if p.cap_w < top_cap:
                xs.append((p.cap_w - idle_w) / (top.gpu_power_w - idle_w))
                ys.append(p.tokens_per_s / top.tokens_per_s)
    x, log_y = np.array(xs), np.log(np.array(ys))

    def resid(th: np.ndarray) -> np.ndarray:
        knee, n, a = np.exp(th)
        return np.log([dvfs_throughput_fraction(v, knee, n, a) for v in x]) - log_y

    with np.errstate(all="ignore"):
        th, _ = _levenberg_marquardt(resid, np.array([np.log(0.6), np.log(4.0), 0.0]))
    knee, n, a = (float(v) for v in np.exp(th))
    return knee, n, a


def modelled_h100_point(
    cap_w: float, batch: int, tokens_per_s: float, gpu_power_w: float, tpot_ms: float
) -> ProfilePoint:
    """A point at per-GPU cap ``cap_w`` from one measured at 700 W (throughput, per-GPU power, ITL).

    MODELLED cap dimension: a cap at or above the measured draw does not bind (same throughput and power);
    below it the driver holds power at the cap, the clock falls, and throughput follows
    T = T_700 * dvfs_throughput_fraction((cap - P_idle) / (P_700 - P_idle)) (fitted on the measured A100
    sweep: MoE decode is memory-bound and loses little until the cap bites deep; GreenLLM arXiv 2508.16449,
    Maliakel et al. arXiv 2501.08219). TPOT scales inversely with throughput at a fixed batch.
    """
    measured = cap_w == H100_MAX_CAP_W
    if cap_w >= gpu_power_w:
        tput, power, tpot = tokens_per_s, gpu_power_w, tpot_ms
    else:
        frac = dvfs_throughput_fraction((cap_w - H100_IDLE_W) / (gpu_power_w - H100_IDLE_W))
        tput, power, tpot = tokens_per_s * frac, cap_w, tpot_ms / frac
    return ProfilePoint(
        cap_w=cap_w,
        batch=batch,
        tokens_per_s=round(tput, _DECIMALS),
        gpu_power_w=round(power, _DECIMALS),
        tpot_ms=round(tpot, _DECIMALS),
        modelled=not measured,
    )


def profiles_from_mlenergy_csv(
    csv_path: str | Path,
    source_name: str | None = None,
    gpu_model: str = "H100",
    architecture: str = "MoE",
) -> list[Profile]:
    """One profile per (model, num_gpus, tp, ep, dp) of ``architecture`` on ``gpu_model``, sorted by file name.

    Batch dimension measured (max_num_seqs at the 700 W default limit); per-GPU power = avg_power_watts /
    num_gpus (the CSV's power is the total); throughput = output_throughput_tok_s; tpot_ms = median_itl_ms.
    One task per configuration: the first of MLENERGY_TASKS present; rows repeating a max_num_seqs within
    it are averaged. Configurations with fewer than 2 batch sizes are skipped. Cap dimension: MODELLED from
    200 to 700 W in 50 W steps with :func:`modelled_h100_point`.
    """
    if gpu_model != "H100":
        raise ProfileError(f"{csv_path}: only gpu_model H100 has power-limit constants, got {gpu_model!r}")
    csv_path = Path(csv_path)
    source_name = source_name or f"data/{csv_path.name}"
    configs: dict[tuple[str, int, int, int, int], dict[str, list[tuple[int, dict[str, str]]]]] = {}
    for line_no, row in _read_csv(csv_path, _MLENERGY_COLUMNS):
        if row["gpu_model"] != gpu_model or row["architecture"] != architecture or row["task"] not in MLENERGY_TASKS:
            continue
        where = f"{csv_path}:{line_no}"
        key = (
            row["model_id"],
            *(int(_number(row[c], where, c)) for c in ("num_gpus", "tp", "ep", "dp")),
        )
        configs.setdefault(key, {}).setdefault(row["task"], []).append((line_no, row))  # type: ignore[arg-type]
    caps = [H100_MIN_CAP_W + k * H100_CAP_STEP_W for k in range(int((H100_MAX_CAP_W - H100_MIN_CAP_W) / 50) + 1)]
    profiles = []
    for (model_id, num_gpus, tp, ep, dp), tasks in configs.items():
        if num_gpus < 1:
            raise ProfileError(f"{csv_path}: {model_id}: num_gpus must be >= 1")
        task = next(t for t in MLENERGY_TASKS if t in tasks)
        by_batch: dict[int, list[tuple[float, float, float]]] = {}
        lines = []
        for line_no, row in tasks[task]:
            where = f"{csv_path}:{line_no}"
            batch = _number(row["max_num_seqs"], where, "max_num_seqs")
            if batch != int(batch) or batch < 1:
                raise ProfileError(f"{where}: max_num_seqs {row['max_num_seqs']!r} is not an integer >= 1")
            values = tuple(
                _number(row[c], where, c) for c in ("output_throughput_tok_s", "avg_power_watts", "median_itl_ms")
            )
            if min(values) <= 0:
                raise ProfileError(f"{where}: throughput, power and ITL must be > 0")
            by_batch.setdefault(int(batch), []).append(values)  # type: ignore[arg-type]
            lines.append(line_no)
        if len(by_batch) < 2:
            continue
        points = []
        measured = []
        for batch, vals in sorted(by_batch.items()):
            tput, total_w, itl = (sum(v[k] for v in vals) / len(vals) for k in range(3))
            power_w = total_w / num_gpus
            if power_w > H100_MAX_CAP_W * 1.25:
                raise ProfileError(f"{csv_path}: {model_id} batch {batch}: {power_w:.0f} W per GPU (total power?)")
            points.extend(modelled_h100_point(c, batch, tput, power_w, itl) for c in caps)
            measured.append((batch, tput, power_w, itl))
        clock_points = h100_clock_points(model_id, num_gpus, H100_MAX_CAP_W, measured)
        model = model_id.rsplit("/", 1)[-1].lower()
        data = {
            "schema": "pals.profile/v1",
            "model": model,
            "aliases": [model_id],
            "gpu": H100_GPU,
            "num_gpus": num_gpus,
            "parallelism": _parallelism(tp, ep, dp),
            "source": f"{source_name} rows {_row_ranges(lines)}, task {task} ({MLENERGY_ORIGIN})",
            "method": "modelled",
            "notes": (
                f"Batch dimension MEASURED by ML.ENERGY v3 (vLLM 0.11.1, H100 SXM5, max_num_seqs sweep, task {task}) "
                "at the 700 W default limit: the 700 W points are measured (tokens_per_s = output_throughput_tok_s, "
                "gpu_power_w = avg_power_watts / num_gpus, tpot_ms = median_itl_ms; repeated runs averaged). "
                "Cap dimension MODELLED (points with modelled=true): a cap at or above the measured draw does not "
                "bind; below it power = cap and throughput = T_700 * g(x), x = (cap - 73.5 W) / (P_700 - 73.5 W), "
                f"g(x) = (softmin(1, x/{DVFS_KNEE}) / softmin(1, 1/{DVFS_KNEE}))^{DVFS_EXPONENT} (sharpness "
                f"{DVFS_SHARPNESS}; fitted on the measured A100 MoE sweep, 3.3% MAPE; idle 73.5 W from "
                "data/gpu_power_limits.csv; decode memory-bound, loses little until the cap bites deep: "
                "GreenLLM arXiv 2508.16449, Maliakel et al. arXiv 2501.08219); "
                "tpot scales as 1/throughput. No TTFT in the source." + (CLOCK_NOTES if clock_points else "")
            ),
            "points": [p.to_dict() for p in points],
        }
        if clock_points:
            data["clock_points"] = [p.to_dict() for p in clock_points]
        profiles.append(profile_from_dict(data, origin=f"{csv_path} model {model_id}"))
    return sorted(profiles, key=profile_filename)


def profile_filename(profile: Profile) -> str:
    """File name for a profile: ``<model>.<gpu>.<parallelism>.json`` in lower case, spaces as dashes."""
    return f"{profile.model}.{profile.gpu}.{profile.parallelism}.json".lower().replace("/", "_").replace(" ", "-")


def write_profiles(profiles: Sequence[Profile], out_dir: str | Path) -> list[Path]:
    """Write each profile to ``out_dir`` (created if needed); return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for profile in profiles:
        path = out_dir / profile_filename(profile)
        path.write_text(dumps_profile(profile), encoding="utf-8")
        paths.append(path)
    return paths


def build_profiles(csv_path: str | Path, fmt: str = "auto", models: Sequence[str] = ()) -> list[Profile]:
    """Profiles from a CSV of format ``fmt`` (or detected), keeping those whose name contains any of ``models``."""
    if fmt == "auto":
        fmt = detect_format(csv_path)
    if fmt == "a100-sweep":
        profiles = profiles_from_csv(csv_path)
    elif fmt == "mlenergy":
        profiles = profiles_from_mlenergy_csv(csv_path)
    else:
        raise ProfileError(f"unknown format {fmt!r}; expected one of {['auto', *FORMATS]}")
    if models:
        wanted = [m.lower() for m in models]
        profiles = [p for p in profiles if any(w in n.lower() for w in wanted for n in p.names())]
        if not profiles:
            raise ProfileError(f"{csv_path}: no profile matches --model {list(models)}")
    if not profiles:
        raise ProfileError(f"{csv_path}: no rows to build a profile from")
    return profiles


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``pals-profile import`` (shared with ``python -m pals_daemon.model.import_csv``)."""
    parser.add_argument("csv", type=Path, help="sweep CSV (a100-sweep or mlenergy format)")
    parser.add_argument("out_dir", type=Path, help="directory for the profile JSON files")
    parser.add_argument("--format", dest="fmt", choices=("auto", *FORMATS), default="auto", help="CSV format")
    parser.add_argument(
        "--model", action="append", default=[], help="keep profiles whose name contains this (repeatable)"
    )


def run_import(args: argparse.Namespace, prog: str) -> int:
    """Build and write the profiles; one-line error and exit status 1 on bad input."""
    try:
        paths = write_profiles(build_profiles(args.csv, args.fmt, args.model), args.out_dir)
    except (OSError, ProfileError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_import_arguments(parser)
    return run_import(parser.parse_args(argv), "import_csv")


if __name__ == "__main__":
    raise SystemExit(main())
