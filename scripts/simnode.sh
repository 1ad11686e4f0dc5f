#!/usr/bin/env bash
# Set up .venv (if needed) and run the main job: a simulated 4x A100 node serving Mixtral-8x7B on the
# Azure code trace under pals-daemon, with a budget cut halfway. Extra arguments go to pals-simnode.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[plot]'
exec .venv/bin/pals-simnode "$@"
