#!/usr/bin/env bash
# Set up a fresh machine (scripts/setup_env.sh) and run the BAR demo on CPU: the whole
# pipeline on a tiny model, with baselines and ablations, ending in a results table.
#   bash run_demo.sh                 # full demo (under 45 min on 2 cores), into runs/bar_demo
#   bash run_demo.sh --quick         # a smaller version (a few minutes)
#   bash run_demo.sh --foundation    # only the conversion checks against transformers
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck disable=SC1091
. scripts/setup_env.sh
if [[ "${1:-}" == "--foundation" ]]; then
    shift
    exec python examples/foundation_demo.py "$@"
fi
# The foundation checks first (seconds): the conversions the pipeline relies on match transformers.
python examples/foundation_demo.py
exec python examples/bar_demo.py --overwrite "$@"
