"""The node offer is derived from the node's own controller (Controller.step on copies): monotone, bounded by the
node's floor and ceiling, dominated by meeting targets, and it leaves the live controller untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from pals_daemon.cluster.offer import offer_curve
from pals_daemon.control.config import ControllerConfig
from pals_daemon.control.core import Controller
from pals_daemon.control.types import ControllerInput, EngineObservation, EngineTargets, GpuObservation
from pals_daemon.model.profile import load_profiles

REG = load_profiles(Path(__file__).resolve().parents[2] / "profiles")
MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"


def _gpu(i: int) -> GpuObservation:
    # A100-SXM4 limits, data/gpu_power_limits.csv.
    return GpuObservation(i, f"GPU-{i}", 100.0, 400.0, 400.0, 400.0, 400.0, 300.0, None, 0.0, 1410, False)


def _engine(tput: float) -> EngineObservation:
    return EngineObservation(
        engine_id="e0", model=MODEL, gpu_indices=(0, 1, 2, 3), configured_max_num_seqs=256,
        configured_max_num_batched_tokens=8192, window_s=0.5, throughput_tokens_per_s=tput, prefill_tokens=0,
        decode_tokens=int(tput * 0.5), num_running=64, num_waiting=100, kv_cache_usage=0.5, busy_fraction=1.0,
        current_max_num_seqs=64,
    )


def _input(target: float | None) -> ControllerInput:
    targets = {"e0": EngineTargets(tokens_per_s=target)} if target else {}
    return ControllerInput(0.0, None, tuple(_gpu(i) for i in range(4)), (_engine(800.0),), targets)


def test_offer_is_monotone_between_floor_and_ceiling_and_follows_the_controller() -> None:
    assert REG.find(MODEL) is not None
    controller = Controller(REG, ControllerConfig(period_s=0.5, gpu_kind=None))
    offer = offer_curve(controller, _input(None), 400.0, 1600.0)
    assert offer.points[0][0] == 400.0 and offer.points[-1][0] == 1600.0
    scores = [p[1] for p in offer.points]
    tps = [p[2] for p in offer.points]
    assert scores == sorted(scores) and tps == sorted(tps)
    assert tps[-1] > tps[0] > 0  # more watts buy this saturated engine more predicted tokens/s


def test_meeting_the_target_dominates_the_score() -> None:
    controller = Controller(REG, ControllerConfig(period_s=0.5, gpu_kind=None))
    top = offer_curve(controller, _input(None), 400.0, 1600.0).points[-1][2]
    target = 0.7 * top
    offer = offer_curve(controller, _input(target), 400.0, 1600.0)
    met = [w for w, s, _ in offer.points if s >= 1e6]
    assert met, "the target is 70% of the top prediction: some budget must meet it"
    assert offer.points[0][1] < 1e6  # the floor does not
    # Every point that meets it predicts at least (almost) the target.
    assert all(t >= 0.98 * target for w, s, t in offer.points if s >= 1e6)


def test_live_controller_is_not_stepped() -> None:
    a = Controller(REG, ControllerConfig(period_s=0.5, gpu_kind=None))
    b = Controller(REG, ControllerConfig(period_s=0.5, gpu_kind=None))
    inp = _input(1000.0)
    a.step(inp)
    b.step(inp)
    offer_curve(a, inp, 400.0, 1600.0)
    da, db = a.step(inp), b.step(inp)
    assert da.gpu_limits_w == db.gpu_limits_w
    assert dict(a.feedback()) == dict(b.feedback())


def test_bad_range_is_refused() -> None:
    with pytest.raises(ValueError):
        offer_curve(Controller(REG), _input(None), 0.0, 100.0)


def test_offer_contains_the_knee_within_the_tolerance() -> None:
    """The smallest budget that meets the target is a point of the offer (bisected), not the next grid point."""
    import copy
    import dataclasses

    from pals_daemon.cluster.offer import KNEE_TOLERANCE_W, score_decision

    controller = Controller(REG, ControllerConfig(period_s=0.5, gpu_kind=None))
    top = offer_curve(controller, _input(None), 400.0, 1600.0).points[-1][2]
    inp = _input(0.75 * top)
    offer = offer_curve(controller, inp, 400.0, 1600.0)
    knee = next(w for w, s, _ in offer.points if s >= 1e6)
    below = copy.deepcopy(controller).step(dataclasses.replace(inp, budget_w=knee - KNEE_TOLERANCE_W))
    assert score_decision(below, inp, top)[0] < 1e6  # 10 W less no longer meets it
    grid = [400.0 + 1200.0 * i / 7 for i in range(8)]
    assert knee not in grid or knee == 400.0
