"""The pals scheduler with a recorder of the batch limit it applies, for the fail-open checks (runs inside vLLM).

``--scheduler-cls limit_trace.Scheduler`` (with tests/vllm_server on PYTHONPATH): the same selector and classes
as ``pals_daemon.vllm.Scheduler``. After each ``schedule()`` it appends ``monotonic_s limit running kind`` to
``$PALS_TEST_LIMIT_TRACE``: ``limit`` when the admission limit in force (``max_num_active_reqs``: the
directive's, or the configured one once it expired) differs from the previous step's; ``admit`` at the first
step after such a change that runs more requests than the limit before it; ``over`` when a step admitted
requests beyond the limit in force (vLLM's admission never does; running requests above a limit that was just
lowered are not preempted, and are not ``over``). A few lines per directive change, none per steady step.

Why: vLLM's /metrics shows the engine's gauges only as fast as its API server gets to them; on 2 busy cores it
lagged the engine by seconds (issue 13), which says nothing about when the pals client let the limit go. The
EngineCore's own monotonic clock is the machine's CLOCK_MONOTONIC, the one the test stamps its signal with.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pals_daemon.vllm.scheduler import AsyncPalsScheduler, PalsScheduler


class _LimitTrace:
    _trace_limit: int | None = None
    _trace_below: int | None = None  # the limit before the last change, until a step runs more than it
    _trace_running = 0  # the previous step's

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        output = super().schedule(*args, **kwargs)  # type: ignore[misc]
        s: Any = self
        limit, running = int(s.max_num_active_reqs), len(s.running)
        if limit != self._trace_limit:
            before, self._trace_limit = self._trace_limit, limit
            self._trace_below = before if before is not None and running <= before else None
            self._trace_write(limit, running, "limit")
        elif self._trace_below is not None and running > self._trace_below:
            self._trace_below = None
            self._trace_write(limit, running, "admit")
        if running > limit and running > self._trace_running:
            self._trace_write(limit, running, "over")
        self._trace_running = running
        return output

    @staticmethod
    def _trace_write(limit: int, running: int, kind: str) -> None:
        with open(os.environ["PALS_TEST_LIMIT_TRACE"], "a") as f:
            f.write(f"{time.monotonic():.4f} {limit} {running} {kind}\n")


class TracedPalsScheduler(_LimitTrace, PalsScheduler):
    pass


class TracedAsyncPalsScheduler(_LimitTrace, AsyncPalsScheduler):
    pass


class Scheduler:
    """Like pals_daemon.vllm.Scheduler: the traced async or sync class as vLLM's configuration says."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
        impl = TracedAsyncPalsScheduler if vllm_config.scheduler_config.async_scheduling else TracedPalsScheduler
        return impl(*args, **kwargs)
