"""SLO-respecting references (issue 9, item 3) on small cases: static specs, best-static, slo-oracle, JSON rows."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from pals_daemon.cli.replay import main as replay_main
from pals_daemon.control.types import ControllerInput, Decision, EngineTargets
from pals_daemon.model.profile import load_profiles
from pals_daemon.replay.latency import prediction_error, window_p90
from pals_daemon.replay.policies import (
    DefaultPolicy,
    StaticSpec,
    make_policy,
    parse_static_spec,
    validate_policy_spec,
)
from pals_daemon.replay.references import (
    Job,
    find_best_static,
    node_slo_attainment,
    pick_best_static,
    policy_row,
    run_jobs,
    static_grid,
)
from pals_daemon.replay.scenario import Budget, BurstyLoad, EngineSpec, PoissonLoad, Scenario
from pals_daemon.replay.simulate import prepare, run_policy
from pals_daemon.replay.slo_oracle import SloOraclePolicy, fork_engine
from pals_daemon.replay.traffic import at_mean_rate, measure_capacity_req_per_s, shaped_requests
from pals_daemon.server.daemon import default_profiles_dir
from pals_daemon.sim.engine import Request, SimEngine
from pals_daemon.sim.gpu import make_sim_gpus
from pals_daemon.sim.truth import load_a100_truth

REGISTRY = load_profiles(str(default_profiles_dir()))
MODEL = "olmoe-1b-7b"


def _poisson(rate: float = 8.0, duration_s: float = 90.0, budget_w: float | None = None) -> Scenario:
    """OLMoE, 2,048-token prompts, tight TTFT: a 100 W cap is cheapest per token but breaks the SLO."""
    eng = EngineSpec("engine0", MODEL, PoissonLoad(rate, 2048, 64, seed=1), EngineTargets(ttft_ms=300, tpot_ms=60))
    budget = Budget.constant(budget_w) if budget_w is not None else Budget()
    return Scenario("tiny", (eng,), duration_s=duration_s, budget=budget, warmup_s=10)


# ---- static:CAP[:BATCH] ---------------------------------------------------------------------------------


def test_static_spec_parses_cap_and_optional_batch() -> None:
    assert parse_static_spec("static:225") == StaticSpec(225.0, None)
    assert parse_static_spec("static:225.5:16") == StaticSpec(225.5, 16)
    assert StaticSpec(225.0, 16).name == "static:225:16"
    assert validate_policy_spec("static:300:8") == "static:300:8"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("static:", "expected static:CAP"),
        ("static:abc", "not a number"),
        ("static:-5", "> 0"),
        ("static:0", "> 0"),
        ("static:nan", "finite"),
        ("static:inf", "finite"),
        ("static:225:0", ">= 1"),
        ("static:225:x", "not an integer"),
        ("static:225:1.5", "not an integer"),
        ("static:1:2:3:4", "expected static:CAP"),
        ("static:225:16:3", "CLOCK must be in"),  # no SM clock is below 100 MHz: a unit mix-up
    ],
)
def test_bad_static_specs_get_a_clear_error(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        make_policy(spec, REGISTRY)


def test_the_old_oracle_name_points_to_its_new_name() -> None:
    with pytest.raises(ValueError, match="renamed 'tput-oracle'"):
        make_policy("oracle", REGISTRY)
    with pytest.raises(ValueError, match="unknown policy 'bogus'"):
        make_policy("bogus", REGISTRY)


def test_cli_refuses_a_bad_spec_before_running(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        replay_main(["--policies", "static:abc", "--no-plots", "--quiet"])
    assert ei.value.code == 2
    assert "bad static policy spec 'static:abc'" in capsys.readouterr().err


def test_static_policy_clamps_to_the_gpu_range_and_the_budget_share() -> None:
    sc = _poisson(duration_s=20.0)
    low = run_policy(sc, "static:50:16", REGISTRY)  # below the A100's 100 W minimum
    assert set(low.timeline.gpu_cap_w[0]) == {100.0}
    assert set(low.timeline.batch["engine0"]) == {16}
    capped = run_policy(_poisson(duration_s=20.0, budget_w=800.0), "static:300", REGISTRY)
    assert set(capped.timeline.gpu_cap_w[0]) == {200.0}  # 800 W / 4 GPUs
    assert set(capped.timeline.batch["engine0"]) == {64}  # the configured batch
    assert capped.limit_over_budget_ticks == 0


# ---- best-static --------------------------------------------------------------------------------------


def test_best_static_is_the_cheapest_within_1pp_and_excludes_one_that_breaks_the_slo() -> None:
    sc = _poisson()
    prep = prepare(sc)
    default = run_policy(sc, "default", REGISTRY, prep)
    grid = ["static:100", "static:150", "static:250", "static:400"]
    best, full, statics = find_best_static(sc, REGISTRY, prep, default, grid=grid, workers=2)
    d_slo = node_slo_attainment(default)
    assert d_slo is not None and d_slo > 0.99
    j = {s: r.gpu_energy_j / r.output_tokens for s, r in statics.items()}
    slo = {s: node_slo_attainment(r) for s, r in statics.items()}
    # The cheapest static breaks the SLO, so it must not be chosen ...
    assert min(j, key=j.get) == "static:100" and slo["static:100"] < d_slo - 0.01
    # ... and the choice is the cheapest of those within 1 pp of default.
    feasible = [s for s in grid if slo[s] >= d_slo - 0.01]
    assert best == min(feasible, key=j.get) == "static:150"
    assert full is not None and full.policy == "static:150"
    assert full.gpu_energy_j == pytest.approx(statics["static:150"].gpu_energy_j)
    assert full.timeline.t_s and statics["static:150"].timeline.t_s == []  # grid runs are stripped


def test_pick_best_static_returns_none_when_no_static_is_within_tolerance() -> None:
    sc = _poisson()
    prep = prepare(sc)
    default = run_policy(sc, "default", REGISTRY, prep)
    statics = {"static:100": run_policy(sc, "static:100", REGISTRY, prep)}
    assert pick_best_static(default, statics) is None


def test_static_grid_respects_a_budget_and_spans_the_range() -> None:
    free = static_grid(_poisson())
    assert "static:100:64" in free and "static:400:8" in free and "static:125:32" in free
    assert len(free) == 13 * 4
    bound = static_grid(_poisson(budget_w=1000.0))
    caps = {parse_static_spec(s).cap_w for s in bound}
    assert max(caps) == 250.0 and min(caps) == 100.0


# ---- slo-oracle -----------------------------------------------------------------------------------------


def _bursty() -> Scenario:
    """Bursts of 20 req/s for 10 s every 30 s: the throughput oracle sizes for the mean and misses TTFT."""
    load = BurstyLoad(20.0, 1.0, 10.0, 20.0, 2048, 64, seed=1)
    eng = EngineSpec("engine0", MODEL, load, EngineTargets(ttft_ms=1000, tpot_ms=100))
    return Scenario("bursty", (eng,), duration_s=120.0, warmup_s=10)


def test_slo_oracle_meets_the_slo_where_the_slo_blind_oracle_does_not() -> None:
    sc = _bursty()
    prep = prepare(sc)
    runs = {p: run_policy(sc, p, REGISTRY, prep) for p in ("default", "tput-oracle", "slo-oracle-quick")}
    slo = {p: node_slo_attainment(r) for p, r in runs.items()}
    assert slo["default"] >= 0.99
    assert slo["tput-oracle"] < slo["default"] - 0.05  # SLO-blind: misses TTFT in the bursts
    assert slo["slo-oracle-quick"] >= slo["default"] - 0.01
    # ... and it still saves energy against default.
    j = {p: r.gpu_energy_j / r.output_tokens for p, r in runs.items()}
    assert j["slo-oracle-quick"] < j["default"]


def test_slo_oracle_never_exceeds_a_budget() -> None:
    sc = _poisson(duration_s=60.0, budget_w=700.0)
    run = run_policy(sc, "slo-oracle-quick", REGISTRY)
    assert run.limit_over_budget_ticks == 0
    assert max(run.timeline.gpu_cap_w[0]) <= 175.0


def test_slo_oracle_shadow_stays_in_step_with_the_replay() -> None:
    """The shadow simulation the oracle forks from is where the replay is (same tokens, same requests)."""
    base = _poisson(duration_s=60.0)
    sc = Scenario(base.name, base.engines, base.duration_s, base.budget, warmup_s=0.0)
    prep = prepare(sc)
    pol = SloOraclePolicy(prep.truths, prep.requests, quick=True)
    run = run_policy(sc, pol, REGISTRY, prep)
    shadow = pol._shadows["engine0"].engine
    shadow.advance(sc.duration_s)
    assert shadow.totals.output_tokens == run.engines[0].output_tokens > 0
    assert len(shadow.totals.finished) == run.engines[0].requests_finished
    assert len(pol.log) == 2  # one search per 30 s window


def test_a_fork_never_changes_the_original() -> None:
    truth = load_a100_truth(MODEL)
    reqs = [Request(0.1 * i, 1024, 32) for i in range(200)]

    def engine() -> tuple[SimEngine, list[float]]:
        now = [0.0]
        return SimEngine("e", truth, make_sim_gpus("A100-SXM4", 4, lambda: now[0]), reqs, 64, 8192), now

    a, now_a = engine()
    b, now_b = engine()
    for e, now in ((a, now_a), (b, now_b)):
        now[0] = 5.0
        e.advance(5.0)
    fork, cell = fork_engine(a, 5.0)
    for g in fork.gpus:
        g.set_power_limit_mw(100_000)
    fork.apply_limits(8, 1024)
    cell[0] = 15.0
    fork.advance(15.0)
    assert fork.totals.output_tokens > 0
    for e, now in ((a, now_a), (b, now_b)):
        now[0] = 15.0
        e.advance(15.0)
    assert a.totals.output_tokens == b.totals.output_tokens
    assert len(a.totals.finished) == len(b.totals.finished)
    assert a.limits == b.limits == (64, 8192)
    assert [g.energy_j(15.0) for g in a.gpus] == pytest.approx([g.energy_j(15.0) for g in b.gpus])
    assert fork.totals.output_tokens != a.totals.output_tokens  # the fork ran at 100 W, batch 8


# ---- JSON rows, traffic, prediction error -------------------------------------------------------------


def test_policy_row_has_the_slo_fields() -> None:
    run = run_policy(_poisson(duration_s=40.0, budget_w=1200.0), "default", REGISTRY)
    row = policy_row(run)
    for k in (
        "j_per_output_token",
        "j_per_token",
        "slo_attainment",
        "time_over_budget_s",
        "limit_over_budget_ticks",
    ):
        assert row[k] is not None, k
    for k in ("ttft_ms", "tpot_ms"):
        assert row[k]["p50"] <= row[k]["p90"] <= row[k]["p99"]
    assert row["j_per_token"] < row["j_per_output_token"]
    assert row["limit_over_budget_ticks"] > 0  # default ignores the budget (1,600 W of limits)


def test_cli_writes_slo_rows_and_inputs(tmp_path) -> None:
    sc = {
        "name": "cli",
        "duration_s": 20,
        "engines": [
            {
                "model": MODEL,
                "load": {"kind": "poisson", "rate_per_s": 4, "prompt_tokens": 1024, "output_tokens": 32},
                "targets": {"ttft_ms": 500, "tpot_ms": 60},
            }
        ],
    }
    path = tmp_path / "sc.json"
    path.write_text(json.dumps(sc))
    out = tmp_path / "out"
    args = ["--scenario", str(path), "--out", str(out), "--no-plots", "--quiet", "--workers", "1"]
    assert replay_main([*args, "--policies", "static:250:32", "best-static", "tput-oracle"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"static:250:32", "best-static", "tput-oracle", "default"}
    tput = summary["policies"].pop("tput-oracle")
    assert tput["slo_blind"] is True and "slo" not in tput  # kept out of SLO tables
    assert summary["policies"]["best-static"]["spec"].startswith("static:")
    assert summary["inputs"]["engines"][0]["slo"] == {"ttft_ms": 500.0, "tpot_ms": 60.0}
    for row in (p["slo"] for p in summary["policies"].values()):
        assert row["slo_attainment"] is not None and row["ttft_ms"]["p90"] is not None


def test_at_mean_rate_is_exact_and_loops_a_short_trace() -> None:
    base = [Request(float(t), 100 + t, 10) for t in (0, 1, 2, 10)]
    reqs = at_mean_rate(base, 2.0, 10.0)
    assert len(reqs) == 20
    assert all(0 <= r.arrival_s < 10.0 for r in reqs)
    assert [r.prompt_tokens for r in reqs[:5]] == [100, 101, 102, 110, 100]  # looped in order
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(reqs, reqs[1:], strict=False))


def test_shaped_requests_follow_the_shape() -> None:
    mins = np.arange(0.0, 121.0, 10.0)
    rpm = 3.0 - np.abs(mins - 60.0) / 30.0  # 1 at the ends, a peak of 3 in the middle
    reqs = shaped_requests(mins, rpm, [Request(0.0, 500, 20)], 5.0, 600.0, seed=3)
    t = np.array([r.arrival_s for r in reqs])
    assert abs(len(reqs) / 600.0 - 5.0) < 0.5
    mid = np.sum((t > 200) & (t < 400))
    edges = np.sum(t < 100) + np.sum(t > 500)
    assert mid > 2 * edges


def test_capacity_is_measured_and_grows_with_a_lighter_mix() -> None:
    truth = load_a100_truth(MODEL)
    heavy = measure_capacity_req_per_s(truth, [Request(0, 4096, 64)], "A100-SXM4", 64, 8192, duration_s=40.0)
    light = measure_capacity_req_per_s(truth, [Request(0, 256, 64)], "A100-SXM4", 64, 8192, duration_s=40.0)
    assert 0 < heavy < light


def test_prediction_error_is_none_without_predictions_and_measures_them_when_present() -> None:
    sc = _poisson(rate=4.0, duration_s=120.0)
    prep = prepare(sc)
    default = run_policy(sc, "default", REGISTRY, prep)
    assert prediction_error(default) is None
    measured = window_p90(default.engines[0].finished, default.run_s)

    class Predicting(DefaultPolicy):
        """Default's decisions, predicting twice the p90 that default's own run measured per window."""

        def decide(self, inp: ControllerInput) -> Decision:
            d = super().decide(inp)
            k = min(int(inp.now_s // 30.0), measured.t_s.size - 1)
            ttft, tpot = measured.ttft_p90_ms[k], measured.tpot_p90_ms[k]
            engines = {
                e: replace(
                    v,
                    predicted_ttft_p90_ms=2 * ttft if math.isfinite(ttft) else None,
                    predicted_tpot_p90_ms=2 * tpot if math.isfinite(tpot) else None,
                )
                for e, v in d.engines.items()
            }
            return Decision(d.gpu_limits_w, engines, d.changed, d.reason)

    err = prediction_error(run_policy(sc, Predicting(), REGISTRY, prep))
    assert err is not None and err.windows_ttft >= 3
    assert err.ttft_mdape_pct == pytest.approx(100.0, abs=1e-6)
    assert err.tpot_mdape_pct == pytest.approx(100.0, abs=1e-6)


def test_window_p90_buckets_ttft_by_first_token_and_tpot_by_finish() -> None:
    # (finish s, arrival s, TTFT ms, TPOT ms, output tokens)
    fin = np.array(
        [
            [40.0, 5.0, 1000.0, 50.0, 10],  # first token at 6 s (window 0), finished in window 1
            [12.0, 10.0, 500.0, 0.0, 1],  # one output token: no TPOT
            [70.0, 35.0, 2000.0, 80.0, 20],  # first token at 37 s (window 1), finished in window 2
        ]
    )
    w = window_p90(fin, 90.0, 30.0)
    assert list(w.t_s) == [0.0, 30.0, 60.0]
    assert w.ttft_p90_ms[0] == pytest.approx(np.percentile([1000.0, 500.0], 90))
    assert w.ttft_p90_ms[1] == 2000.0 and math.isnan(w.ttft_p90_ms[2])
    assert math.isnan(w.tpot_p90_ms[0]) and w.tpot_p90_ms[1] == 50.0 and w.tpot_p90_ms[2] == 80.0


def test_run_jobs_records_a_failing_replay_without_losing_the_others() -> None:
    sc = _poisson(duration_s=20.0)
    cases = {"c": (sc, prepare(sc))}
    jobs = [Job("c", "default"), Job("c", "no-such-policy")]
    errors: dict[tuple[str, str], str] = {}
    runs = run_jobs(cases, jobs, REGISTRY, workers=1, errors=errors)
    assert set(runs) == {("c", "default")}
    assert "unknown policy 'no-such-policy'" in errors[("c", "no-such-policy")]
    with pytest.raises(RuntimeError, match="no-such-policy on c"):
        run_jobs(cases, jobs, REGISTRY, workers=1)
