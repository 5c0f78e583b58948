#!/usr/bin/env bash
#SBATCH --job-name=bar-math-rlvr
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
# RLVR (GRPO) of the math expert: a Ray head on the first node, Ray workers on the others
# (the rollout fleet), the training ranks under torchrun over the whole allocation.
#
#   CONFIG=examples/configs/olmo2_7b/math_rlvr.yaml TP=2 EP=2 ROLLOUT_WORKERS=8 \
#     sbatch --nodes=4 slurm/math_rlvr.sh
#   bash slurm/math_rlvr.sh                  # outside Slurm: the same on this machine
#   DRY_RUN=1 bash slurm/math_rlvr.sh        # print the commands, run nothing
#
# Settings (environment, with defaults):
#   CONFIG           examples/configs/tiny/rlvr_digits.yaml  the RLVR config
#   INIT_FROM        start from this checkpoint, or the latest checkpoint of this run dir
#                    (the stage before); default: the config's model.load
#   OUTPUT_DIR       the run dir (train.output_dir); default: the config's
#   TP, PP, EP       1, 1, 1          tensor / pipeline / expert parallel sizes
#   ROLLOUT_WORKERS  2                Ray rollout workers (rl.num_workers)
#   GPUS_PER_NODE    0                training ranks per node = max(1, GPUS_PER_NODE)
#   RAY_PORT         6379             Ray head port;  RDZV_PORT 29500 torchrun rendezvous
#   BAR_ROOT         the repository (this script's parent folder)
#   PYTHON           python;  RAY: the ray command (default: ray, else next to PYTHON)
#   EXTRA_ARGS       more key=value overrides for the config
# Logs: slurm-<job>.out where you submitted; jobs.log and logs/ in the run dir. 300 s before
# the time limit (or on scancel --signal=USR1, or SIGTERM) the signal goes to the training
# ranks; the job then requeues itself and resumes from the latest checkpoint.
set -euo pipefail

BAR_ROOT=${BAR_ROOT:-}
if [[ -z "$BAR_ROOT" ]]; then
  BAR_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  [[ -f "$BAR_ROOT/slurm/common.sh" ]] || BAR_ROOT=${SLURM_SUBMIT_DIR:-$PWD}
fi
[[ -f "$BAR_ROOT/slurm/common.sh" ]] || {
  echo "error: $BAR_ROOT/slurm/common.sh not found: submit from the repository root or set BAR_ROOT" >&2; exit 1; }
# shellcheck source=common.sh
source "$BAR_ROOT/slurm/common.sh"
if bar_wants_help "$@"; then bar_usage "$0"; exit 0; fi

CONFIG=${CONFIG:-$BAR_ROOT/examples/configs/tiny/rlvr_digits.yaml}
TP=${TP:-1}; PP=${PP:-1}; EP=${EP:-1}
ROLLOUT_WORKERS=${ROLLOUT_WORKERS:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-0}
RAY_PORT=${RAY_PORT:-6379}
RDZV_PORT=${RDZV_PORT:-29500}
PYTHON=${PYTHON:-python}
# The ray command: from PATH, else next to PYTHON (a virtual environment's bin/).
RAY=${RAY:-ray}
if ! command -v "$RAY" >/dev/null && py=$(command -v "$PYTHON") && [[ -x "$(dirname "$py")/ray" ]]; then
  RAY=$(dirname "$py")/ray
fi
EXTRA_ARGS=${EXTRA_ARGS:-}
DRY_RUN=${DRY_RUN:-0}

[[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG: file not found"
for v in TP PP EP ROLLOUT_WORKERS GPUS_PER_NODE; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
done

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  command -v scontrol >/dev/null || die "SLURM_JOB_ID is set but scontrol is not on PATH"
  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  (( ${#NODES[@]} > 0 )) || die "no nodes in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
else
  NODES=("$(hostname)")
fi
HEAD=${NODES[0]}
NNODES=${#NODES[@]}
NPROC=$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))

run() { bar_run "$@"; }
on_node() {  # on_node NODE [--background] CMD...: one task on NODE (srun under Slurm)
  local node=$1; shift
  local bg=0
  if [[ "${1:-}" == --background ]]; then bg=1; shift; fi
  local cmd=("$@")
  # --overlap: a blocking `ray start` step must not hold the node's CPUs against the
  # training step that runs beside it
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then cmd=(srun --overlap --nodes=1 --ntasks=1 -w "$node" "$@"); fi
  if (( bg )); then
    echo "+ ${cmd[*]} &"
    if [[ "$DRY_RUN" != 1 ]]; then "${cmd[@]}" & fi
  else
    run "${cmd[@]}"
  fi
}

# Ray >= 2.52 authenticates with a token (~/.ray/auth_token, made by the head when missing;
# a shared home gives it to every node); head, workers and trainer must agree on the mode.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

# Every Ray process of this job runs under a blocking `ray start` of ours, stopped at exit:
# `ray stop` would also stop other jobs' Ray on a shared node.
RAY_PIDS=()
stop_ray() {
  local pid
  for pid in "${RAY_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${RAY_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_ray EXIT

cpus=$(nproc)
on_node "$HEAD" --background "$RAY" start --head --port "$RAY_PORT" --num-cpus "$cpus" --num-gpus "$GPUS_PER_NODE" --disable-usage-stats --block
[[ "$DRY_RUN" == 1 ]] || RAY_PIDS+=("$!")
if [[ "$DRY_RUN" != 1 ]]; then  # the head accepts clients before anything joins it
  for i in $(seq 1 120); do
    "$PYTHON" -c "import ray; ray.init(address='$HEAD:$RAY_PORT', log_to_driver=False); ray.shutdown()" \
      >/dev/null 2>&1 && break
    kill -0 "${RAY_PIDS[0]}" 2>/dev/null || die "the Ray head on $HEAD did not start (see the log above)"
    (( i < 120 )) || die "the Ray head on $HEAD:$RAY_PORT did not accept clients within 120 s"
    sleep 1
  done
fi
for node in "${NODES[@]:1}"; do
  on_node "$node" --background "$RAY" start --address "$HEAD:$RAY_PORT" --num-cpus "$cpus" --num-gpus "$GPUS_PER_NODE" --block
  [[ "$DRY_RUN" == 1 ]] || RAY_PIDS+=("$!")
done

launcher=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC"
          --rdzv-backend c10d --rdzv-endpoint "$HEAD:$RDZV_PORT")
args=(-m megatron_bar.rl "$CONFIG" "parallel.tp=$TP" "parallel.pp=$PP" "parallel.ep=$EP"
      "rl.num_workers=$ROLLOUT_WORKERS" "rl.ray_address=$HEAD:$RAY_PORT")
run_dir=${OUTPUT_DIR:-}
if [[ -n "${INIT_FROM:-}" ]]; then
  if [[ "$DRY_RUN" == 1 && ! -e "$INIT_FROM" ]]; then
    args+=("model.load=<latest checkpoint of $INIT_FROM>")
  else
    args+=("model.load=$(bar_checkpoint "$INIT_FROM")")
  fi
fi
[[ -n "$run_dir" ]] && args+=("train.output_dir=$run_dir")
[[ -n "$run_dir" || "$DRY_RUN" == 1 ]] || run_dir=$(bar_yaml_output_dir "$CONFIG")
# shellcheck disable=SC2206  # EXTRA_ARGS is a list of key=value words
args+=($EXTRA_ARGS)
for a in "${args[@]}"; do [[ "$a" == train.output_dir=* ]] && run_dir=${a#train.output_dir=}; done
bar_log_setup "$run_dir"
# USR1 / TERM reach the ranks through srun and torchrun; exit 75 (or a signal) -> requeue.
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  bar_run_step srun --overlap --nodes="$NNODES" --ntasks-per-node=1 "${launcher[@]}" "${args[@]}"
else
  bar_run_step "${launcher[@]}" "${args[@]}"
fi
