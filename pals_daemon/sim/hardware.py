"""Named GPU hardware profiles for the simulated node (power-limit range, idle power, clocks, bandwidth)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HardwareProfile:
    """Static facts about one GPU model, in watts, MHz, TB/s, GB and TFLOP/s."""

    name: str
    min_limit_w: float
    max_limit_w: float
    default_limit_w: float
    idle_power_w: float
    max_sm_clock_mhz: int
    memory_bandwidth_tb_s: float
    # What NVML's nvmlDeviceGetName returns for this model.
    nvml_name: str = ""
    memory_gb: float = 0.0
    # Dense (no sparsity) BF16 tensor-core peak, from the vendor datasheet.
    peak_bf16_tflop_s: float = 0.0


# data/gpu_power_limits.csv, row "A100-SXM4-80GB,100,400,400,52-68,1410,2.04,...": limits 100-400 W, default
# 400 W, idle 52-68 W (a range: we take the midpoint, 60 W), max SM clock 1410 MHz, 2.04 TB/s.
# Memory 80 GB from the row's name. BF16 peak 312 TFLOP/s dense: NVIDIA A100 Tensor Core GPU datasheet.
A100_SXM4 = HardwareProfile(
    name="A100-SXM4",
    min_limit_w=100.0,
    max_limit_w=400.0,
    default_limit_w=400.0,
    idle_power_w=(52.0 + 68.0) / 2,  # midpoint of the 52-68 W range in the CSV
    max_sm_clock_mhz=1410,
    memory_bandwidth_tb_s=2.04,
    nvml_name="NVIDIA A100-SXM4-80GB",
    memory_gb=80.0,
    peak_bf16_tflop_s=312.0,
)

# data/gpu_power_limits.csv, row "H100-SXM5-80GB,200,700,700,72-75,1980,3.35,...": limits 200-700 W, default
# 700 W, idle 72-75 W (a range: we take the midpoint, 73.5 W), max SM clock 1980 MHz, 3.35 TB/s.
# NVML name as in the row's source (nvidia-smi -q of an "H100 80GB HBM3"). BF16 peak 989 TFLOP/s dense: NVIDIA
# H100 Tensor Core GPU datasheet (SXM5; 1,979 TFLOP/s is the with-sparsity figure).
H100_SXM5 = HardwareProfile(
    name="H100-SXM5",
    min_limit_w=200.0,
    max_limit_w=700.0,
    default_limit_w=700.0,
    idle_power_w=(72.0 + 75.0) / 2,  # midpoint of the 72-75 W range in the CSV
    max_sm_clock_mhz=1980,
    memory_bandwidth_tb_s=3.35,
    nvml_name="NVIDIA H100 80GB HBM3",
    memory_gb=80.0,
    peak_bf16_tflop_s=989.0,
)

# data/gpu_power_limits.csv, row "H200-SXM-141GB,,700,700,,1980,4.8": default and max limit 700 W, max SM clock
# 1980 MHz, 4.8 TB/s, 141 GB HBM3e (NVIDIA H200 datasheet). The row has no minimum limit nor idle power: 200 W is
# the minimum arXiv 2605.11999 reports for its H200s ("no cap at or above the 200 W minimum binds"); idle 73.5 W
# is MODELLED as the H100 SXM5's (same GH100 die). BF16 peak as the H100 SXM5 (same die and clock).
H200_SXM = HardwareProfile(
    name="H200-SXM",
    min_limit_w=200.0,
    max_limit_w=700.0,
    default_limit_w=700.0,
    idle_power_w=H100_SXM5.idle_power_w,
    max_sm_clock_mhz=1980,
    memory_bandwidth_tb_s=4.8,
    nvml_name="NVIDIA H200",
    memory_gb=141.0,
    peak_bf16_tflop_s=989.0,
)

_PROFILES: dict[str, HardwareProfile] = {p.name.lower(): p for p in (A100_SXM4, H100_SXM5, H200_SXM)}
# The CSV's full row names are accepted too.
_ALIASES: dict[str, str] = {"a100-sxm4-80gb": "a100-sxm4", "h100-sxm5-80gb": "h100-sxm5", "h200-sxm-141gb": "h200-sxm"}


def known_hardware() -> list[str]:
    """Names accepted by :func:`hardware_profile`."""
    return sorted(p.name for p in _PROFILES.values())


def hardware_profile(name: str) -> HardwareProfile:
    """The profile named ``name`` (case-insensitive); ValueError listing the known names otherwise."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return _PROFILES[key]
    except KeyError:
        raise ValueError(f"unknown GPU hardware profile {name!r}; known: {', '.join(known_hardware())}") from None
