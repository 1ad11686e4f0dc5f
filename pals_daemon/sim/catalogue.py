"""The model catalogue: facts about the served models (parameters, KV bytes, experts) and their canonical names.

Every number is cited (model cards and config.json of each Hugging Face repository) unless labelled modelled.
The A100 models are named as in the sweep CSV's ``model`` column; H100 models by their Hugging Face id, with
the architecture here and the parameter counts from the ML.ENERGY CSV (:mod:`pals_daemon.sim.h100`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pals_daemon.sim.hardware import HardwareProfile

# Modelled: vLLM's default gpu_memory_utilization (0.9) of each GPU, minus a per-GPU reserve for
# activations and CUDA graphs (4 GiB), is available for weights plus KV cache.
_GPU_MEMORY_UTILIZATION = 0.9
_ACTIVATION_RESERVE_BYTES = 4 * 2**30
_BYTES_PER_PARAM_BF16 = 2


@dataclass(frozen=True)
class ModelSpec:
    """Facts about one model used for prefill FLOPs, the KV-cache size and expert activation."""

    name: str  # as in the sweep CSV's ``model`` column (A100) or the Hugging Face id (H100)
    hf_id: str
    active_params: float  # parameters used per token
    total_params: float  # all parameters (weights held in memory)
    # K and V bytes per token over all layers in bf16: 2 x layers x kv_heads x head_dim x 2 bytes.
    kv_bytes_per_token: int
    num_experts: int = 0  # routed experts per MoE layer (config.json)
    top_k: int = 0  # routed experts per token (config.json)
    bytes_per_param: float = _BYTES_PER_PARAM_BF16  # weight storage (bf16 2, fp8 1, mxfp4 about 0.55)


# Parameter counts from each model card (Hugging Face); layer, head and expert counts from each config.json.
_SPECS: tuple[ModelSpec, ...] = (
    # mistralai/Mixtral-8x7B-Instruct-v0.1: 46.7B total, 12.9B active; 32 layers, 8 KV heads x 128; 8 experts, top-2.
    ModelSpec(
        "mixtral-8x7b-instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1", 12.9e9, 46.7e9, 2 * 32 * 8 * 128 * 2, 8, 2
    ),
    # deepseek-ai/deepseek-moe-16b-base: 16.4B total, 2.8B active; 28 layers, 16 KV heads x 128 (MHA);
    # 64 routed experts, top-6 (plus 2 shared).
    ModelSpec(
        "deepseek-moe-16b-base", "deepseek-ai/deepseek-moe-16b-base", 2.8e9, 16.4e9, 2 * 28 * 16 * 128 * 2, 64, 6
    ),
    # microsoft/Phi-3.5-MoE-instruct: 41.9B total, 6.6B active; 32 layers, 8 KV heads x 128; 16 experts, top-2.
    ModelSpec("phi-3.5-moe-instruct", "microsoft/Phi-3.5-MoE-instruct", 6.6e9, 41.9e9, 2 * 32 * 8 * 128 * 2, 16, 2),
    # allenai/OLMoE-1B-7B-0924: 6.9B total, 1.3B active; 16 layers, 16 KV heads x 128; 64 experts, top-8.
    ModelSpec("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", 1.3e9, 6.9e9, 2 * 16 * 16 * 128 * 2, 64, 8),
    # Qwen/Qwen1.5-MoE-A2.7B: 14.3B total, 2.7B active; 24 layers, 16 KV heads x 128; 60 routed experts,
    # top-4 (plus 4 shared).
    ModelSpec("qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B", 2.7e9, 14.3e9, 2 * 24 * 16 * 128 * 2, 60, 4),
)
_SPEC_BY_NAME = {s.name: s for s in _SPECS}
# Case-insensitive aliases (Hugging Face ids, with or without the org, and a few short names).
_ALIASES: dict[str, str] = {}
for _s in _SPECS:
    _ALIASES[_s.name] = _s.name
    _ALIASES[_s.hf_id.lower()] = _s.name
    _ALIASES[_s.hf_id.split("/", 1)[1].lower()] = _s.name
del _s
_ALIASES.update(
    {
        "mixtral-8x7b": "mixtral-8x7b-instruct",
        "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b-instruct",
        "deepseek-moe-16b": "deepseek-moe-16b-base",
        "deepseek-ai/deepseek-moe-16b-chat": "deepseek-moe-16b-base",
        "phi-3.5-moe": "phi-3.5-moe-instruct",
        "allenai/olmoe-1b-7b-0924-instruct": "olmoe-1b-7b",
        "qwen/qwen1.5-moe-a2.7b-chat": "qwen1.5-moe-a2.7b",
    }
)

# H100 MoE architectures (config.json of each Hugging Face repo): name prefix -> (layers, KV heads, head dim,
# routed experts, top-k). Parameter counts come from the ML.ENERGY CSV's total_params_b / active_params_b.
_H100_ARCH: dict[str, tuple[int, int, int, int, int]] = {
    "Qwen/Qwen3-235B-A22B": (94, 4, 128, 128, 8),
    "Qwen/Qwen3-30B-A3B": (48, 4, 128, 128, 8),
    "Qwen/Qwen3-Coder-30B-A3B": (48, 4, 128, 128, 8),
    "meta-llama/Llama-4-Maverick-17B-128E": (48, 8, 128, 128, 1),
    "meta-llama/Llama-4-Scout-17B-16E": (48, 8, 128, 16, 1),
    "openai/gpt-oss-120b": (36, 8, 64, 128, 4),
    "openai/gpt-oss-20b": (24, 8, 64, 32, 4),
}
# Weight bytes per parameter by the CSV's precision column; mxfp4 (gpt-oss): 4.25-bit expert weights plus bf16
# attention, about 0.55 B/param on average (modelled from the checkpoint sizes on the model cards).
BYTES_PER_PARAM = {"bfloat16": 2.0, "fp8": 1.0, "mxfp4": 0.55}


def known_models() -> list[str]:
    """Model names (as in the sweep CSV) that :func:`pals_daemon.sim.a100.load_a100_truth` accepts."""
    return [s.name for s in _SPECS]


def canonical_model_name(name: str) -> str:
    """The sweep-CSV name for ``name`` or one of its aliases (case-insensitive); ValueError otherwise."""
    key = name.strip().lower()
    try:
        return _ALIASES[key]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(known_models())}") from None


def model_spec(name: str) -> ModelSpec:
    """The catalogue entry of an A100-sweep model (any alias, see :func:`canonical_model_name`)."""
    return _SPEC_BY_NAME[canonical_model_name(name)]


def h100_arch(model_id: str) -> tuple[int, int, int, int, int] | None:
    """(layers, KV heads, head dim, experts, top-k) of an H100 MoE model id, or None if unknown."""
    for prefix, arch in _H100_ARCH.items():
        if model_id.startswith(prefix):
            return arch
    return None


def modelled_kv_capacity_tokens(spec: ModelSpec, num_gpus: int, hardware: HardwareProfile) -> int:
    """Modelled KV-cache capacity (tokens): usable GPU memory minus the weights, over KV bytes per token."""
    usable = num_gpus * (hardware.memory_gb * 2**30 * _GPU_MEMORY_UTILIZATION - _ACTIVATION_RESERVE_BYTES)
    free = usable - spec.total_params * spec.bytes_per_param
    return max(1, int(free // spec.kv_bytes_per_token))
