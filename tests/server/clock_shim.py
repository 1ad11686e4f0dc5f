"""Stands in for the controller's clock choice, which the SLO-driven MPC will make (not built yet): every
decision of the real controller gets a per-GPU SM clock ceiling added, nothing else changed.

In this process: ``plan = lock_clocks(daemon.controller, {0: 1410})`` (change ``plan`` between ticks).
As a daemon process: ``python tests/server/clock_shim.py <pals-daemon args>`` with TEST_LOCK_MHZ=<MHz> in
the environment locks every GPU at that ceiling (the real ``pals-daemon`` otherwise).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from pals_daemon.control.core import Controller
from pals_daemon.control.types import ControllerInput, Decision

# The environment variable naming the ceiling for the daemon process (not PALS_*: the tests strip those).
ENV = "TEST_LOCK_MHZ"


def lock_clocks(
    controller: Controller, plan: dict[int, int | None], seen: list[ControllerInput] | None = None
) -> dict[int, int | None]:
    """Make ``controller.step`` add ``plan`` (GPU index -> ceiling MHz, None unlocked) to every decision; each
    input the controller got is appended to ``seen``."""
    step = controller.step

    def step_with_clocks(inp: ControllerInput, *args: Any, **kwargs: Any) -> Decision:
        if seen is not None:
            seen.append(inp)
        decision = step(inp, *args, **kwargs)
        return dataclasses.replace(decision, gpu_locked_clocks_mhz=dict(plan))

    controller.step = step_with_clocks  # type: ignore[method-assign]
    return plan


if __name__ == "__main__":
    mhz = int(os.environ[ENV])
    original_step = Controller.step

    def step(self: Controller, inp: ControllerInput, *args: Any, **kwargs: Any) -> Decision:
        decision = original_step(self, inp, *args, **kwargs)
        return dataclasses.replace(decision, gpu_locked_clocks_mhz={g.index: mhz for g in inp.gpus})

    Controller.step = step  # type: ignore[method-assign]
    from pals_daemon.cli import daemon_main

    sys.exit(daemon_main.main())
