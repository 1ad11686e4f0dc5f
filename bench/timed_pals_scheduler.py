"""The pals scheduler with its two per-step hooks timed, for bench/vllm_server_overhead.py (runs inside vLLM).

``--scheduler-cls timed_pals_scheduler.Scheduler`` (with bench/ on PYTHONPATH): the same selector and classes
as ``pals_daemon.vllm.Scheduler``, plus time.perf_counter_ns around ``_pals_apply_limits`` (before
``schedule()``) and ``_pals_record`` (after ``update_from_output()``). Each step's sum of the two is kept, and
every DUMP_EVERY steps the whole list is written to ``$PALS_BENCH_HOOK_OUT`` (JSON; replaced atomically), so
the bench can read it while the server runs. The timer adds two clock reads per hook (~0.1 us).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from pals_daemon.vllm.scheduler import AsyncPalsScheduler, PalsScheduler

DUMP_EVERY = 200
MAX_SAMPLES = 1 << 20


class _Timed:
    _bench_apply_ns = 0
    _bench_steps_ns: list[int]

    def _pals_apply_limits(self) -> None:
        t0 = time.perf_counter_ns()
        super()._pals_apply_limits()  # type: ignore[misc]
        self._bench_apply_ns = time.perf_counter_ns() - t0

    def _pals_record(self, scheduler_output: Any, outputs: Any) -> None:
        t0 = time.perf_counter_ns()
        super()._pals_record(scheduler_output, outputs)  # type: ignore[misc]
        total = time.perf_counter_ns() - t0 + self._bench_apply_ns
        steps = self.__dict__.setdefault("_bench_steps_ns", [])
        if len(steps) < MAX_SAMPLES:
            steps.append(total)
        if len(steps) % DUMP_EVERY == 0:
            path = os.environ.get("PALS_BENCH_HOOK_OUT")
            if path:
                tmp = f"{path}.tmp"
                with open(tmp, "w") as f:
                    json.dump(steps, f)
                os.replace(tmp, path)


class TimedPalsScheduler(_Timed, PalsScheduler):
    pass


class TimedAsyncPalsScheduler(_Timed, AsyncPalsScheduler):
    pass


class Scheduler:
    """Like pals_daemon.vllm.Scheduler: the timed async or sync class as vLLM's configuration says."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
        impl = TimedAsyncPalsScheduler if vllm_config.scheduler_config.async_scheduling else TimedPalsScheduler
        return impl(*args, **kwargs)
