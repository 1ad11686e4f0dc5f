"""Leave-one-point-out accuracy of the power-performance model on the shipped A100 sweep: table + JSON.

Usage: ``python bench/model_accuracy.py [--profiles profiles/] [--json bench/results/model_accuracy.json]``
Bar: the PALS paper's random forest, 6.8% throughput / 4.5% power MAPE (arXiv 2605.21427); goal <= 5% / 3%.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pals_daemon.model.accuracy import accuracy_report  # noqa: E402
from pals_daemon.model.profile import load_profiles  # noqa: E402

PAPER = {"tput_mape_pct": 6.8, "power_mape_pct": 4.5}  # PALS random forest, arXiv 2605.21427
GOAL = {"tput_mape_pct": 5.0, "power_mape_pct": 3.0}  # issue 3, "Model accuracy"


def _row(name: str, s: dict[str, dict[str, float]]) -> str:
    cells = [f"{name:<24}"]
    for part in ("all", "interior", "edge"):
        x = s.get(part)
        cells.append(f"{x['tput_mape_pct']:6.2f} {x['power_mape_pct']:6.2f}" if x else f"{'-':>6} {'-':>6}")
    return " | ".join(cells)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table and write the JSON; exit 1 if the dvfs-fit misses the goal."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=Path, default=ROOT / "profiles")
    parser.add_argument("--gpu", default="A100-SXM4", help="only profiles of this GPU kind (measured grid)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "model_accuracy.json")
    args = parser.parse_args(argv)
    profiles = [p for p in load_profiles(args.profiles).profiles if p.gpu == args.gpu and p.method == "measured"]
    start = time.perf_counter()
    report = accuracy_report(profiles)
    elapsed_s = time.perf_counter() - start
    head = f"{'model':<24} | {'all T%':>6} {'P%':>6} | {'int T%':>6} {'P%':>6} | {'edge T%':>6} {'P%':>6}"
    for method, res in report.items():
        print(f"\nleave-one-point-out MAPE, method {method} ({len(profiles)} profiles, {args.gpu})")
        print(head)
        print("-" * len(head))
        for model, s in res["models"].items():  # type: ignore[index]
            print(_row(model, s))
        print("-" * len(head))
        print(_row("overall", res["overall"]))  # type: ignore[index]
    print(f"\nPALS paper (random forest): {PAPER['tput_mape_pct']}% / {PAPER['power_mape_pct']}%; goal <= 5% / 3%")
    overall = report["dvfs-fit"]["overall"]["all"]  # type: ignore[index]
    ok = overall["tput_mape_pct"] <= GOAL["tput_mape_pct"] and overall["power_mape_pct"] <= GOAL["power_mape_pct"]
    out = {
        "command": "python bench/model_accuracy.py",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.node()} {platform.machine()} Python {platform.python_version()}",
        "elapsed_s": elapsed_s,
        "paper": PAPER,
        "goal": GOAL,
        "goal_met": ok,
        "methods": report,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
