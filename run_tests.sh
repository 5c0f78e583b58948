#!/usr/bin/env bash
# Set up a fresh machine and run the tests: a virtual environment in .venv, the CPU build
# of torch 2.13.0 first (so nothing later pulls a CUDA torch), then megatron-bar and its
# dependencies, then pytest. Extra arguments go to pytest (e.g. -k conversion).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[test]"
exec python -m pytest tests -q "$@"
