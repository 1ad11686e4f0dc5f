"""SimEngine: scheduling limits, KV capacity, token budget, latencies, windows, energy, speed."""

from __future__ import annotations

import time

import pytest

from pals_daemon.sim.engine import Request, SimEngine
from pals_daemon.sim.gpu import SimGpu, make_sim_gpus
from pals_daemon.sim.trace import load_trace_csv, poisson_requests
from pals_daemon.sim.truth import ModelTruth, load_a100_truth


class FakeClock:
    """A settable simulated clock."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _setup(model: str = "olmoe-1b-7b", delay: float = 0.2) -> tuple[ModelTruth, list[SimGpu], FakeClock]:
    clock = FakeClock()
    return load_a100_truth(model), make_sim_gpus("A100-SXM4", 4, clock, cap_delay_s=delay), clock


def _run(engine: SimEngine, clock: FakeClock, tick_s: float = 0.5, max_s: float = 10_000.0) -> None:
    t = clock.t
    while not engine.done and t < max_s:
        t += tick_s
        clock.t = t
        engine.advance(t)


def test_single_request_latencies_are_exact() -> None:
    truth, gpus, clock = _setup("mixtral-8x7b-instruct")
    engine = SimEngine("e", truth, gpus, [Request(1.0, 100, 5)], 8, 4096)
    _run(engine, clock)
    [f] = engine.totals.finished
    first_step = truth.prefill_time_s(400, 100) + truth.decode_step(400, 1).step_time_s
    assert f.ttft_ms == pytest.approx(first_step * 1000)
    assert f.tpot_ms == pytest.approx(truth.decode_step(400, 1).step_time_s * 1000)
    assert f.finish_s == pytest.approx(1.0 + first_step + 4 * truth.decode_step(400, 1).step_time_s)
    assert engine.totals.output_tokens == 5 and engine.totals.prefill_tokens == 100


def test_never_more_running_than_max_num_seqs_and_budget_respected() -> None:
    truth, gpus, clock = _setup()
    reqs = poisson_requests(40.0, 30.0, [200, 800, 3000], [5, 50, 300], seed=3)
    engine = SimEngine("e", truth, gpus, reqs, 16, 1024, record_steps=True)
    _run(engine, clock)
    log = engine.step_log
    assert log and engine.totals.requests_finished == len(reqs)
    assert max(s.num_running for s in log) == 16
    for s in log:
        assert s.decode_seqs + s.prefill_tokens <= 1024
        assert s.num_running <= 16


def test_lowered_limits_apply_from_next_step_without_preemption() -> None:
    truth, gpus, clock = _setup()
    reqs = poisson_requests(50.0, 20.0, 300, 200, seed=1)
    engine = SimEngine("e", truth, gpus, reqs, 32, 2048, record_steps=True)
    clock.t = 5.0
    engine.advance(5.0)
    assert engine.num_running > 4
    engine.apply_limits(4, 100_000)
    assert engine.limits == (4, 2048)  # clamped to the configured token budget
    cut = len(engine.step_log)
    _run(engine, clock)
    after = engine.step_log[cut:]
    # Running requests drain (no preemption); no new admission until below the limit, then never above.
    first_ok = next(i for i, s in enumerate(after) if s.num_running <= 4)
    assert all(s.num_running <= 4 for s in after[first_ok:])
    assert all(s.max_num_seqs == 4 for s in after)
    engine.apply_limits(0, 0)
    assert engine.limits == (1, 1)
    engine.reset_limits()
    assert engine.limits == (32, 2048)


def test_kv_capacity_bounds_admission() -> None:
    truth, gpus, clock = _setup()
    reqs = [Request(0.01 * i, 1000, 100) for i in range(40)]
    engine = SimEngine("e", truth, gpus, reqs, 64, 8192, kv_capacity_tokens=4500, record_steps=True)
    _run(engine, clock)
    assert engine.totals.requests_finished == 40
    assert max(s.num_running for s in engine.step_log) == 4  # 4 x 1,100 tokens fit in 4,500
    assert max(s.kv_used_tokens for s in engine.step_log) <= 4500
    assert engine.kv_used_tokens == 0


def test_request_larger_than_kv_cache_is_rejected() -> None:
    truth, gpus, clock = _setup()
    reqs = [Request(0.0, 5000, 10), Request(0.1, 100, 10)]
    engine = SimEngine("e", truth, gpus, reqs, 8, 8192, kv_capacity_tokens=1000)
    _run(engine, clock)
    assert engine.done
    assert (engine.totals.requests_rejected, engine.totals.requests_finished) == (1, 1)


def test_chunked_prefill_splits_long_prompts() -> None:
    truth, gpus, clock = _setup()
    engine = SimEngine("e", truth, gpus, [Request(0.0, 5000, 3)], 4, 512, record_steps=True)
    _run(engine, clock)
    prefills = [s.prefill_tokens for s in engine.step_log if s.prefill_tokens]
    assert prefills == [512] * 9 + [392]


def test_windows_add_up_to_totals() -> None:
    truth, gpus, clock = _setup()
    reqs = poisson_requests(10.0, 20.0, [100, 2000], [1, 20, 200], seed=5)
    engine = SimEngine("e", truth, gpus, reqs, 32, 4096)
    windows = []
    t = 0.0
    while not engine.done:
        t += 0.5
        engine.advance(t)
        windows.append(engine.take_window())
    assert sum(w.window_s for w in windows) == pytest.approx(t)
    assert sum(w.decode_tokens for w in windows) == engine.totals.output_tokens == sum(r.output_tokens for r in reqs)
    assert sum(w.prefill_tokens for w in windows) == sum(r.prompt_tokens for r in reqs)
    assert sum(w.arrived_requests for w in windows) == len(reqs) == engine.totals.requests_arrived
    assert sum(len(w.finished) for w in windows) == len(reqs)
    assert sum(w.num_steps for w in windows) == engine.totals.num_steps
    assert sum(w.busy_s for w in windows) == pytest.approx(engine.totals.busy_s)
    assert all(0.0 <= w.kv_cache_usage <= 1.0 for w in windows)
    assert all(w.busy_s <= w.window_s + 0.5 for w in windows)
    assert windows[-1].num_running == windows[-1].num_waiting == 0
    one_token = [f for w in windows for f in w.finished if f.output_tokens == 1]
    assert one_token and all(f.tpot_ms == 0.0 for f in one_token)
    assert len(engine.totals.tpot_ms) == len(reqs) - len(one_token)


def test_cap_change_reaches_steps_after_the_delay() -> None:
    truth, gpus, clock = _setup("mixtral-8x7b-instruct", delay=0.3)
    reqs = [Request(0.0, 50, 2000) for _ in range(64)]
    engine = SimEngine("e", truth, gpus, reqs, 64, 8192, record_steps=True)
    clock.t = 2.0
    engine.advance(2.0)
    for g in gpus:
        g.set_power_limit_mw(200_000)
    clock.t = 6.0
    engine.advance(6.0)
    for s in engine.step_log:
        if s.start_s + 1e-9 < 2.3:
            assert s.cap_w == 400
        else:
            assert s.cap_w == 200
    # The step in flight at 2.3 s still ran at the old pace, but its power was clamped at 2.3 s.
    r = gpus[0].read()
    assert r.power_capped and r.power_instant_mw <= 200_000
    assert r.power_avg_mw <= 200_000


def test_min_cap_among_the_engines_gpus_sets_the_pace() -> None:
    truth, gpus, clock = _setup("mixtral-8x7b-instruct", delay=0.0)
    gpus[2].set_power_limit_mw(150_000)
    engine = SimEngine("e", truth, gpus, [Request(0.0, 20, 500) for _ in range(8)], 8, 8192, record_steps=True)
    clock.t = 3.0
    engine.advance(3.0)
    assert {s.cap_w for s in engine.step_log} == {150.0}
    readings = [g.read() for g in gpus]
    assert readings[2].power_capped and not readings[0].power_capped
    assert max(r.power_instant_mw for r in readings) <= 150_000


def test_lower_cap_improves_tokens_per_joule_at_saturation_like_the_data() -> None:
    results = {}
    for cap_mw in (400_000, 200_000):
        truth, gpus, clock = _setup("mixtral-8x7b-instruct", delay=0.0)
        for g in gpus:
            g.set_power_limit_mw(cap_mw)
        reqs = [Request(0.0, 16, 300) for _ in range(256)]
        engine = SimEngine("e", truth, gpus, reqs, 64, 8192)
        _run(engine, clock, tick_s=5.0)
        busy_end = max(f.finish_s for f in engine.totals.finished)
        energy_j = sum(g.energy_j(busy_end) for g in gpus)
        results[cap_mw] = (engine.totals.output_tokens / busy_end, engine.totals.output_tokens / energy_j)
    (thr_hi, tpj_hi), (thr_lo, tpj_lo) = results[400_000], results[200_000]
    assert thr_lo < 0.8 * thr_hi  # the cap costs throughput...
    assert tpj_lo > 1.2 * tpj_hi  # ...and gains tokens/J (sweep CSV: 0.387 vs 0.287 tok/J at batch 64)


def test_energy_matches_recorded_activity_and_idle() -> None:
    truth, gpus, clock = _setup()
    engine = SimEngine("e", truth, gpus, [Request(10.0, 500, 50)], 4, 8192)
    clock.t = 30.0
    engine.advance(30.0)
    f = engine.totals.finished[0]
    busy = f.finish_s - 10.0
    e = gpus[0].read().energy_mj / 1000
    assert e > 60.0 * 30.0
    assert e < 60.0 * (30.0 - busy) + 400.0 * busy


def test_idle_engine_and_straddling_step() -> None:
    truth, gpus, clock = _setup("mixtral-8x7b-instruct")
    engine = SimEngine("e", truth, gpus, [Request(5.0, 8000, 1)], 4, 8192)
    engine.advance(4.0)
    assert engine.time_s == 4.0 and engine.num_waiting == 0
    engine.advance(5.01)
    assert engine.time_s > 5.01  # the step started at 5.0 runs past 5.01
    assert engine.take_window().num_steps == 1
    engine.advance(5.02)
    assert engine.take_window().num_steps == 0
    _run(engine, clock)
    assert engine.done


def test_engine_rejects_mismatched_gpus() -> None:
    truth, gpus, clock = _setup()
    with pytest.raises(ValueError, match="4 GPUs"):
        SimEngine("e", truth, gpus[:2], [], 4, 128)
    h100 = make_sim_gpus("H100-SXM5", 4, clock)
    with pytest.raises(ValueError, match="A100-SXM4"):
        SimEngine("e", truth, h100, [], 4, 128)
    with pytest.raises(ValueError):
        SimEngine("e", truth, gpus, [], 0, 128)


def test_azure_trace_first_five_minutes_replays_with_sane_latencies() -> None:
    reqs = load_trace_csv(limit_s=300.0)
    assert len(reqs) == 781
    for model, ttft_p90_max_ms, tpot_p90_max_ms in (
        ("olmoe-1b-7b", 2_000, 100),
        ("mixtral-8x7b-instruct", 120_000, 1_000),  # bursts overload Mixtral at 8,192-token steps
    ):
        truth, gpus, clock = _setup(model)
        engine = SimEngine("e", truth, gpus, reqs, 64, 8192)
        _run(engine, clock, max_s=1_000)
        tot = engine.totals
        assert engine.done and tot.requests_finished == 781
        assert tot.output_tokens == sum(r.output_tokens for r in reqs)
        ttft = sorted(tot.ttft_ms)
        tpot = sorted(tot.tpot_ms)
        assert ttft[0] > 0 and tpot[0] > 0
        assert ttft[int(0.9 * len(ttft))] < ttft_p90_max_ms
        assert tpot[int(0.9 * len(tpot))] < tpot_p90_max_ms
        assert 0.0 < tot.slo_attainment(ttft_slo_ms=ttft_p90_max_ms) <= 1.0


def test_full_hour_trace_is_fast() -> None:
    reqs = load_trace_csv()
    truth, gpus, clock = _setup("mixtral-8x7b-instruct")
    engine = SimEngine("e", truth, gpus, reqs, 64, 8192)
    start = time.process_time()
    t = 0.0
    while not engine.done:
        t += 0.5
        clock.t = t
        engine.advance(t)
        engine.take_window()
        gpus[0].read()
    assert time.process_time() - start < 5.0
    assert engine.totals.requests_finished == len(reqs) == 8819
