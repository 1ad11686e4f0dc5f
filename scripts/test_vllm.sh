#!/usr/bin/env bash
# Second stage: the pals schedulers on the real vLLM 0.33.0 classes, on CPU, in their own cached venv.
#
# .venvs/vllm holds torch 2.13.0 (CPU build), vllm 0.33.0 installed with --no-deps (a plain install fails on a
# certifi pin, and unpinned resolves to 0.32.0), the pure-Python packages that importing vLLM's scheduler,
# config and request modules needs, and pals-daemon itself (editable). A marker file records what was
# installed: a second run reuses the venv and only runs the tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venvs/vllm
STAMP="$VENV/.pals-vllm-0.33.0-torch-2.13.0-v2"  # bump when the list below changes
# What `import vllm.v1.core.sched.scheduler` (and the config, request and structured-output modules the tests
# build) needs besides torch, found by importing until nothing was missing; pinned to vLLM 0.33.0's own ranges
# where it states one.
VLLM_DEPS=(
    packaging regex cachetools psutil numpy "requests>=2.33.0" tqdm blake3 "pydantic>=2.12.0" msgspec
    "pyzmq>=25.0.0" cloudpickle pyyaml "typing_extensions>=4.10" "filelock>=3.20.3" protobuf
    "prometheus_client>=0.18.0" "transformers>=5.16.1,<5.21.0" "huggingface_hub>=1.31.0" "tokenizers>=0.23.2"
    "safetensors>=0.6.2" einops cbor2 "aiohttp>=3.14.4" openai-harmony "openai>=2.25.0" "pillow>=13.0.0"
    pybase64 uvloop py-cpuinfo "xgrammar==0.2.8" "apache-tvm-ffi==0.1.11" "fastapi>=0.133.0,<0.137.0"
    partial_json_parser "llguidance>=1.7.0,<1.8.0"
)
# vllm is installed without its dependencies on purpose: pip's conflict report would list them all.
PIP=("$VENV/bin/python" -m pip install -q --no-warn-conflicts)

if [[ ! -f "$STAMP" ]]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "${PIP[@]}" torch==2.13.0
    "${PIP[@]}" --no-deps vllm==0.33.0
    "${PIP[@]}" "${VLLM_DEPS[@]}"
    touch "$STAMP"
fi
# pals-daemon and its test tools: cheap, and always current with the work tree.
"${PIP[@]}" -e '.[dev]'

export VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_LOGGING_LEVEL=WARNING
"$VENV/bin/python" -c 'import torch, vllm; assert vllm.__version__ == "0.33.0", vllm.__version__; print("vllm", vllm.__version__, "torch", torch.__version__)'
"$VENV/bin/python" -m pytest -q -m vllm -p no:cacheprovider tests/vllm "$@"
