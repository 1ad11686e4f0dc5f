"""PALS's QoS windows: judged once a window covers its length, on the rate over the whole window."""

from __future__ import annotations

from pals_daemon.control.qos import QosWindows


def test_window_closes_only_when_full_and_judges_the_whole_window() -> None:
    q = QosWindows()
    # 4 ticks of 0.5 s: one slow tick inside a window whose mean rate meets the target is not a violation.
    for tokens in (100, 20, 100, 100):
        q.add(tokens, 0.5, window_s=2.0, target=150.0)
    assert (q.windows, q.violations) == (1, 0)
    for tokens in (50, 50, 50, 50):
        q.add(tokens, 0.5, window_s=2.0, target=150.0)
    assert (q.windows, q.violations) == (2, 1)
    assert q.violation_fraction == 0.5
    q.add(10, 0.5, window_s=2.0, target=150.0)
    assert q.windows == 2  # a partial window is not judged yet


def test_no_target_counts_windows_without_violations() -> None:
    q = QosWindows()
    for _ in range(8):
        q.add(0, 0.5, window_s=1.0, target=None)
    assert (q.windows, q.violations, q.violation_fraction) == (4, 0, 0.0)
