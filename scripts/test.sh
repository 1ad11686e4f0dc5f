#!/usr/bin/env bash
# Set up .venv (if needed) and run the default test stage: generated-code check, lint, pytest.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m slow` for the second stage).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/python scripts/gen_proto.py --check
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
