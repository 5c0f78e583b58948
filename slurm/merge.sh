#!/usr/bin/env bash
#SBATCH --job-name=bar-merge
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
# Stage 2: merge the domain experts into one MoE (tools/merge_experts.py) as a job.
# Each expert is a 2-expert checkpoint, or a run dir whose latest checkpoint is taken.
#
#   EXPERTS="math=runs/math/sft code=runs/code/sft" SAVE=ckpt/bar-merged sbatch slurm/merge.sh
#   BASE=ckpt/bar-merged REPLACE="code=runs/code_v2/sft" SAVE=ckpt/bar-v2 sbatch slurm/merge.sh
#   DRY_RUN=1 EXPERTS=... SAVE=... bash slurm/merge.sh   # print the command, run nothing
#
# Settings (environment, with defaults):
#   SAVE          (required) the merged checkpoint to write
#   EXPERTS       NAME=DIR ... the experts, in expert order (a full merge)
#   BASE          a merged checkpoint to upgrade instead, with REPLACE and/or ADD (NAME=DIR ...)
#   WEIGHTS       NAME=W,... weights of the shared-parameter mean (default: equal)
#   TOPK          experts per token of the result (default: the inputs')
#   BAR_ROOT      the repository (this script's parent folder, else the submit dir)
#   PYTHON        python;  DRY_RUN=1 prints the command and runs nothing
# Logs: slurm-<job>.out, and jobs.log next to SAVE. The merge writes to a temporary folder
# renamed when complete: a requeued merge starts over; one that finds SAVE complete
# (a re-run) does nothing.
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
bar_require SAVE "the merged checkpoint to write"
bar_whole_numbers TOPK
[[ -n "${EXPERTS:-}" || -n "${BASE:-}" ]] || die "EXPERTS (NAME=DIR ...) or BASE (a merged checkpoint) is required; see --help"
[[ -z "${EXPERTS:-}" || -z "${BASE:-}" ]] || die "EXPERTS and BASE exclude each other (upgrade a BASE with REPLACE / ADD)"
[[ -z "${BASE:-}" || -n "${REPLACE:-}${ADD:-}" ]] || die "BASE needs REPLACE and/or ADD (NAME=DIR ...)"

# named_checkpoints LIST: NAME=DIR words with each DIR resolved to its checkpoint.
named_checkpoints() {
  local item name dir
  for item in $1; do
    [[ "$item" == *=* ]] || die "'$item' is not NAME=DIR"
    name=${item%%=*}; dir=${item#*=}
    if [[ "${DRY_RUN:-0}" == 1 && ! -e "$dir" ]]; then echo "$name=<latest checkpoint of $dir>"; continue; fi
    echo "$name=$(bar_checkpoint "$dir")"
  done
}

args=("$BAR_ROOT/tools/merge_experts.py" --save "$SAVE")
if [[ -n "${EXPERTS:-}" ]]; then
  mapfile -t experts < <(named_checkpoints "$EXPERTS")
  (( ${#experts[@]} == $(wc -w <<< "$EXPERTS") )) || exit 1
  args+=(--experts "${experts[@]}")
  [[ -n "${WEIGHTS:-}" ]] && args+=(--weights "$WEIGHTS")
else
  args+=(--base "$BASE")
  for opt in REPLACE ADD; do
    [[ -n "${!opt:-}" ]] || continue
    mapfile -t named < <(named_checkpoints "${!opt}")
    (( ${#named[@]} == $(wc -w <<< "${!opt}") )) || exit 1
    args+=("--${opt,,}" "${named[@]}")
  done
fi
[[ -n "${TOPK:-}" ]] && args+=(--topk "$TOPK")

bar_log_setup "$(dirname "$SAVE")"
if [[ -f "$SAVE/bar_manifest.json" && "${DRY_RUN:-0}" != 1 ]]; then
  bar_log "$SAVE is complete already (a re-run): nothing to do; remove it to merge again"
  exit 0
fi
launch=("$PYTHON")
[[ -n "${SLURM_JOB_ID:-}" ]] && launch=(srun --ntasks=1 "$PYTHON")
bar_run_step "${launch[@]}" "${args[@]}"
