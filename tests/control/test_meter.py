"""MeterCompensation and lower_to (pals_daemon/control/meter.py): the undershoot after a budget drop."""

from __future__ import annotations

import pytest

from pals_daemon.control.meter import MeterCompensation, lower_to

W, SETTLE = 1.0, 0.2


def started(budget_w: float | None) -> MeterCompensation:
    m = MeterCompensation(W, SETTLE)
    assert m.ceiling_w(budget_w, 0.0, measured_w=1600.0) == budget_w  # the first tick: nothing to compare with
    return m


def test_a_drop_below_the_measured_power_holds_one_window_lower() -> None:
    m = started(1600.0)
    # (W x B - settle x P_old) / (W - settle) = (1000 - 0.2 x 1600) / 0.8 = 850 W: the average over [t, t + W]
    # of 0.2 s at 1600 W and 0.8 s at 850 W is 1000 W.
    assert m.ceiling_w(1000.0, 10.0, measured_w=1600.0) == pytest.approx(850.0)
    assert (0.2 * 1600 + 0.8 * 850) / 1.0 == pytest.approx(1000.0)
    assert m.ceiling_w(1000.0, 10.5, measured_w=1000.0) == pytest.approx(850.0)  # still in the window
    assert m.ceiling_w(1000.0, 11.0, measured_w=850.0) == 1000.0  # one window later: the budget itself


def test_no_hold_without_a_drop_or_when_power_is_already_under() -> None:
    m = started(1000.0)
    assert m.ceiling_w(1000.0, 1.0, measured_w=1200.0) == 1000.0  # same budget: nothing new to compensate
    assert m.ceiling_w(1400.0, 2.0, measured_w=1200.0) == 1400.0  # a rise
    assert m.ceiling_w(1300.0, 3.0, measured_w=1200.0) == 1300.0  # a drop the power is already under
    assert m.ceiling_w(None, 4.0, measured_w=1200.0) is None


def test_setting_a_budget_where_there_was_none_is_a_drop() -> None:
    m = started(None)
    assert m.ceiling_w(900.0, 5.0, measured_w=1500.0) == pytest.approx((900 - 0.2 * 1500) / 0.8)


def test_a_second_drop_in_the_window_lowers_further_and_restarts_it() -> None:
    m = started(1600.0)
    first = m.ceiling_w(1400.0, 1.0, measured_w=1600.0)
    second = m.ceiling_w(1200.0, 1.5, measured_w=1500.0)
    assert second < first and second == pytest.approx((1200 - 0.2 * 1500) / 0.8)
    assert m.ceiling_w(1200.0, 2.4, measured_w=1200.0) == pytest.approx(second)
    assert m.ceiling_w(1200.0, 2.5, measured_w=1200.0) == 1200.0


def test_window_zero_turns_it_off() -> None:
    m = MeterCompensation(0.0, SETTLE)
    m.ceiling_w(1600.0, 0.0, 1600.0)
    assert m.ceiling_w(1000.0, 1.0, 1600.0) == 1000.0


def test_lower_to_is_proportional_above_the_minimums_in_whole_watts() -> None:
    limits = {0: 400.0, 1: 300.0, 2: 100.0}
    mins = {0: 100.0, 1: 100.0, 2: 100.0}
    assert lower_to(limits, mins, fixed_w=50.0, ceiling_w=900.0) == limits  # already fits
    out = lower_to(limits, mins, fixed_w=50.0, ceiling_w=550.0)
    assert sum(out.values()) + 50.0 <= 550.0 and all(float(v).is_integer() for v in out.values())
    # Headroom 300 and 200 W shrink by the same factor; the GPU at its minimum stays there.
    assert out[2] == 100.0 and (out[0] - 100) / 300 == pytest.approx((out[1] - 100) / 200, abs=0.01)
    assert lower_to(limits, mins, fixed_w=50.0, ceiling_w=100.0) == mins  # impossible: the minimums
