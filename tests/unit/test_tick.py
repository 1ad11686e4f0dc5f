"""The shared tick pipeline (pals_daemon/tick.py): what it writes, in which order, and what it observes.

The GPU views are the daemon's own ``GpuSlot`` over simulated GPUs (a real worker thread each), so the rules
are checked on the objects the daemon runs them on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from pals_daemon.control.types import Decision, EngineDecision
from pals_daemon.gpu.worker import GpuWorker
from pals_daemon.server.daemon import EXTERNAL_CAP_RECHECK_S, GpuSlot
from pals_daemon.server.engines import EngineRegistration, EngineRegistry
from pals_daemon.sim.gpu import make_sim_gpus
from pals_daemon.tick import (
    POWER_LIMIT,
    ActuationPlan,
    SettingWrite,
    apply_plan,
    engine_directives,
    gpu_observation,
    observe,
    plan_settings,
)

NOW_S = 100.0


@pytest.fixture
def slots() -> Iterator[list[GpuSlot]]:
    """Four A100 slots (100-400 W) at a requested 300 W, as the daemon holds them after a read."""
    gpus = make_sim_gpus("A100-SXM4", 4, lambda: NOW_S)
    out = []
    for g in gpus:
        g.set_power_limit_mw(300_000)
        reading = g.read()
        out.append(GpuSlot(GpuWorker(g), g.identity, g.constraints(), reading, reading.requested_limit_mw))
    yield out
    for s in out:
        s.worker.close()


def _decision(limits_w: dict[int, float]) -> Decision:
    return Decision(limits_w, {}, changed=True, reason="test")


def test_lowering_writes_come_before_raising_ones(slots: list[GpuSlot]) -> None:
    plan = plan_settings(slots, _decision({0: 350.0, 1: 200.0, 2: 300.0, 3: 120.0}), NOW_S)
    assert plan.lowering == (
        SettingWrite(1, POWER_LIMIT.name, 200_000),
        SettingWrite(3, POWER_LIMIT.name, 120_000),
    )
    assert plan.raising == (SettingWrite(0, POWER_LIMIT.name, 350_000),)
    assert plan.phases == (plan.lowering, plan.raising)
    # GPU 2 is already there: no write.
    assert all(w.gpu_index != 2 for w in plan.writes)


def test_limits_are_clamped_to_the_range_and_an_external_cap(slots: list[GpuSlot]) -> None:
    slots[2].external_cap_mw = 250_000
    slots[2].external_cap_seen_s = NOW_S - 1.0
    plan = plan_settings(slots, _decision({0: 20.0, 1: 900.0, 2: 400.0}), NOW_S)
    assert {w.gpu_index: w.value for w in plan.writes} == {0: 100_000, 1: 400_000, 2: 250_000}
    # Not seen for longer than the recheck interval: the controller may ask above it once.
    later = NOW_S + EXTERNAL_CAP_RECHECK_S
    assert {w.gpu_index: w.value for w in plan_settings(slots, _decision({2: 400.0}), later).writes} == {2: 400_000}


def test_uncontrolled_and_undecided_gpus_are_never_written(slots: list[GpuSlot]) -> None:
    slots[0].controlled = False
    plan = plan_settings(slots, _decision({0: 150.0, 1: 150.0}), NOW_S)
    assert [w.gpu_index for w in plan.writes] == [1]


def test_a_limit_someone_else_wrote_is_written_back_and_counts_as_lowering(slots: list[GpuSlot]) -> None:
    # The driver now holds 400 W that someone else wrote; the daemon's 300 W stands and goes back first.
    slots[1].reading = replace(slots[1].reading, requested_limit_mw=400_000, enforced_limit_mw=400_000)
    plan = plan_settings(slots, _decision({1: 300.0}), NOW_S)
    assert plan.lowering == (SettingWrite(1, POWER_LIMIT.name, 300_000),)
    assert plan.raising == ()


def test_an_enforced_limit_below_the_request_alone_is_no_reason_to_write(slots: list[GpuSlot]) -> None:
    slots[3].reading = replace(slots[3].reading, enforced_limit_mw=200_000)
    assert plan_settings(slots, _decision({3: 300.0}), NOW_S).writes == ()


@dataclass(frozen=True)
class _ClockKnob:
    """A second knob as an actuator author would add one (locked clocks): lowering when the clock drops."""

    name: str = "locked_clock_mhz"
    wanted_mhz: int = 1200
    current_mhz: int = 1410

    def wanted(self, g: GpuSlot, decision: Decision, now_s: float) -> tuple[int, bool] | None:
        return self.wanted_mhz, self.wanted_mhz < self.current_mhz


def test_a_new_knob_plugs_into_the_same_phases(slots: list[GpuSlot]) -> None:
    plan = plan_settings(slots[:1], _decision({0: 350.0}), NOW_S, knobs=(POWER_LIMIT, _ClockKnob()))
    assert plan.lowering == (SettingWrite(0, "locked_clock_mhz", 1200),)
    assert plan.raising == (SettingWrite(0, POWER_LIMIT.name, 350_000),)


def test_apply_plan_runs_phases_in_order_and_stops_after_a_failed_lowering_write() -> None:
    plan = ActuationPlan(
        lowering=(SettingWrite(0, "k", 1), SettingWrite(1, "k", 2)), raising=(SettingWrite(2, "k", 3),)
    )
    seen: list[int] = []

    def write(w: SettingWrite) -> int:
        seen.append(w.gpu_index)
        return w.value

    assert apply_plan(plan, {"k": write}) == [(w, w.value) for w in plan.writes]
    assert seen == [0, 1, 2]

    seen.clear()

    def failing(w: SettingWrite) -> int:
        seen.append(w.gpu_index)
        if w.gpu_index == 1:
            raise RuntimeError("refused")
        return w.value

    with pytest.raises(RuntimeError, match="refused"):
        apply_plan(plan, {"k": failing})
    assert seen == [0, 1]  # the raising write was sized on the failed one: never sent


def test_apply_plan_refuses_a_knob_without_a_writer_before_writing_anything() -> None:
    plan = ActuationPlan(lowering=(SettingWrite(0, "k", 1),), raising=(SettingWrite(1, "clock", 2),))
    seen: list[SettingWrite] = []
    with pytest.raises(ValueError, match="clock"):
        apply_plan(plan, {"k": lambda w: seen.append(w) or w.value})
    assert seen == []


def test_engine_directives_go_to_decided_sessions_and_record_the_limits() -> None:
    registry = EngineRegistry()
    a = registry.register(EngineRegistration("a", "m", (0,), 64, 8192))
    b = registry.register(EngineRegistration("b", "m", (1,), 64, 8192))
    decision = Decision({}, {"a": EngineDecision("a", 16, 2048, 0.0, 0.0, True)}, changed=True, reason="t")
    out = engine_directives(decision, registry.sessions(), sequence=7, ttl_s=2.5)
    assert [
        (s.registration.engine_id, d.max_num_seqs, d.max_num_batched_tokens, d.sequence, d.ttl_ms) for s, d in out
    ] == [("a", 16, 2048, 7, 2500)]
    assert (a.current_max_num_seqs, a.current_max_num_batched_tokens) == (16, 2048)
    assert (b.current_max_num_seqs, b.current_max_num_batched_tokens) == (64, 8192)
    assert a.take_observation(0.5).current_max_num_seqs == 16


def test_gpu_observation_budgets_an_uncontrolled_gpu_at_its_enforced_limit(slots: list[GpuSlot]) -> None:
    g = slots[0]
    g.external_cap_mw = 250_000
    g.external_cap_seen_s = NOW_S
    obs = gpu_observation(g, NOW_S)
    assert (obs.max_limit_w, obs.requested_limit_w, obs.controlled) == (250.0, 300.0, True)
    g.controlled = False
    g.reading = replace(g.reading, enforced_limit_mw=380_000)
    assert gpu_observation(g, NOW_S).enforced_limit_w == 380.0


def test_observe_takes_every_window_and_leaves_out_engines_on_unmanaged_gpus(slots: list[GpuSlot]) -> None:
    registry = EngineRegistry()
    registry.register(EngineRegistration("here", "m", (0, 1), 64, 8192))
    elsewhere = registry.register(EngineRegistration("elsewhere", "m", (3, 9), 64, 8192))
    elsewhere.window.decode_tokens = 5
    inp = observe(NOW_S, 0.5, 1000.0, slots, registry.sessions(), {})
    assert [e.engine_id for e in inp.engines] == ["here"]
    assert [g.index for g in inp.gpus] == [0, 1, 2, 3]
    assert inp.budget_w == 1000.0
    # The left-out engine's window was taken all the same (a new one started).
    assert elsewhere.window.decode_tokens == 0


def test_observation_carries_each_finished_request_with_tpot_judged_only_past_one_token() -> None:
    from pals_daemon.api import pals_pb2

    registry = EngineRegistry()
    a = registry.register(EngineRegistration("a", "m", (0,), 64, 8192))
    finished = [
        pals_pb2.FinishedRequest(ttft_ms=120.0, tpot_ms=30.0, prompt_tokens=100, output_tokens=20),
        pals_pb2.FinishedRequest(ttft_ms=90.0, tpot_ms=0.0, prompt_tokens=50, output_tokens=1),
    ]
    a.add_step_report(pals_pb2.StepReport(window_s=0.5, num_steps=3, finished=finished))
    a.add_step_report(pals_pb2.StepReport(window_s=0.5, num_steps=2, finished=finished[:1]))
    obs = a.take_observation(1.0)
    assert obs.finished_ms[0] == (120.0, 30.0) and obs.finished_ms[2] == (120.0, 30.0)
    assert obs.finished_ms[1][0] == 90.0 and obs.finished_ms[1][1] != obs.finished_ms[1][1]  # NaN: one token
    assert a.take_observation(0.5).finished_ms == ()
