#!/usr/bin/env bash
# Set up a fresh machine (scripts/setup_env.sh) and run the test suite.
# Extra arguments go to pytest, e.g. `bash run_tests.sh -k conversion`.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck disable=SC1091
. scripts/setup_env.sh
exec python -m pytest tests -q "$@"
