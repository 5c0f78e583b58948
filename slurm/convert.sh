#!/usr/bin/env bash
#SBATCH --job-name=bar-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=02:00:00
#SBATCH --output=slurm-%j.out
# Convert an HF Olmo 2 / FlexOlmo folder to a megatron_bar checkpoint (or back) as a job.
#
#   HF_DIR=/models/OLMo-2-1124-7B-Instruct SAVE=/ckpt/olmo2-7b sbatch slurm/convert.sh
#   LOAD=/ckpt/bar-merged SAVE=/hf/bar-merged DIRECTION=to_hf sbatch slurm/convert.sh
#
# Settings (environment): DIRECTION (to_mcore | to_hf, default to_mcore), HF_DIR (to_mcore),
# LOAD (to_hf), SAVE (required), BAR_ROOT (repo root, default: this script's parent folder),
# PYTHON (default: python).
set -euo pipefail

usage() { sed -n '/^# Convert/,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi

die() { echo "error: $*" >&2; exit 1; }
DIRECTION=${DIRECTION:-to_mcore}
: "${SAVE:?error: SAVE (output folder) is required; see --help}"
BAR_ROOT=${BAR_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
PYTHON=${PYTHON:-python}

case "$DIRECTION" in
  to_mcore)
    : "${HF_DIR:?error: HF_DIR (HF model folder) is required for DIRECTION=to_mcore}"
    cmd=("$PYTHON" "$BAR_ROOT/tools/convert_hf_to_mcore.py" --hf-dir "$HF_DIR" --save "$SAVE") ;;
  to_hf)
    : "${LOAD:?error: LOAD (megatron_bar checkpoint) is required for DIRECTION=to_hf}"
    cmd=("$PYTHON" "$BAR_ROOT/tools/convert_mcore_to_hf.py" --load "$LOAD" --save "$SAVE") ;;
  *) die "DIRECTION must be to_mcore or to_hf, got '$DIRECTION'" ;;
esac

echo "[$(date +%T)] ${cmd[*]}"
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  srun --ntasks=1 "${cmd[@]}"
else
  "${cmd[@]}"
fi
