"""The profiles' clock dimension: strict loading, the modelled H100 clock points, and the clocked model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pals_daemon.model.clock_model import ClockedPerfModel, ClockResponse, clock_response
from pals_daemon.model.perf_model import PerfModel
from pals_daemon.model.profile import ProfileError, dumps_profile, load_profile, load_profiles, profile_from_dict

H100_DIR = Path(__file__).resolve().parents[2] / "profiles" / "h100"
QWEN = H100_DIR / "qwen3-30b-a3b-instruct-2507.h100-80gb-hbm3.tp1.json"


def test_every_h100_profile_has_a_labelled_clock_grid() -> None:
    for path in sorted(H100_DIR.glob("*.json")):
        prof = load_profile(path)
        assert prof.clocks_mhz[-1] == 1980 and prof.clocks_mhz[0] == 630, path.name
        assert all(p.modelled and p.cap_w == 700 for p in prof.clock_points), path.name
        assert "Clock dimension MODELLED" in prof.notes
        # Cap-only readers see the same grid as before: clock points are not among ``points``.
        assert all(p.clock_mhz is None for p in prof.points)
        by = {(p.clock_mhz, p.batch): p for p in prof.clock_points}
        top = {p.batch: p for p in prof.points if p.cap_w == 700}
        for b, ref in top.items():
            assert by[(1980, b)].tokens_per_s == ref.tokens_per_s  # the top clock repeats the measured point
            # Lower clocks: never faster, never more power, monotone in the clock.
            tputs = [by[(c, b)].tokens_per_s for c in prof.clocks_mhz]
            powers = [by[(c, b)].gpu_power_w for c in prof.clocks_mhz]
            assert tputs == sorted(tputs) and powers == sorted(powers)


def test_round_trip_is_byte_identical() -> None:
    text = QWEN.read_text()
    assert dumps_profile(load_profile(QWEN)) == text


def _doc() -> dict[str, object]:
    return json.loads(QWEN.read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d["clock_points"][0].pop("clock_mhz"), "missing keys"),
        (lambda d: d["clock_points"][0].update(clock_mhz=1500.5), "clock_mhz must be an integer"),
        (lambda d: d["clock_points"][0].update(clock_mhz=1_980_000), "clock_mhz must be an integer"),
        (lambda d: d["clock_points"][0].update(clock_mhz=True), "clock_mhz must be an integer"),
        (lambda d: d["clock_points"][0].update(cap_w=675), "not on the cap x batch grid"),
        (lambda d: d["clock_points"][0].update(batch=7), "not on the cap x batch grid"),
        (lambda d: d["clock_points"].append(dict(d["clock_points"][0])), "duplicate clock point"),
        (lambda d: d["clock_points"].pop(3), "lack batches"),
        (lambda d: d["points"][0].update(clock_mhz=1500), "unknown keys"),
        (lambda d: d.update(clock_points={}), "must be a list"),
    ],
)
def test_bad_clock_points_are_refused(mutate: object, match: str) -> None:
    doc = _doc()
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(ProfileError, match=match):
        profile_from_dict(doc, "t")


def test_a100_profiles_have_no_clock_dimension() -> None:
    for prof in load_profiles(H100_DIR.parent).profiles:
        assert prof.clock_points == () and clock_response(prof) is None


def test_clocked_model_is_min_of_cap_and_lock() -> None:
    prof = load_profile(QWEN)
    base = PerfModel(prof)
    resp = ClockResponse(prof)
    b = np.array([8.0, 16.0, 32.0, 64.0])
    unlocked = ClockedPerfModel(base, resp, 1980)
    assert np.allclose(unlocked.tokens_per_s(700.0, b), base.tokens_per_s(700.0, b))
    assert np.allclose(unlocked.gpu_power_w(450.0, b), base.gpu_power_w(450.0, b))
    locked = ClockedPerfModel(base, resp, 1080)
    # Light load at the top cap: the lock lowers power and throughput; decode is memory-bound, so power falls
    # far more than throughput.
    t_ratio = locked.tokens_per_s(700.0, b) / base.tokens_per_s(700.0, b)
    p_ratio = locked.gpu_power_w(700.0, b) / base.gpu_power_w(700.0, b)
    assert np.all(t_ratio < 1.0) and np.all(p_ratio < 0.9) and np.all(1 - t_ratio < 1 - p_ratio)
    # Under a deep cap the cap is the slower setting: the lock changes nothing there.
    assert np.allclose(locked.gpu_power_w(200.0, b), base.gpu_power_w(200.0, b))
    # Never above the cap-only model, at any cap.
    for cap in (200.0, 300.0, 500.0, 700.0):
        assert np.all(locked.gpu_power_w(cap, b) <= base.gpu_power_w(cap, b) + 1e-9)
        assert np.all(locked.tokens_per_s(cap, b) <= base.tokens_per_s(cap, b) + 1e-9)
    # Between profiled clocks: between their predictions.
    mid = ClockedPerfModel(base, resp, 1155).gpu_power_w(700.0, b)
    lo, hi = (ClockedPerfModel(base, resp, c).gpu_power_w(700.0, b) for c in (1080, 1230))
    assert np.all(lo <= mid) and np.all(mid <= hi)
    assert locked.max_cap_w == base.max_cap_w and locked.num_gpus == base.num_gpus
