#!/usr/bin/env bash
# Set up a fresh machine (scripts/setup_env.sh) and run the tiny demo on CPU.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck disable=SC1091
. scripts/setup_env.sh
exec python examples/foundation_demo.py "$@"
