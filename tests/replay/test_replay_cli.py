"""``pals-replay`` runs a tiny scenario and writes the JSON summary and the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from pals_daemon.cli.replay import main


def test_cli_tiny_scenario(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(
        [
            "--rate",
            "5",
            "--target-tps",
            "150",
            "--duration",
            "20",
            "--budget-steps",
            "0:none,10:900",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"default", "static-cap", "cap-only", "batch-only", "pals", "tput-oracle"}
    for name in ("replay_tokens_per_j.png", "replay_power.png", "replay_limits.png"):
        assert (out / name).stat().st_size > 1000
    assert "pals" in capsys.readouterr().out


def test_cli_scenario_json_with_trace_columns(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("t,inp,outp\n" + "".join(f"{i * 0.3:.2f},{200 + i},{40 + i % 7}\n" for i in range(60)))
    sc = {
        "name": "tiny",
        "duration_s": 15,
        "budget": {"unit": "server", "watts": 1400},
        "engines": [
            {
                "model": "olmoe-1b-7b",
                "load": {
                    "kind": "trace",
                    "path": str(trace),
                    "time_column": "t",
                    "input_column": "inp",
                    "output_column": "outp",
                },
                "targets": {"ttft_ms": 1000, "tpot_ms": 100},
            }
        ],
    }
    path = tmp_path / "sc.json"
    path.write_text(json.dumps(sc))
    out = tmp_path / "o"
    assert (
        main(
            [
                "--scenario",
                str(path),
                "--out",
                str(out),
                "--no-plots",
                "--quiet",
                "--policies",
                "default",
                "pals",
                "tput-oracle",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policies"]["pals"]["engines"][0]["requests_finished"] > 0
    assert summary["policies"]["pals"]["node"]["limit_over_budget_ticks"] == 0
