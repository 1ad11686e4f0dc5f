"""bench/slo_suite.py end to end on one small case: the table, the JSON fields, the verdict and the PNG."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _suite():
    spec = importlib.util.spec_from_file_location("bench_slo_suite", BENCH / "slo_suite.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_suite_one_budget_case_end_to_end(tmp_path, capsys) -> None:
    suite = _suite()
    out = tmp_path / "suite"
    args = ["--quick", "--models", "olmoe-1b-7b", "--loads", "light", "--budgets", "binding", "--duration", "60"]
    assert suite.main([*args, "--workers", "2", "--out", str(out)]) == 0
    assert "| olmoe-1b-7b-azure-code-light-1000W |" in capsys.readouterr().out
    doc = json.loads((out / "slo_suite.json").read_text())
    (case,) = doc["cases"]
    assert set(case["policies"]) >= {"default", "slo-oracle", "pals", "default-ignoring-budget"}
    inputs = case["inputs"]
    assert inputs["model"] == "olmoe-1b-7b" and inputs["budget_w"] == 1000.0
    assert inputs["ttft_slo_ms"] == 2000.0 and inputs["tpot_slo_ms"] == 100.0
    assert inputs["capacity_req_per_s"] > inputs["mean_rate_req_per_s"] > 0
    for name, row in case["policies"].items():
        for k in ("j_per_output_token", "j_per_token", "slo_attainment", "time_over_budget_s"):
            assert row[k] is not None, (name, k)
        assert set(row["ttft_ms"]) == {"p50", "p90", "p99"}
        if name != "default-ignoring-budget":  # every other policy respects the budget every tick
            assert row["limit_over_budget_ticks"] == 0, name
    # Under the budget the reference "default" is the default held to it (static-cap).
    assert case["policies"]["default-ignoring-budget"]["limit_over_budget_ticks"] > 0
    # Only budget-respecting statics (caps within 250 W per GPU) are in the grid.
    assert case["static_grid"] and all(float(s.split(":")[1]) <= 250.0 for s in case["static_grid"])
    v = case["verdict"]
    assert v["verdict"] in ("PASS", "FAIL") and isinstance(v["default_meets_90pct"], bool)
    assert (out / "plots" / f"{case['case']}.png").stat().st_size > 10_000
    assert (out / "slo_suite.md").read_text().startswith("| case |")
    # bench/slo_suite_pals.py rebuilds the same case from the JSON and replays pals alone: with the same code it
    # must reproduce the saved pals row and verdict exactly (a drifted rebuild would judge pals on other inputs).
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_slo_suite_pals", BENCH / "slo_suite_pals.py")
        assert spec is not None and spec.loader is not None
        pals_only = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pals_only)
        again = tmp_path / "pals.json"
        ref = out / "slo_suite.json"
        assert pals_only.main(["--ref", str(ref), "--out", str(again), "--workers", "1"]) == 0
    finally:
        sys.path.remove(str(BENCH))
    (row,) = json.loads(again.read_text())["cases"]
    assert row["pals"]["j_per_output_token"] == case["policies"]["pals"]["j_per_output_token"]
    assert row["pals"]["slo_attainment"] == case["policies"]["pals"]["slo_attainment"]
    assert row["passed"] == v["pass"] and row["ratio"] == row["saved_pals_ratio"]
