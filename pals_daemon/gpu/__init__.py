"""GPU backends: the only code that touches NVML (or simulates it)."""
