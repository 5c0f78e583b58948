#!/usr/bin/env bash
#SBATCH --job-name=bar-midtrain
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
# Stage 1 mid-training of one domain expert (experts + router train; see train.stage).
# One rank per GPU (srun, one task each); TP / PP / EP from the config or the settings.
#
#   CONFIG=examples/configs/olmo2_7b/math_midtrain.yaml sbatch slurm/midtrain.sh
#   CONFIG=examples/configs/tiny/midtrain_math.yaml GPUS_PER_NODE=0 \
#     sbatch --nodes=1 --ntasks-per-node=1 --gpus-per-node=0 slurm/midtrain.sh   # CPU Slurm
#   CONFIG=examples/configs/tiny/midtrain_math.yaml bash slurm/midtrain.sh   # outside Slurm
#   DRY_RUN=1 CONFIG=... bash slurm/midtrain.sh                         # print, run nothing
#
# Settings (environment, with defaults):
#   CONFIG         (required) the stage's YAML config (train.stage: midtrain)
#   INIT_FROM      start from this checkpoint, or the latest checkpoint of this run dir
#                  (the stage before); default: the config's model.load
#   OUTPUT_DIR     the run dir (train.output_dir); default: the config's
#   TP, PP, EP     parallel sizes; default: the config's
#   GPUS_PER_NODE  ranks per node = max(1, GPUS_PER_NODE); default: the GPUs Slurm gave
#   MASTER_PORT    rendezvous port; default 20000 + job id % 20000
#   EXTRA_ARGS     more key=value overrides for the config
#   BAR_ROOT       the repository (this script's parent folder, else the submit dir)
#   PYTHON         python;  DRY_RUN=1 prints the command and runs nothing
# Logs: slurm-<job>.out where you submitted; in the run dir jobs.log (every attempt) and
# logs/slurm-<job>.out (a link). Requeue: 300 s before the time limit (or on scancel
# --signal=USR1, or SIGTERM) the ranks finish the step, checkpoint and exit 75; the job
# requeues itself and resumes from the latest checkpoint.
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

PYTHON=${PYTHON:-python}
bar_train_stage megatron_bar.train midtrain
