#!/usr/bin/env bash
#SBATCH --job-name=bar-math-rlvr
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --output=logs/%x-%j.out
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
#   TP, PP, EP       1, 1, 1          tensor / pipeline / expert parallel sizes
#   ROLLOUT_WORKERS  2                Ray rollout workers (rl.num_workers)
#   GPUS_PER_NODE    0                training ranks per node = max(1, GPUS_PER_NODE)
#   RAY_PORT         6379             Ray head port;  RDZV_PORT 29500 torchrun rendezvous
#   BAR_ROOT         the repository (this script's parent folder)
#   PYTHON           python
#   EXTRA_ARGS       more key=value overrides for the config
# A requeued job resumes from the latest checkpoint of the config's checkpoint dir.
set -euo pipefail

usage() { sed -n '/^# RLVR/,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
die() { echo "error: $*" >&2; exit 1; }

BAR_ROOT=${BAR_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
CONFIG=${CONFIG:-$BAR_ROOT/examples/configs/tiny/rlvr_digits.yaml}
TP=${TP:-1}; PP=${PP:-1}; EP=${EP:-1}
ROLLOUT_WORKERS=${ROLLOUT_WORKERS:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-0}
RAY_PORT=${RAY_PORT:-6379}
RDZV_PORT=${RDZV_PORT:-29500}
PYTHON=${PYTHON:-python}
EXTRA_ARGS=${EXTRA_ARGS:-}
DRY_RUN=${DRY_RUN:-0}

[[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG: file not found"
for v in TP PP EP ROLLOUT_WORKERS GPUS_PER_NODE; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
done
mkdir -p logs

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

run() {  # print, then run unless DRY_RUN=1
  echo "+ $*"
  if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}
on_node() {  # on_node NODE [--background] CMD...: one task on NODE (srun under Slurm)
  local node=$1; shift
  local bg=0
  if [[ "${1:-}" == --background ]]; then bg=1; shift; fi
  local cmd=("$@")
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then cmd=(srun --nodes=1 --ntasks=1 -w "$node" "$@"); fi
  if (( bg )); then
    echo "+ ${cmd[*]} &"
    if [[ "$DRY_RUN" != 1 ]]; then "${cmd[@]}" & fi
  else
    run "${cmd[@]}"
  fi
}

stop_ray() {
  for node in "${NODES[@]}"; do
    on_node "$node" ray stop --force || true
  done
}
trap stop_ray EXIT
# Slurm's warning before the time limit: the job ends here and --requeue restarts it,
# resuming from the last checkpoint.
trap 'echo "time limit near: requeueing"; [[ -n "${SLURM_JOB_ID:-}" ]] && scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1

cpus=$(nproc)
on_node "$HEAD" ray start --head --port "$RAY_PORT" --num-cpus "$cpus" --num-gpus "$GPUS_PER_NODE" --disable-usage-stats
for node in "${NODES[@]:1}"; do
  on_node "$node" --background ray start --address "$HEAD:$RAY_PORT" --num-cpus "$cpus" --num-gpus "$GPUS_PER_NODE" --block
done

launcher=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC"
          --rdzv-backend c10d --rdzv-endpoint "$HEAD:$RDZV_PORT")
args=(-m megatron_bar.rl "$CONFIG" "parallel.tp=$TP" "parallel.pp=$PP" "parallel.ep=$EP"
      "rl.num_workers=$ROLLOUT_WORKERS" "rl.ray_address=$HEAD:$RAY_PORT")
# shellcheck disable=SC2206  # EXTRA_ARGS is a list of key=value words
args+=($EXTRA_ARGS)
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  run srun --nodes="$NNODES" --ntasks-per-node=1 "${launcher[@]}" "${args[@]}"
else
  run "${launcher[@]}" "${args[@]}"
fi
