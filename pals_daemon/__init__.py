"""pals-daemon: power-aware LLM serving (GPU power caps and vLLM batch limits chosen together)."""

from __future__ import annotations

__version__ = "0.1.0"
