"""MoE routing telemetry from vLLM's GPU workers (checked against vLLM 0.33.0): tokens per expert per layer.

``--worker-extension-cls pals_daemon.vllm.routing.RoutingTelemetryExtension`` makes vLLM mix this class into
its GPU worker. After the model loads, every MoE layer whose router is one of vLLM's ``BaseRouter``s gets a
capture callback (vLLM's own hook, ``BaseRouter.set_capture_fn``, called with the logical top-k expert ids of
every routed token, before any EPLB remapping). The callback adds the ids into a counter tensor on the GPU
with one ``scatter_add_``: no host synchronisation, so it also runs inside captured CUDA graphs. A daemon
thread copies the counters to pinned host memory on a side stream once per report interval (1 s by default)
and streams the increments to the daemon over ``EngineLink.ReportExpertLoad``, tagged with this GPU's UUID.

What is counted is the load on the experts this GPU hosts: with expert parallelism the layer's
``expert_map`` says which those are; without it (tensor parallelism) every GPU hosts a slice of every
expert and the shares come out equal, which is the truth for TP. Limits, stated rather than hidden: with
data parallelism each worker sees only its own rank's tokens; tokens of the padding that CUDA graphs add
are counted; layers whose kernel routes inside a monolithic kernel (no Python router call) are not hooked
and are reported by ``pals_routing_status``.

Nothing here runs at import: torch and vllm are imported when a worker attaches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pals_daemon.vllm.expert_reporter import ExpertLoadReporter, LayerCounts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutedLayer:
    """One hooked MoE layer: its id, how many (global) experts it routes to, and which this GPU hosts."""

    layer_id: int
    num_experts: int
    # Global ids of the experts on this GPU, ascending; None: all of them (no expert parallelism).
    local_experts: tuple[int, ...] | None


class ExpertLoadCounter:
    """Cumulative tokens per expert per layer, counted on the device where routing happens."""

    def __init__(self, layers: Sequence[RoutedLayer], device: Any) -> None:
        import torch  # noqa: PLC0415

        if not layers:
            raise ValueError("no MoE layer to count")
        self.layers = tuple(layers)
        self.device = torch.device(device)
        self._width = max(layer.num_experts for layer in self.layers)
        # int64: scatter_add_ needs the index dtype anyway, and it never wraps (2^63 tokens). One column more
        # than experts: an id out of range (a router's padding or sentinel) lands there instead of tripping a
        # device-side assert that would take the worker, and serving, down.
        self.counts = torch.zeros((len(self.layers), self._width + 1), dtype=torch.int64, device=self.device)
        on_cuda = self.device.type == "cuda"
        self._host = torch.zeros_like(self.counts, device="cpu").pin_memory() if on_cuda else None
        self._copy_stream = torch.cuda.Stream(device=self.device) if on_cuda else None
        self._local = [
            None if layer.local_experts is None else torch.tensor(layer.local_experts, dtype=torch.int64)
            for layer in self.layers
        ]

    def capture_fn(self, slot: int) -> Callable[[Any], None]:
        """The callback for the layer at ``slot``: adds a batch's top-k ids (any shape) to its counters."""
        row = self.counts[slot]
        overflow = self._width

        def capture(topk_ids: Any) -> None:
            # Out of range (negative or >= experts) -> the overflow column: clamp to [-1, width], then -1 -> width.
            ids = topk_ids.reshape(-1).long().clamp_(-1, overflow).remainder_(overflow + 1)
            row.scatter_add_(0, ids, ids.new_ones(ids.shape))

        return capture

    def snapshot(self) -> list[LayerCounts]:
        """(layer id, cumulative counts of the experts this GPU hosts), read without stalling the worker.

        On CUDA the copy runs on a side stream into pinned memory, so only this (reporter) thread waits
        for it; the counters may be read mid-step, which only moves a few tokens into the next window.
        """
        import torch  # noqa: PLC0415

        if self._copy_stream is not None and self._host is not None:
            with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
                self._host.copy_(self.counts, non_blocking=True)
            self._copy_stream.synchronize()
            host = self._host
        else:
            host = self.counts.clone()
        out: list[LayerCounts] = []
        for slot, layer in enumerate(self.layers):
            row = host[slot, : layer.num_experts]
            local = self._local[slot]
            out.append((layer.layer_id, (row if local is None else row[local]).tolist()))
        return out


def find_routed_layers(model: Any) -> tuple[list[tuple[Any, RoutedLayer]], list[str]]:
    """(routers to hook with their layer description, names of MoE layers that cannot be hooked)."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter  # noqa: PLC0415

    found: list[tuple[Any, RoutedLayer]] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        if not isinstance(router, BaseRouter):
            continue
        quant_method = getattr(module, "_quant_method", None)
        if getattr(quant_method, "is_monolithic", False):
            skipped.append(name)  # routes inside the kernel: the Python router never sees the ids
            continue
        found.append((router, RoutedLayer(_layer_id(module, len(found)), router.global_num_experts, _local(module))))
    return found, skipped


def _layer_id(module: Any, fallback: int) -> int:
    try:
        return int(module.layer_id)
    except Exception:  # noqa: BLE001 - a layer name without an index: number the layers in order
        return fallback


def _local(module: Any) -> tuple[int, ...] | None:
    expert_map = getattr(module, "expert_map", None)  # global id -> local id, -1 where not on this GPU
    if expert_map is None:
        return None
    return tuple(int(i) for i in (expert_map >= 0).nonzero().flatten().tolist())


def attach(
    model: Any, device: Any, gpu_uuid: str, reporter_factory: Callable[..., ExpertLoadReporter] | None = None
) -> tuple[ExpertLoadCounter, ExpertLoadReporter, list[str]] | None:
    """Hook every MoE router of ``model`` and start reporting; None when the model has no hookable router.

    An existing capture callback (vLLM's routed-experts capture) keeps being called after ours.
    """
    found, skipped = find_routed_layers(model)
    if skipped:
        log.warning("pals: %d MoE layer(s) route inside a monolithic kernel and are not counted", len(skipped))
    if not found:
        return None
    counter = ExpertLoadCounter([layer for _, layer in found], device)
    for slot, (router, _) in enumerate(found):
        router.set_capture_fn(_chained(counter.capture_fn(slot), getattr(router, "capture_fn", None)))
    factory = reporter_factory or ExpertLoadReporter.from_env
    reporter = factory(gpu_uuid=gpu_uuid, snapshot=counter.snapshot)
    reporter.start()
    log.info("pals: counting expert routing in %d MoE layer(s) on %s (%s)", len(found), device, gpu_uuid)
    return counter, reporter, skipped


def _chained(ours: Callable[[Any], None], theirs: Callable[[Any], None] | None) -> Callable[[Any], None]:
    if theirs is None:
        return ours

    def both(topk_ids: Any) -> None:
        ours(topk_ids)
        theirs(topk_ids)

    return both


def gpu_uuid_of(device: Any) -> str:
    """``PALS_GPU_UUID``, else the CUDA device's UUID in NVML's form (``GPU-...``), else ''."""
    env = os.environ.get("PALS_GPU_UUID", "").strip()
    if env:
        return env
    import torch  # noqa: PLC0415

    device = torch.device(device)
    if device.type != "cuda":
        return ""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


class RoutingTelemetryExtension:
    """The class to name in ``--worker-extension-cls``; vLLM adds it to its GPU worker's bases.

    vLLM calls ``init_worker_extension(worker)`` after the worker's device is set up and before the model is
    loaded, so the hooking is chained after ``load_model``. Method names carry a ``pals_`` prefix: vLLM
    refuses an extension whose attribute names clash with the worker's. Everything is fail-open: an error
    is logged and the worker serves on uncounted.
    """

    def init_worker_extension(self) -> None:
        """Arrange for the routers to be hooked once the model is loaded (idempotent)."""
        worker: Any = self
        if getattr(worker, "_pals_extension_ready", False):
            return  # vLLM and the pre-0.33 backport (pals_daemon.vllm.compat) may both call this
        worker._pals_extension_ready = True
        load_model = worker.load_model

        def load_model_then_attach(*args: Any, **kwargs: Any) -> Any:
            result = load_model(*args, **kwargs)
            worker.pals_attach_routing()
            return result

        worker.load_model = load_model_then_attach
        worker._pals_routing = None

    def pals_attach_routing(self) -> int:
        """Hook the loaded model's routers now (idempotent); returns the number of layers counted."""
        worker: Any = self
        state = getattr(worker, "_pals_routing", None)
        if state is not None:
            return len(state[0].layers)
        try:
            model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model
            device = getattr(worker, "device", "cpu")
            attached = attach(model, device, gpu_uuid_of(device))
        except Exception:  # noqa: BLE001 - fail open: serving matters more than telemetry
            log.exception("pals: could not hook the MoE routers; this worker reports no expert load")
            return 0
        worker._pals_routing = attached
        return 0 if attached is None else len(attached[0].layers)

    def pals_routing_status(self) -> dict[str, Any]:
        """What this worker counts and sends (for ``collective_rpc("pals_routing_status")``)."""
        state = getattr(self, "_pals_routing", None)
        if state is None:
            return {"layers": 0}
        counter, reporter, skipped = state
        return {
            "layers": len(counter.layers),
            "skipped_layers": list(skipped),
            "gpu_uuid": reporter.gpu_uuid,
            "reports_sent": reporter.reports_sent,
            "tokens_sent": reporter.tokens_sent,
            "connects": reporter.connects,
            "last_error": reporter.last_error,
        }

    def destroy_worker_extension(self) -> None:
        """Stop reporting (vLLM calls this at worker shutdown)."""
        state = getattr(self, "_pals_routing", None)
        if state is not None:
            state[1].close()
