"""vLLM integration: a scheduler that applies the daemon's batch limits and streams telemetry to it.

``vllm serve MODEL --scheduler-cls pals_daemon.vllm.Scheduler`` (or ``PALS_VLLM_ENABLE=1`` with the
``vllm.general_plugins`` entry point). Nothing here imports vllm until the scheduler class is first used,
so the daemon (which never needs vllm) can import this package freely.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncPalsScheduler", "PalsScheduler", "Scheduler"]


def __getattr__(name: str) -> Any:
    # PEP 562: resolve the vllm-backed classes on first access only.
    if name in __all__:
        from pals_daemon.vllm import scheduler  # noqa: PLC0415

        return getattr(scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
