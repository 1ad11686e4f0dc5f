"""The ``vllm.general_plugins`` entry point: zero-flag activation of the pals scheduler.

vLLM calls ``register()`` in every process it starts (API server, EngineCore, workers), possibly several
times. It does nothing unless ``PALS_VLLM_ENABLE=1``; then it makes vLLM's default scheduler choice (no
``--scheduler-cls``) resolve to ``pals_daemon.vllm.Scheduler``, which itself follows vLLM's async/sync
choice. A scheduler class the user named explicitly is left alone. Nothing happens at import.

Whatever ``PALS_VLLM_ENABLE`` says, it backports vLLM 0.33's call of a worker extension's
``init_worker_extension`` to older vLLM (``pals_daemon.vllm.compat``): that acts only on workers that carry
the routing extension, which ``--worker-extension-cls`` already asked for.
"""

from __future__ import annotations

import os
from typing import Any

from pals_daemon.vllm.compat import backport_worker_extension_init

ENV_ENABLE = "PALS_VLLM_ENABLE"
_MARK = "_pals_default_scheduler"


def register() -> None:
    """Idempotently route vLLM's default scheduler choice to the pals selector (when enabled)."""
    backport_worker_extension_init()
    if os.environ.get(ENV_ENABLE) != "1":
        return
    from vllm.config.scheduler import SchedulerConfig  # noqa: PLC0415 - only ever called inside vLLM

    original = SchedulerConfig.get_scheduler_cls
    if getattr(original, _MARK, False):
        return  # already patched in this process

    def get_scheduler_cls(self: Any) -> Any:
        if self.scheduler_cls is None:
            from pals_daemon.vllm.scheduler import Scheduler  # noqa: PLC0415

            return Scheduler
        return original(self)

    setattr(get_scheduler_cls, _MARK, True)
    get_scheduler_cls.__wrapped__ = original  # type: ignore[attr-defined]
    SchedulerConfig.get_scheduler_cls = get_scheduler_cls  # type: ignore[method-assign]
