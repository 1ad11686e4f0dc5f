"""ModelTruth: reproduces the A100 sweep, physics between points, DVFS, skew, mismatch, H100, prefill."""

from __future__ import annotations

import csv
import math
import time

import numpy as np
import pytest

from pals_daemon.sim.engine import Request
from pals_daemon.sim.hardware import A100_SXM4, H100_SXM5
from pals_daemon.sim.truth import (
    DEFAULT_SWEEP_CSV,
    PREFILL_MFU,
    PROFILE_OUTPUT_TOKENS,
    PROFILE_PROMPT_TOKENS,
    Perturbation,
    a100_physics,
    canonical_model_name,
    default_mlenergy_csv,
    known_h100_models,
    known_models,
    load_a100_truth,
    load_h100_truth,
    read_h100_sweep,
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


def test_grid_only_truth_interpolates_bilinearly_and_clamps() -> None:
    t = load_a100_truth("mixtral-8x7b-instruct", physics=False)
    assert t.physics is None
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
    assert t.decode_step(400, 128).step_time_s == pytest.approx(2 * t.decode_step(400, 64).step_time_s)


def test_physics_decides_between_points_and_outside() -> None:
    t = load_a100_truth("mixtral-8x7b-instruct")
    assert t.physics is not None
    for cap in t.caps_w:
        # Batch 16 is not measured: the physics puts it between batches 8 and 32.
        assert (
            t.throughput_tokens_per_s(cap, 8) < t.throughput_tokens_per_s(cap, 16) < t.throughput_tokens_per_s(cap, 32)
        )
    # Continuous in cap and batch (no jumps between table entries).
    for b in (1, 8, 64):
        for cap in (137.0, 250.0, 333.3):
            a, c = t.throughput_tokens_per_s(cap, b), t.throughput_tokens_per_s(cap + 0.5, b)
            assert abs(c - a) / a < 0.01
    assert t.throughput_tokens_per_s(300, 20.5) == pytest.approx(
        (t.throughput_tokens_per_s(300, 20) + t.throughput_tokens_per_s(300, 21)) / 2, rel=1e-3
    )
    # Caps outside the GPU's range act like its edges; a cap above the demand does not bind.
    assert t.throughput_tokens_per_s(50, 4) == t.throughput_tokens_per_s(100, 4)
    assert t.throughput_tokens_per_s(700, 4) == t.throughput_tokens_per_s(400, 4)
    # Beyond the largest measured batch the physics keeps going: more tokens per step, longer steps.
    s64, s128 = t.decode_step(400, 64), t.decode_step(400, 128)
    assert s64.step_time_s < s128.step_time_s < 2 * s64.step_time_s
    # Between measured caps, throughput rises with the cap at saturated batch (DVFS: more power, more clock).
    thr = [t.throughput_tokens_per_s(c, 64) for c in range(100, 401, 5)]
    assert all(b >= a * 0.999 for a, b in zip(thr, thr[1:], strict=False))


def test_dvfs_clock_falls_only_when_the_cap_binds() -> None:
    t = load_a100_truth("deepseek-moe-16b-base")
    assert t.physics is not None
    for b in (1, 8, 64):
        demand = float(t.physics.decode(b, 400.0)[1])  # the physics' uncapped draw (the residuals aside)
        assert t.decode_step(min(400.0, demand + 5), b).sm_clock_mhz == A100_SXM4.max_sm_clock_mhz
        assert t.decode_step(demand - 20, b).sm_clock_mhz < A100_SXM4.max_sm_clock_mhz
    # Decode is memory-bound: a cap that cuts the clock a lot costs much less throughput (batch 1, 200 -> 150 W).
    hi, lo = t.decode_step(200, 1), t.decode_step(150, 1)
    clock_drop = 1 - lo.sm_clock_mhz / hi.sm_clock_mhz
    thr_drop = 1 - t.throughput_tokens_per_s(150, 1) / t.throughput_tokens_per_s(200, 1)
    assert clock_drop > 2 * thr_drop


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
    # Where the cap does not bind (batch 1 draws about 208 W), both factors apply as they are.
    assert p.throughput_tokens_per_s(400, 1) == pytest.approx(0.9 * base.throughput_tokens_per_s(400, 1))
    assert p.power_w(400, 1) == pytest.approx(1.1 * base.power_w(400, 1))
    # Where it binds, the cap still holds: the extra demand lowers the clock and so the throughput.
    assert p.power_w(200, 64) == pytest.approx(base.power_w(200, 64), rel=1e-6)
    assert p.throughput_tokens_per_s(200, 64) < 0.9 * base.throughput_tokens_per_s(200, 64)
    assert p.prefill_time_s(400, 1000) == pytest.approx(base.prefill_time_s(400, 1000) / 0.9, rel=0.2)
    assert load_a100_truth("phi-3.5-moe-instruct", perturbation=Perturbation(1.2)).throughput_tokens_per_s(
        400, 1
    ) == pytest.approx(1.2 * base.throughput_tokens_per_s(400, 1))
    with pytest.raises(ValueError):
        Perturbation(throughput_factor=0.0)


def test_perturbation_for_prompt_mix_is_workload_dependent() -> None:
    assert Perturbation.for_prompt_mix(PROFILE_PROMPT_TOKENS, PROFILE_OUTPUT_TOKENS) == Perturbation()
    # The Azure code trace: long prompts, short outputs (means about 2,000 and 28 tokens).
    azure = Perturbation.for_prompt_mix(2048, 28)
    assert azure.magnitude >= 0.10
    assert azure.throughput_factor < 0.9 and azure.power_factor > 1.0
    # Longer contexts: slower; shorter: faster; monotone in the context.
    f = [Perturbation.for_prompt_mix(p, 100).throughput_factor for p in (64, 256, 1024, 4096, 16384)]
    assert f == sorted(f, reverse=True) and f[0] > 1.0 > f[-1]
    assert Perturbation.for_prompt_mix(1e9, 0).throughput_factor == 0.5  # clamped
    reqs = [Request(0.0, 2000, 20), Request(1.0, 2096, 36)]
    assert Perturbation.for_requests(reqs) == Perturbation.for_prompt_mix(2048, 28)
    assert Perturbation.for_requests([]) == Perturbation()


def test_expert_routing_skew_straggler_and_per_gpu_caps() -> None:
    t = load_a100_truth("mixtral-8x7b-instruct")
    for cap, b in ((400.0, 64), (200.0, 32), (250.0, 8), (333.3, 16)):
        uni = t.decode_step_skewed([cap] * 4, b, [0.25] * 4)
        ref = t.decode_step(cap, b)
        assert uni.step_time_s == pytest.approx(ref.step_time_s, rel=1e-3 if cap % 1 else 1e-9)
        for pw, clk in zip(uni.power_w_per_gpu, uni.sm_clock_mhz_per_gpu, strict=True):
            assert pw == pytest.approx(ref.power_w_per_gpu, rel=1e-3 if cap % 1 else 1e-9)
            assert clk == pytest.approx(ref.sm_clock_mhz, rel=1e-3 if cap % 1 else 1e-9)
    # Skew: the GPU with the hottest experts is the straggler; the others wait and draw less.
    share = [0.4, 0.2, 0.2, 0.2]
    sk = t.decode_step_skewed([400.0] * 4, 64, share)
    assert sk.straggler == 0
    assert sk.step_time_s > t.decode_step(400, 64).step_time_s
    assert sk.power_w_per_gpu[0] > max(sk.power_w_per_gpu[1:])
    # Routing-aware caps: lower caps on the lightly loaded GPUs save energy at (almost) the same step time.
    best = None
    for cap in range(100, 401, 10):
        s = t.decode_step_skewed([400.0, cap, cap, cap], 64, share)
        if s.step_time_s <= sk.step_time_s * 1.001:
            best = s if best is None or sum(s.power_w_per_gpu) < sum(best.power_w_per_gpu) else best
    assert best is not None
    assert best.step_time_s * sum(best.power_w_per_gpu) < 0.95 * sk.step_time_s * sum(sk.power_w_per_gpu)
    with pytest.raises(ValueError):
        t.decode_step_skewed([400.0] * 3, 8, [0.25] * 3)
    with pytest.raises(ValueError):
        t.decode_step_skewed([400.0] * 4, 8, [-1.0, 1.0, 1.0, 1.0])


@pytest.mark.skipif(not default_mlenergy_csv().exists(), reason="ML.ENERGY CSV not present")
def test_h100_truth_from_mlenergy() -> None:
    pairs = known_h100_models()
    assert ("Qwen/Qwen3-30B-A3B-Instruct-2507", 2) in pairs
    t = load_h100_truth("Qwen/Qwen3-30B-A3B-Instruct-2507", 2)
    assert t.hardware is H100_SXM5 and t.num_gpus == 2 and t.caps_w == (700.0,)
    sw = read_h100_sweep("Qwen/Qwen3-30B-A3B-Instruct-2507", 2)
    # The batch-64 row: median ITL 18.7 ms, 447 W per GPU.
    step = t.decode_step(700, 64)
    assert step.step_time_s == pytest.approx(sw.itl_s[list(sw.max_num_seqs).index(64)], rel=1e-9)
    assert step.power_w_per_gpu == pytest.approx(447.1, abs=1)
    # The cap dimension is modelled: a binding cap lowers power and throughput.
    assert t.power_w(350, 256) <= 350 * 1.02 < t.power_w(700, 256)
    assert t.throughput_tokens_per_s(350, 256) < t.throughput_tokens_per_s(700, 256)
    assert t.kv_capacity_tokens > 100_000
    with pytest.raises(ValueError, match="no H100"):
        load_h100_truth("Qwen/Qwen3-30B-A3B-Instruct-2507", 3)


def test_decode_step_is_fast() -> None:
    t = load_a100_truth("olmoe-1b-7b")
    t0 = time.perf_counter()
    n = 0
    for cap in range(100, 401, 3):
        for b in range(1, 129, 3):
            t.throughput_tokens_per_s(cap + 0.37, b)
            t.decode_step(cap + 0.37, b)
            n += 2
    assert (time.perf_counter() - t0) / n < 200e-6


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


def test_physics_skew_uniform_equals_decode_and_straggler_sets_the_step() -> None:
    ph = a100_physics("olmoe-1b-7b")
    assert ph is not None
    t, p, f = ph.decode(32.0, 250.0)
    step, power, clocks, i = ph.skewed(32.0, [250.0] * 4, [1.0] * 4)
    assert step == pytest.approx(float(t), rel=1e-12)
    assert np.allclose(power, float(p)) and np.allclose(clocks, float(f))
    step2, power2, _, i2 = ph.skewed(32.0, [250.0] * 4, [0.1, 0.1, 0.5, 0.3])
    assert i2 == 2 and step2 > step and power2[2] == max(power2)
    # The clock falls only when the cap binds: far above the demand the clock is at maximum.
    assert float(ph.decode(1.0, 400.0)[2]) == 1.0
    assert 0.15 <= float(ph.decode(64.0, 100.0)[2]) < 1.0
