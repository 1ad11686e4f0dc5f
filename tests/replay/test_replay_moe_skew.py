"""Replay with MoE expert-load skew: the share reaches the controller; routing-aware caps beat uniform caps."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

from pals_daemon.model.profile import load_profiles
from pals_daemon.replay.node import report_window
from pals_daemon.replay.scenario import EngineSpec, PoissonLoad, scenario_from_dict
from pals_daemon.server.daemon import default_profiles_dir
from pals_daemon.server.engines import EngineRegistration, EngineSession
from pals_daemon.sim.engine import SimEngine
from pals_daemon.sim.gpu import make_sim_gpus
from pals_daemon.sim.trace import poisson_requests
from pals_daemon.sim.truth import load_a100_truth

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = load_profiles(str(default_profiles_dir()))
DURATION_S = 120.0


def _bench():
    spec = importlib.util.spec_from_file_location("scenario_moe_skew", ROOT / "bench" / "scenario_moe_skew.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("scenario_moe_skew", mod)
    spec.loader.exec_module(mod)
    return mod


def test_engine_spec_share_parsed_and_validated() -> None:
    sc = scenario_from_dict(
        {
            "duration_s": 10,
            "engines": [
                {"model": "mixtral-8x7b-instruct", "load": {"rate_per_s": 1.0}, "expert_load_share": [2, 1, 1, 1]}
            ],
        }
    )
    assert sc.engines[0].expert_load_share == (2.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="expert_load_share"):
        EngineSpec("e", "mixtral-8x7b-instruct", PoissonLoad(1.0), expert_load_share=(1.0, 1.0))
    with pytest.raises(ValueError, match="expert_load_share"):
        EngineSpec("e", "mixtral-8x7b-instruct", PoissonLoad(1.0), expert_load_share=(0.0, 0.0, 0.0, 0.0))


def _observe(eng: SimEngine, gpus: list, indices: tuple[int, ...]):
    """The engine's window reported into a daemon session (the replay's path) and taken as the tick does."""
    session = EngineSession(EngineRegistration(eng.engine_id, "mixtral-8x7b-instruct", indices, 32, 4096), "s1")
    report_window(eng, session, [g.identity.uuid for g in gpus])
    return session.take_observation(5.0)


def test_observation_carries_the_share_like_the_daemon() -> None:
    t = [0.0]
    gpus = make_sim_gpus("A100-SXM4", 4, lambda: t[0], first_index=4)
    reqs = poisson_requests(5.0, 10.0, 256, 64, seed=1)
    eng = SimEngine("e", load_a100_truth("mixtral-8x7b-instruct"), gpus, reqs, 32, 4096, expert_load_share=(4, 2, 2, 2))
    t[0] = 5.0
    eng.advance(5.0)
    obs = _observe(eng, gpus, (4, 5, 6, 7))
    assert set(obs.expert_load_share) == {4, 5, 6, 7}
    assert obs.expert_load_share[4] == pytest.approx(0.4, rel=1e-3)
    assert sum(obs.expert_load_share.values()) == pytest.approx(1.0)
    plain_gpus = make_sim_gpus("A100-SXM4", 4, lambda: t[0])
    plain = SimEngine("p", load_a100_truth("mixtral-8x7b-instruct"), plain_gpus, reqs, 32, 4096)
    plain.advance(5.0)
    assert _observe(plain, plain_gpus, (0, 1, 2, 3)).expert_load_share == {}


def test_routing_aware_caps_beat_uniform_caps_at_same_qos() -> None:
    started = time.process_time()
    mod = _bench()
    runs, target = mod.run(REGISTRY, DURATION_S, policies=("pals-uniform", "pals"))
    aware, uniform = runs["pals"], runs["pals-uniform"]
    assert target > 0
    assert aware.tokens_per_j > 1.02 * uniform.tokens_per_j
    (ea,), (eu,) = aware.engines, uniform.engines
    assert ea.qos_violations <= eu.qos_violations
    assert aware.output_tokens >= 0.97 * uniform.output_tokens
    assert time.process_time() - started < 20.0


def test_bench_main_writes_table_and_json(tmp_path, capsys) -> None:
    import json

    mod = _bench()
    assert mod.main(["--out", str(tmp_path), "--duration", "60"]) == 0
    doc = json.loads((tmp_path / "moe_skew.json").read_text())
    assert set(doc["policies"]) == {"default", "pals-uniform", "pals"}
    caps = doc["policies"]["pals"]["mean_cap_w_per_gpu"]
    assert caps["0"] > caps["1"]
    assert "routing-aware vs uniform caps" in capsys.readouterr().out
