"""Build pals.profile/v1 JSON files from the A100 MoE TP4 power-cap sweep CSV.

Usage: ``python -m pals_daemon.model.import_csv data/a100_moe_tp4_power_cap_sweep.csv profiles/``

The CSV (data/a100_moe_tp4_power_cap_sweep.csv) is the PALS first author's public sweep, repository
``mrhankendi/AI_LLM`` file ``moe_summary_tp4.xlsx`` converted to CSV (see /work/shared/data/README.md).
Columns used: gpu, model, tp, cap_w, batch, avg_Tokens_per_s, avg_gpu_power (per-GPU W).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from pals_daemon.model.profile import Profile, ProfileError, ProfilePoint, dumps_profile, profile_from_dict

CSV_ORIGIN = "mrhankendi/AI_LLM moe_summary_tp4.xlsx"

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


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise ProfileError(f"{where}: not a number: {text!r}") from exc


def profiles_from_csv(csv_path: str | Path, source_name: str | None = None) -> list[Profile]:
    """One validated profile per (model, gpu, tp) in the sweep CSV, sorted by model name."""
    csv_path = Path(csv_path)
    source_name = source_name or f"data/{csv_path.name}"
    groups: dict[tuple[str, str, int], list[tuple[int, ProfilePoint]]] = {}
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in _REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ProfileError(f"{csv_path}: missing columns {missing}")
        # Row numbers are file line numbers (the header is line 1) so that a profile can cite them.
        for line_no, row in enumerate(reader, start=2):
            where = f"{csv_path}:{line_no}"
            tp = int(_number(row["tp"], where))
            batch = _number(row["batch"], where)
            if batch != int(batch):
                raise ProfileError(f"{where}: batch {batch} is not an integer")
            point = ProfilePoint(
                cap_w=_number(row["cap_w"], where),
                batch=int(batch),
                tokens_per_s=round(_number(row["avg_Tokens_per_s"], where), _DECIMALS),
                gpu_power_w=round(_number(row["avg_gpu_power"], where), _DECIMALS),
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


def profile_filename(profile: Profile) -> str:
    """File name for a profile: ``<model>.<gpu>.<parallelism>.json`` in lower case."""
    return f"{profile.model}.{profile.gpu}.{profile.parallelism}.json".lower().replace("/", "_")


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


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="power-cap sweep CSV")
    parser.add_argument("out_dir", type=Path, help="directory for the profile JSON files")
    args = parser.parse_args(argv)
    try:
        paths = write_profiles(profiles_from_csv(args.csv), args.out_dir)
    except (OSError, ProfileError) as exc:
        print(f"import_csv: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
