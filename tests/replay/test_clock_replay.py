"""The clock knob in pals-replay: the LockedClockKnob's writes, static (cap, batch, clock) specs, and the planner
locking clocks on a light simulated H100 load, closed loop with the simulated truth."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.types import Decision, EngineTargets
from pals_daemon.model.profile import load_profiles
from pals_daemon.replay.node import ReplayGpu
from pals_daemon.replay.policies import parse_static_spec, validate_policy_spec
from pals_daemon.replay.references import node_slo_attainment
from pals_daemon.replay.scenario import EngineSpec, PoissonLoad, Scenario
from pals_daemon.replay.simulate import prepare, run_policy
from pals_daemon.sim.gpu import make_sim_gpus
from pals_daemon.tick import LOCKED_CLOCK, SettingWrite

H100_REG = load_profiles(Path(__file__).resolve().parents[2] / "profiles" / "h100")
H100_CFG = ControllerConfig(gpu_kind="H100 80GB HBM3")


def _gpu(clocks: bool = True) -> ReplayGpu:
    (dev,) = make_sim_gpus("H100-SXM5", 1, lambda: 0.0)
    return ReplayGpu.of(dev, clocks)


def _decide(lock: int | None) -> Decision:
    return Decision(gpu_limits_w={0: 700.0}, engines={}, changed=True, reason="t", gpu_locked_clocks_mhz={0: lock})


def test_locked_clock_knob_snaps_orders_and_unlocks() -> None:
    g = _gpu()
    assert LOCKED_CLOCK.wanted(g, _decide(None), 0.0) is None  # unlocked and staying so: no write
    assert LOCKED_CLOCK.wanted(g, _decide(1234), 0.0) == (1230, True)  # snapped down to a supported clock
    g.write_locked_clock(SettingWrite(0, LOCKED_CLOCK.name, 1230))
    assert g.device.locked_clock_max_mhz() == 1230 and g.clock_view().locked_mhz == 1230
    assert LOCKED_CLOCK.wanted(g, _decide(1235), 0.0) is None  # the same after snapping
    assert LOCKED_CLOCK.wanted(g, _decide(1500), 0.0) == (1500, False)  # a higher ceiling raises power
    assert LOCKED_CLOCK.wanted(g, _decide(1980), 0.0) == (0, False)  # the top clock is "unlocked"
    g.write_locked_clock(SettingWrite(0, LOCKED_CLOCK.name, 0))
    assert g.device.locked_clock_max_mhz() is None and g.locked_clock_mhz is None
    # Without the knob, nothing is ever written.
    off = _gpu(clocks=False)
    assert LOCKED_CLOCK.wanted(off, _decide(900), 0.0) is None and not off.clock_view().controllable


def test_static_specs_take_an_optional_clock() -> None:
    spec = parse_static_spec("static:700:32:1230")
    assert (spec.cap_w, spec.batch, spec.clock_mhz) == (700.0, 32, 1230) and spec.name == "static:700:32:1230"
    assert parse_static_spec("static:225:16").clock_mhz is None
    for bad in ("static:700:32:fast", "static:700:32:0", "static:700:32:1230:1"):
        with pytest.raises(ValueError):
            parse_static_spec(bad)
    assert validate_policy_spec("pals-clock") == "pals-clock" and validate_policy_spec("clock-only")


def _scenario(rate: float) -> Scenario:
    engine = EngineSpec(
        "qwen",
        "Qwen/Qwen3-30B-A3B-Instruct-2507",
        PoissonLoad(rate, prompt_tokens=512, output_tokens=200, seed=5),
        targets=EngineTargets(ttft_ms=2000.0, tpot_ms=100.0),
        gpu_kind="H100-SXM5",
        num_gpus=1,
        max_num_seqs=64,
    )
    return Scenario("h100-light", (engine,), duration_s=150.0, warmup_s=20.0)


def test_a_light_h100_load_gets_a_lower_clock_and_less_energy_per_token_within_its_slo() -> None:
    sc = _scenario(2.0)
    prep = prepare(sc)
    cfg = replace(H100_CFG, slo_forecast_window_s=20.0)
    default = run_policy(sc, "default", H100_REG, prep, config=cfg)
    locks: list[int | None] = []
    clock_only = run_policy(
        sc, "clock-only", H100_REG, prep, config=cfg, on_tick=lambda _, d: locks.append(d.gpu_locked_clocks_mhz.get(0))
    )
    static = run_policy(sc, "static:700:64:1080", H100_REG, prep, config=cfg)
    locked = [v for v in locks if v is not None]
    assert locked, "the planner never locked the clock"
    # The static lock and the planner's locks both save energy against the default at the top clock...
    assert static.tokens_per_j > 1.1 * default.tokens_per_j
    assert clock_only.tokens_per_j > 1.1 * default.tokens_per_j
    # ...and the planner stays within its SLO while doing so (the light load leaves wide slack).
    att_default, att_clock = node_slo_attainment(default), node_slo_attainment(clock_only)
    assert att_default is not None and att_clock is not None and att_clock >= att_default - 0.01


def test_on_a_simulated_h200_no_cap_saves_but_the_planners_lock_does() -> None:
    # The modelled H200 (pals_daemon/sim/h200.py): decode draws 197-300 W of 700 W, so cap-only pals finds
    # little to save at light load (arXiv 2605.11999's "illusion of power capping"); the clock does.
    reg = load_profiles(Path(__file__).resolve().parents[2] / "profiles" / "h200")
    cfg = ControllerConfig(gpu_kind="NVIDIA H200", slo_forecast_window_s=20.0)
    sc = replace(_scenario(2.0), name="h200-light")
    sc = replace(sc, engines=(replace(sc.engines[0], gpu_kind="H200-SXM"),))
    prep = prepare(sc)
    default = run_policy(sc, "default", reg, prep, config=cfg)
    cap_only = run_policy(sc, "pals", reg, prep, config=cfg)
    locks: list[int | None] = []
    clock = run_policy(
        sc, "pals-clock", reg, prep, config=cfg, on_tick=lambda _, d: locks.append(d.gpu_locked_clocks_mhz.get(0))
    )
    assert any(v is not None for v in locks)
    assert clock.tokens_per_j > 1.1 * default.tokens_per_j
    assert clock.tokens_per_j > cap_only.tokens_per_j
    att_default, att_clock = node_slo_attainment(default), node_slo_attainment(clock)
    assert att_default is not None and att_clock is not None and att_clock >= att_default - 0.01
