#!/usr/bin/env bash
# RLVR on one machine the way slurm/math_rlvr.sh runs it on a cluster: a Ray head of its
# own, the training ranks under torchrun joining it by address, the head stopped at the end.
#
#   bash examples/rlvr_local.sh [CONFIG] [key=value ...]
#   NPROC=2 ROLLOUT_WORKERS=2 bash examples/rlvr_local.sh examples/configs/tiny/rlvr_digits.yaml train.steps=4
#
# Settings (environment): NPROC training ranks (default 1), ROLLOUT_WORKERS (2),
# RAY_PORT (6390), CPUS_PER_WORKER (1), LOG_DIR for the head's log (runs/ray). Make the
# tiny inputs first:
#   python examples/tiny/make_tiny.py --out runs/tiny
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
CONFIG=${1:-examples/configs/tiny/rlvr_digits.yaml}
[[ $# -gt 0 ]] && shift
[[ -f "$CONFIG" ]] || { echo "error: config $CONFIG not found" >&2; exit 1; }
NPROC=${NPROC:-1}
ROLLOUT_WORKERS=${ROLLOUT_WORKERS:-2}
RAY_PORT=${RAY_PORT:-6390}
CPUS_PER_WORKER=${CPUS_PER_WORKER:-1}
PYTHON=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-runs/ray}
mkdir -p "$LOG_DIR"

# Ray >= 2.52 authenticates with a token (~/.ray/auth_token, made by the head when missing);
# the head and every client must agree on the mode, so it is set here for all of them.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

# `ray stop` would stop every Ray on the machine; a blocking head is ours alone to stop.
"$PYTHON" -m ray.scripts.scripts start --head --block --port "$RAY_PORT" \
  --num-cpus $((ROLLOUT_WORKERS * CPUS_PER_WORKER)) --include-dashboard=false \
  --disable-usage-stats >"$LOG_DIR/ray_head.log" 2>&1 &
HEAD_PID=$!
trap 'kill "$HEAD_PID" 2>/dev/null || true; wait "$HEAD_PID" 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do  # wait for the head to accept clients
  "$PYTHON" -c "import ray; ray.init(address='127.0.0.1:$RAY_PORT', log_to_driver=False); ray.shutdown()" \
    >/dev/null 2>&1 && break
  kill -0 "$HEAD_PID" 2>/dev/null || { echo "error: the Ray head did not start; see $LOG_DIR/ray_head.log" >&2; exit 1; }
  sleep 1
done

"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_bar.rl "$CONFIG" \
  "rl.num_workers=$ROLLOUT_WORKERS" "rl.cpus_per_worker=$CPUS_PER_WORKER" "rl.ray_address=127.0.0.1:$RAY_PORT" "$@"
