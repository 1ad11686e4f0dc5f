"""Performance model: profiles of (power cap, batch) -> throughput and power, and their interpolation."""

from __future__ import annotations

from pals_daemon.model.perf_model import PerfModel
from pals_daemon.model.profile import (
    Profile,
    ProfileError,
    ProfilePoint,
    ProfileRegistry,
    load_profile,
    load_profiles,
)

__all__ = [
    "PerfModel",
    "Profile",
    "ProfileError",
    "ProfilePoint",
    "ProfileRegistry",
    "load_profile",
    "load_profiles",
]
