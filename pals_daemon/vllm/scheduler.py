"""vLLM schedulers that apply the daemon's batch limits and stream telemetry to it (checked against vLLM 0.33.0).

``--scheduler-cls pals_daemon.vllm.Scheduler`` names the selector below: vLLM instantiates it with keyword
arguments, and its ``__new__`` returns a ``PalsScheduler`` (subclass of vLLM's ``Scheduler``) or an
``AsyncPalsScheduler`` (of ``AsyncScheduler``) as ``scheduler_config.async_scheduling`` says, so the async
overlap is kept when vLLM would have used it.

Before each ``schedule()`` the latest live directive sets ``max_num_active_reqs`` (admission into RUNNING;
running requests are never preempted for it) and ``max_num_scheduled_tokens`` (the step's token budget),
never above the configured values; the configured values come back when the directive expires or none came.
After each ``update_from_output()`` one step of telemetry is queued for the client thread. Every hook is
fail-open: an error in it is counted and logged once, and vLLM's own scheduling goes on.

This module imports vllm; ``pals_daemon.vllm`` imports it only when a scheduler class is first asked for.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler as VllmScheduler

from pals_daemon.vllm.client import EngineLinkClient

log = logging.getLogger(__name__)

# First-token times of requests still running: bounded so that a leak (a request freed by a path we do not
# hook) cannot grow without limit.
MAX_TRACKED_REQUESTS = 1 << 16


def discover_gpus(vllm_config: Any) -> tuple[list[str], list[int]]:
    """(GPU UUIDs, GPU indices) this engine runs on, for the Register message.

    ``PALS_GPU_UUIDS`` (comma-separated) wins. Otherwise the engine's slice of CUDA_VISIBLE_DEVICES (or of all
    devices): data-parallel local rank x world size, world size long. Entries that are UUIDs are sent as
    such; numeric ones are turned into UUIDs through NVML where it is available, else sent as indices.
    """
    env = os.environ.get("PALS_GPU_UUIDS", "").strip()
    if env:
        return [u.strip() for u in env.split(",") if u.strip()], []
    parallel = vllm_config.parallel_config
    world = int(getattr(parallel, "world_size", 1) or 1)
    local_rank = getattr(parallel, "data_parallel_rank_local", None)
    if local_rank is None:
        local_rank = getattr(parallel, "data_parallel_index", 0) or 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    if devices is None:
        devices = [str(i) for i in range(local_rank * world + world)]
    mine = devices[local_rank * world : local_rank * world + world]
    if all(d.startswith(("GPU-", "MIG-")) for d in mine):
        return mine, []
    try:
        import pynvml  # noqa: PLC0415 - nvidia-ml-py is a dependency of pals-daemon

        pynvml.nvmlInit()
        try:
            uuids = []
            for d in mine:
                if d.startswith(("GPU-", "MIG-")):
                    uuids.append(d)
                    continue
                uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(int(d)))
                uuids.append(uuid.decode() if isinstance(uuid, bytes) else uuid)
            return uuids, []
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML (CPU test, container): fall back to indices
        return [], [int(d) for d in mine if d.isdigit()]


def _model_name(vllm_config: Any) -> str:
    served = vllm_config.model_config.served_model_name
    if isinstance(served, (list, tuple)) and served:
        served = served[0]
    return str(served or vllm_config.model_config.model)


class _PalsMixin:
    """The shared hooks; mixed in before vLLM's scheduler class so that they wrap its methods."""

    # Set by _pals_init; declared for type checkers.
    pals_client: EngineLinkClient
    pals_configured: tuple[int, int]
    pals_errors: int

    def _pals_init(self, client: EngineLinkClient | None) -> None:
        s: Any = self
        # The values vLLM derived from its configuration: a directive may only lower them.
        self.pals_configured = (int(s.max_num_active_reqs), int(s.max_num_scheduled_tokens))
        # Without chunked prefill a token budget below a prompt's length would stall that request forever.
        self._pals_limit_tokens = bool(getattr(s.scheduler_config, "enable_chunked_prefill", True))
        if client is None:
            uuids, indices = discover_gpus(s.vllm_config)
            parallel = s.vllm_config.parallel_config
            client = EngineLinkClient.from_env(
                model=_model_name(s.vllm_config),
                gpu_uuids=uuids,
                gpu_indices=indices,
                max_num_seqs=self.pals_configured[0],
                max_num_batched_tokens=self.pals_configured[1],
                engine_index=getattr(parallel, "data_parallel_rank", None),
            )
        self.pals_client = client
        client.set_step_source(self._pals_decode_of, self._pals_gauges)
        self.pals_errors = 0
        self._pals_sched_start: dict[int, float] = {}
        self._pals_last_update = 0.0
        self._pals_arrived = 0
        self._pals_first_token: dict[str, float] = {}
        # Requests still waiting for their first token: the only ones a step has to look at for TTFT, so that
        # steady decode costs nothing per running request (was 70-130 ns each: bench/vllm_overhead.py).
        self._pals_awaiting_first: set[str] = set()
        self._pals_finished: list[tuple[float, float, int, int]] = []
        # This runs in the EngineCore process: start the client thread now, not on the first step.
        client.start()

    def _pals_error(self, where: str) -> None:
        self.pals_errors += 1
        if self.pals_errors == 1:
            log.exception("pals: %s failed; scheduling goes on with vLLM's own limits", where)

    def _pals_apply_limits(self) -> None:
        s: Any = self
        seqs, tokens = self.pals_configured
        limits = self.pals_client.current_limits()
        if limits is not None:
            seqs = min(seqs, limits[0])
            if self._pals_limit_tokens:
                tokens = min(tokens, limits[1])
        s.max_num_active_reqs = seqs
        s.max_num_scheduled_tokens = tokens

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            self._pals_apply_limits()
        except Exception:  # noqa: BLE001 - fail open
            self._pals_error("applying limits")
            s: Any = self
            s.max_num_active_reqs, s.max_num_scheduled_tokens = self.pals_configured
        output = super().schedule(*args, **kwargs)  # type: ignore[misc]
        # Under async scheduling step N+1 is scheduled before N's output arrives: key the start by output.
        starts = self._pals_sched_start
        if len(starts) > 16:
            starts.clear()  # an output that never came back (aborted step): do not leak
        starts[id(output)] = started
        return output

    def add_request(self, *args: Any, **kwargs: Any) -> Any:
        self._pals_arrived += 1
        request = args[0] if args else kwargs.get("request")
        request_id = getattr(request, "request_id", None)
        if request_id is not None and len(self._pals_awaiting_first) < MAX_TRACKED_REQUESTS:
            self._pals_awaiting_first.add(request_id)
        return super().add_request(*args, **kwargs)  # type: ignore[misc]

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any, *args: Any, **kwargs: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_runner_output, *args, **kwargs)  # type: ignore[misc]
        try:
            self._pals_record(scheduler_output, outputs)
        except Exception:  # noqa: BLE001 - fail open
            self._pals_error("recording telemetry")
        return outputs

    def _pals_record(self, scheduler_output: Any, outputs: Any) -> None:
        # The in-step part only: timing, first tokens, and the outputs object queued uncounted. Counting the
        # outputs and reading the gauges happen on the client thread (_pals_decode_of, _pals_gauges), which
        # took the in-step cost from ~25 to ~8 us (bench/vllm_overhead.py).
        now = time.perf_counter()
        started = self._pals_sched_start.pop(id(scheduler_output), now)
        # Overlapping steps (async): count each instant of wall time once.
        busy = now - max(started, self._pals_last_update)
        self._pals_last_update = now
        if self._pals_awaiting_first:
            self._pals_note_first_tokens()
        finished = ()
        if self._pals_finished:
            finished = tuple(self._pals_finished)
            self._pals_finished.clear()
        arrived, self._pals_arrived = self._pals_arrived, 0
        self.pals_client.record_scheduler_step(
            busy if busy > 0 else 0.0, scheduler_output.total_num_scheduled_tokens, outputs, arrived, finished
        )

    def _pals_note_first_tokens(self) -> None:
        """First-token times of the requests that were still waiting for one (for their TTFT)."""
        s: Any = self
        awaiting = self._pals_awaiting_first
        first = self._pals_first_token
        wall = time.time()  # Request.arrival_time is wall-clock
        requests = s.requests
        for request_id in list(awaiting):
            request = requests.get(request_id)
            if request is None:
                awaiting.discard(request_id)  # aborted or rejected before its first token
            elif request.num_output_tokens > 0:
                awaiting.discard(request_id)
                # setdefault: a streaming update of a running request must not move its first token.
                if len(first) < MAX_TRACKED_REQUESTS:
                    first.setdefault(request_id, wall)

    def _pals_decode_of(self, outputs: Any) -> int:
        """Tokens an update_from_output result carries (client thread; the outputs are no longer mutated)."""
        s: Any = self
        if s.num_spec_tokens:
            # Speculative decoding: an output may carry several accepted tokens.
            return sum(len(o.new_token_ids) for e in outputs.values() for o in e.outputs)
        return sum(len(e.outputs) for e in outputs.values())

    def _pals_gauges(self) -> tuple[int, int, float]:
        """(running, waiting, KV usage) read from the client thread: lengths and counters only."""
        s: Any = self
        return len(s.running), len(s.waiting), s.kv_cache_manager.usage

    def _free_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            self._pals_awaiting_first.discard(request.request_id)
            first = self._pals_first_token.pop(request.request_id, None)
            now = time.time()
            if first is None and request.num_output_tokens > 0:
                # Freed in the step that produced its first token (max_tokens 1, or a stop at once):
                # update_from_output frees it before _pals_record could note that token.
                first = now
            if first is not None:
                out = request.num_output_tokens
                ttft_ms = max(0.0, (first - request.arrival_time) * 1000.0)
                tpot_ms = (now - first) * 1000.0 / (out - 1) if out > 1 else 0.0
                if len(self._pals_finished) < 10_000:
                    self._pals_finished.append((ttft_ms, tpot_ms, int(request.num_prompt_tokens), int(out)))
        except Exception:  # noqa: BLE001 - fail open
            self._pals_error("recording a finished request")
        return super()._free_request(request, *args, **kwargs)  # type: ignore[misc]


class PalsScheduler(_PalsMixin, VllmScheduler):
    """vLLM's synchronous ``Scheduler`` with the daemon's limits and telemetry."""

    def __init__(self, *args: Any, pals_client: EngineLinkClient | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pals_init(pals_client)


class AsyncPalsScheduler(_PalsMixin, AsyncScheduler):
    """vLLM's ``AsyncScheduler`` (the default) with the daemon's limits and telemetry."""

    def __init__(self, *args: Any, pals_client: EngineLinkClient | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pals_init(pals_client)


class Scheduler:
    """The class to name in ``--scheduler-cls``: builds the subclass that vLLM's async/sync choice calls for.

    vLLM calls ``Scheduler(vllm_config=..., ...)``; ``__new__`` returns an instance of another class, so
    Python does not call ``__init__`` on it again.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
        impl = AsyncPalsScheduler if vllm_config.scheduler_config.async_scheduling else PalsScheduler
        return impl(*args, **kwargs)
