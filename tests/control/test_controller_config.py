"""ControllerConfig validation."""

from __future__ import annotations

import dataclasses

import pytest

from pals_daemon.control.config import ControllerConfig
from pals_daemon.errors import ConfigError


def test_defaults_are_valid_and_frozen() -> None:
    cfg = ControllerConfig()
    assert cfg.period_s == 0.5 and cfg.cap_step_w == 25 and cfg.hysteresis == 0.05
    assert cfg.demand_headroom == 1.2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.period_s = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"period_s": 0}, "period_s"),
        ({"cap_step_w": -25}, "cap_step_w"),
        ({"cap_step_w": float("nan")}, "cap_step_w"),
        ({"hysteresis": 0.9}, "hysteresis"),
        ({"demand_headroom": 0.8}, "demand_headroom"),
        ({"ratio_min": 1.2}, "ratio_min"),
        ({"ratio_ewma_alpha": 0}, "ratio_ewma_alpha"),
        ({"candidate_batches": ()}, "candidate_batches"),
        ({"candidate_batches": (4, 2)}, "ascending"),
        ({"candidate_batches": (0, 2)}, "candidate_batches"),
        ({"candidate_batches": [1, 2]}, "candidate_batches"),
        ({"gpu_kind": ""}, "gpu_kind"),
        ({"saturation_busy_fraction": 1.5}, "saturation_busy_fraction"),
        ({"ttft_boost_max": 0.5}, "ttft_boost_max"),
        ({"period_s": True}, "period_s"),
    ],
)
def test_invalid_values_are_rejected(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ControllerConfig(**kwargs)  # type: ignore[arg-type]


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        ControllerConfig(period_s=-1, cap_step_w=0, hysteresis=2.0)
    assert len(info.value.problems) == 3
