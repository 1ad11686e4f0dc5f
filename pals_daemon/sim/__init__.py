"""The simulated node: GPUs with power limits, model ground truth, continuous-batching engines, traces."""

from __future__ import annotations

from pals_daemon.sim.a100 import load_a100_truth
from pals_daemon.sim.catalogue import known_models
from pals_daemon.sim.engine import EngineTotals, FinishedRequest, Request, SimEngine, StepWindow
from pals_daemon.sim.gpu import DEFAULT_CAP_DELAY_S, SimBackend, SimGpu, make_sim_gpus
from pals_daemon.sim.hardware import HardwareProfile, hardware_profile
from pals_daemon.sim.model_truth import ModelTruth, Perturbation
from pals_daemon.sim.trace import DEFAULT_TRACE, load_trace_csv, poisson_requests, shift_requests

__all__ = [
    "DEFAULT_CAP_DELAY_S",
    "DEFAULT_TRACE",
    "EngineTotals",
    "FinishedRequest",
    "HardwareProfile",
    "ModelTruth",
    "Perturbation",
    "Request",
    "SimBackend",
    "SimEngine",
    "SimGpu",
    "StepWindow",
    "hardware_profile",
    "known_models",
    "load_a100_truth",
    "load_trace_csv",
    "make_sim_gpus",
    "poisson_requests",
    "shift_requests",
]
