"""ModelTruth: reproduces the A100 sweep, interpolates and clamps, models clock and prefill."""

from __future__ import annotations

import csv
import math

import pytest

from pals_daemon.sim.hardware import A100_SXM4
from pals_daemon.sim.truth import (
    DEFAULT_SWEEP_CSV,
    PREFILL_MFU,
    Perturbation,
    canonical_model_name,
    known_models,
    load_a100_truth,
)


def _rows() -> list[dict[str, str]]:
    with open(DEFAULT_SWEEP_CSV, newline="") as f:
        return list(csv.DictReader(f))


def test_known_models_and_aliases() -> None:
    assert set(known_models()) == {r["model"] for r in _rows()}
    assert canonical_model_name("mistralai/Mixtral-8x7B-Instruct-v0.1") == "mixtral-8x7b-instruct"
    assert canonical_model_name("Qwen/Qwen1.5-MoE-A2.7B") == "qwen1.5-moe-a2.7b"
    assert load_a100_truth("MIXTRAL-8X7B-INSTRUCT").model == "mixtral-8x7b-instruct"
    with pytest.raises(ValueError, match="known: .*mixtral-8x7b-instruct"):
        load_a100_truth("llama-3-8b")


def test_truth_reproduces_csv_at_grid_points() -> None:
    truths = {m: load_a100_truth(m) for m in known_models()}
    rows = _rows()
    assert len(rows) == 150
    for r in rows:
        t = truths[r["model"]]
        cap, batch = float(r["cap_w"]), int(r["batch"])
        thr, power = float(r["avg_Tokens_per_s"]), float(r["avg_gpu_power"])
        assert t.throughput_tokens_per_s(cap, batch) == pytest.approx(thr, rel=1e-9)
        assert t.power_w(cap, batch) == pytest.approx(power, rel=1e-9)
        step = t.decode_step(cap, batch)
        assert step.step_time_s == pytest.approx(batch / thr, rel=1e-9)
        assert step.power_w_per_gpu == pytest.approx(power, rel=1e-9)
        assert t.num_gpus == int(r["tp"]) == 4


def test_interpolation_between_and_clamping_outside() -> None:
    t = load_a100_truth("mixtral-8x7b-instruct")
    # Halfway in cap between 200 and 300 W at batch 8: the mean of the two measurements.
    assert t.throughput_tokens_per_s(250, 8) == pytest.approx(
        (t.throughput_tokens_per_s(200, 8) + t.throughput_tokens_per_s(300, 8)) / 2
    )
    # Batch is interpolated in log2: log2(16) = 4 is halfway between log2(8) = 3 and log2(32) = 5.
    lo, hi = t.throughput_tokens_per_s(400, 8), t.throughput_tokens_per_s(400, 32)
    assert t.throughput_tokens_per_s(400, 16) == pytest.approx(lo + (hi - lo) * 0.5)
    # Outside the grid the edges hold.
    assert t.throughput_tokens_per_s(50, 4) == t.throughput_tokens_per_s(100, 4)
    assert t.throughput_tokens_per_s(700, 4) == t.throughput_tokens_per_s(400, 4)
    assert t.throughput_tokens_per_s(400, 256) == t.throughput_tokens_per_s(400, 64)
    # Beyond the largest measured batch a step carries more tokens at the same rate: longer steps.
    assert t.decode_step(400, 128).step_time_s == pytest.approx(2 * t.decode_step(400, 64).step_time_s)
    # Between two grid points the value lies between them (bilinear interpolation does not overshoot).
    for cap in range(100, 401, 10):
        for b in range(1, 65):
            v = t.throughput_tokens_per_s(cap, b)
            caps = [c for c in t.caps_w if c <= cap][-1:] + [c for c in t.caps_w if c >= cap][:1]
            bs = [x for x in t.batches if x <= b][-1:] + [x for x in t.batches if x >= b][:1]
            corners = [t.throughput_tokens_per_s(c, x) for c in caps for x in bs]
            assert min(corners) - 1e-9 <= v <= max(corners) + 1e-9


def test_lower_cap_lowers_saturated_throughput_and_tokens_per_joule_follows_data() -> None:
    rows = _rows()
    for model in known_models():
        t = load_a100_truth(model)
        assert t.throughput_tokens_per_s(150, 64) < t.throughput_tokens_per_s(400, 64)
        assert t.throughput_tokens_per_s(100, 64) < t.throughput_tokens_per_s(200, 64)
        for batch in t.batches:
            measured = {
                float(r["cap_w"]): float(r["avg_Tokens_per_s"]) / float(r["total_gpu_power"])
                for r in rows
                if r["model"] == model and int(r["batch"]) == batch
            }
            simulated = {c: t.throughput_tokens_per_s(c, batch) / (t.power_w(c, batch) * t.num_gpus) for c in t.caps_w}
            # Same best cap for tokens/J as the data, at every batch.
            assert max(measured, key=measured.get) == max(simulated, key=simulated.get)
    # The A100 data show a lower cap improving tokens/J at large batch, e.g. Mixtral at batch 64:
    # 435 tok/s at 379 W/GPU (400 W cap) against 308 tok/s at 199 W/GPU (200 W cap).
    m = load_a100_truth("mixtral-8x7b-instruct")

    def tpj(cap: float) -> float:
        return m.throughput_tokens_per_s(cap, 64) / (m.power_w(cap, 64) * 4)

    assert tpj(200) > 1.3 * tpj(400)


def test_decode_demand_and_modelled_clock() -> None:
    t = load_a100_truth("mixtral-8x7b-instruct")
    free = t.decode_step(400, 64)
    assert free.demand_power_w == free.power_w_per_gpu  # at the top cap, demand is what it draws
    assert free.sm_clock_mhz == A100_SXM4.max_sm_clock_mhz
    capped = t.decode_step(200, 64)
    assert capped.demand_power_w == free.demand_power_w > 200
    assert capped.power_w_per_gpu <= 200
    assert 0.1 * 1410 <= capped.sm_clock_mhz < 1410
    assert t.decode_step(100, 64).sm_clock_mhz < capped.sm_clock_mhz
    # Batch 1 draws 254 W: a 300 W cap does not bind, the clock stays at maximum.
    assert t.decode_step(300, 1).sm_clock_mhz == 1410


def test_prefill_from_flops_and_slower_under_cap() -> None:
    t = load_a100_truth("mixtral-8x7b-instruct")
    expected = 2 * 12.9e9 * 2048 / (4 * 312e12 * PREFILL_MFU)
    assert t.prefill_time_s(400, 2048) == pytest.approx(expected)
    assert t.prefill_time_s(400, 4096) == pytest.approx(2 * expected)
    assert t.prefill_time_s(300, 2048) > expected
    assert t.prefill_time_s(150, 2048) > t.prefill_time_s(300, 2048)
    step = t.prefill_step(200, 2048)
    assert step.power_w_per_gpu == 200.0 and step.demand_power_w > 200
    assert step.time_s == pytest.approx(expected * 1410 / step.sm_clock_mhz)
    # Smaller active parameter counts prefill faster.
    assert load_a100_truth("olmoe-1b-7b").prefill_time_s(400, 2048) < expected / 5


def test_perturbation_scales_throughput_and_power() -> None:
    base = load_a100_truth("phi-3.5-moe-instruct")
    p = base.with_perturbation(Perturbation(throughput_factor=0.9, power_factor=1.1))
    assert p.throughput_tokens_per_s(300, 32) == pytest.approx(0.9 * base.throughput_tokens_per_s(300, 32))
    assert p.power_w(300, 32) == pytest.approx(1.1 * base.power_w(300, 32))
    assert p.prefill_time_s(400, 1000) == pytest.approx(base.prefill_time_s(400, 1000) / 0.9, rel=0.2)
    assert load_a100_truth("phi-3.5-moe-instruct", perturbation=Perturbation(1.2)).throughput_tokens_per_s(
        400, 1
    ) == pytest.approx(1.2 * base.throughput_tokens_per_s(400, 1))
    with pytest.raises(ValueError):
        Perturbation(throughput_factor=0.0)


def test_kv_capacity_is_modelled_and_overridable() -> None:
    caps = {m: load_a100_truth(m).kv_capacity_tokens for m in known_models()}
    # Mixtral: 4 x (80 GiB x 0.9 - 4 GiB) - 46.7e9 x 2 B of weights, 128 KiB per token.
    assert caps["mixtral-8x7b-instruct"] == math.floor((4 * (80 * 2**30 * 0.9 - 4 * 2**30) - 93.4e9) // 131072)
    assert all(100_000 < c < 5_000_000 for c in caps.values())
    assert load_a100_truth("olmoe-1b-7b", kv_capacity_tokens=1234).kv_capacity_tokens == 1234


def test_monotone_option() -> None:
    raw = load_a100_truth("qwen1.5-moe-a2.7b")
    assert raw.throughput_tokens_per_s(400, 64) < raw.throughput_tokens_per_s(350, 64)  # measured noise
    mono = load_a100_truth("qwen1.5-moe-a2.7b", monotone=True)
    for b in mono.batches:
        thr = [mono.throughput_tokens_per_s(c, b) for c in mono.caps_w]
        assert thr == sorted(thr)


def test_bad_csv(tmp_path) -> None:
    p = tmp_path / "sweep.csv"
    p.write_text("gpu,model,cap_w,batch\nA100,x,100,1\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_a100_truth("olmoe-1b-7b", csv_path=p)
    p.write_text("gpu,model,tp,cap_w,batch,avg_Tokens_per_s,avg_gpu_power\nA100,olmoe-1b-7b,4,100,one,1,1\n")
    with pytest.raises(ValueError, match=":2:"):
        load_a100_truth("olmoe-1b-7b", csv_path=p)
    with pytest.raises(ValueError, match="no rows"):
        load_a100_truth("mixtral-8x7b-instruct", csv_path=p)
