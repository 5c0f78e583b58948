#!/usr/bin/env bash
# Submit BAR as a chain of Slurm jobs: each domain's stages (midtrain -> sft -> rlvr, those
# it has configs for), then the merge once every expert has finished, then the router.
# Each job starts when the one before it succeeded (--dependency=afterok); a failed job
# cancels what waits on it (--kill-on-invalid-dep=yes). Run it on the login node; it
# returns at once, printing the job ids.
#
#   bash slurm/pipeline.sh                                   # all domains of CONFIG_DIR
#   DOMAINS=math bash slurm/pipeline.sh                      # one domain (+ merge, router)
#   DOMAINS=code MERGE=0 bash slurm/pipeline.sh              # one domain's stages only
#   DOMAINS=code BASE=runs/bar/merged bash slurm/pipeline.sh # retrain code, swap it in
#   DRY_RUN=1 bash slurm/pipeline.sh                         # print the sbatch commands
#
# Stage configs: CONFIG_DIR/<stage>_<domain>.yaml or CONFIG_DIR/<domain>_<stage>.yaml
# (stage: midtrain, sft, rlvr), and CONFIG_DIR/router.yaml. A domain's first stage starts
# from its config's model.load (the upcycled 2-expert model); each later stage from the
# latest checkpoint of the stage before (INIT_FROM, resolved when the job starts).
#
# Settings (environment, with defaults):
#   CONFIG_DIR     examples/configs/tiny           where the stage configs are
#   DOMAINS        every domain with a stage config in CONFIG_DIR
#   STAGES         "midtrain sft rlvr"             the per-domain stages to run
#   RUN_ROOT       runs/bar      run dirs: RUN_ROOT/<domain>/<stage>, RUN_ROOT/merged,
#                                RUN_ROOT/router (each with jobs.log and logs/)
#   MERGE          1             submit the merge and the router after the experts
#   BASE           (none)        upgrade this merged checkpoint: the domains' experts
#                                replace theirs (REPLACE) instead of a full merge
#   ROUTER_CONFIG  CONFIG_DIR/router.yaml; ROUTER=0 skips the router stage
#   AFTER          (none)        a job id every first stage waits for (e.g. an upcycle job)
#   SBATCH_ARGS    options for every sbatch (e.g. "--partition=gpu --account=bar")
#   SBATCH_ARGS_<STAGE>, EXTRA_ARGS_<STAGE>  per stage (MIDTRAIN SFT RLVR MERGE ROUTER):
#                  sbatch options, and config overrides (key=value ...)
#   BAR_ROOT       the repository (this script's parent folder)
#   DRY_RUN=1      print the sbatch commands (with made-up job ids), submit nothing
set -euo pipefail

BAR_ROOT=${BAR_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[[ -f "$BAR_ROOT/slurm/common.sh" ]] || { echo "error: $BAR_ROOT/slurm/common.sh not found: set BAR_ROOT" >&2; exit 1; }
# shellcheck source=common.sh
source "$BAR_ROOT/slurm/common.sh"
if bar_wants_help "$@"; then bar_usage "$0"; exit 0; fi

CONFIG_DIR=${CONFIG_DIR:-$BAR_ROOT/examples/configs/tiny}
STAGES=${STAGES:-midtrain sft rlvr}
RUN_ROOT=${RUN_ROOT:-runs/bar}
MERGE=${MERGE:-1}
ROUTER=${ROUTER:-1}
ROUTER_CONFIG=${ROUTER_CONFIG:-$CONFIG_DIR/router.yaml}
DRY_RUN=${DRY_RUN:-0}
[[ -d "$CONFIG_DIR" ]] || die "CONFIG_DIR=$CONFIG_DIR: not a folder"
for s in $STAGES; do
  [[ "$s" =~ ^(midtrain|sft|rlvr)$ ]] || die "STAGES: '$s' is not midtrain, sft or rlvr"
done
[[ "$DRY_RUN" == 1 ]] || command -v sbatch >/dev/null || die "sbatch is not on PATH (run on a Slurm login node, or DRY_RUN=1)"
RUN_ROOT=$(realpath -m "$RUN_ROOT")  # jobs may start in another directory

declare -A SCRIPT=([midtrain]=midtrain.sh [sft]=sft.sh [rlvr]=math_rlvr.sh)

stage_config() {  # stage_config STAGE DOMAIN: the config file, or nothing
  local f
  for f in "$CONFIG_DIR/${1}_${2}.yaml" "$CONFIG_DIR/${2}_${1}.yaml"; do
    if [[ -f "$f" ]]; then echo "$f"; return; fi
  done
}

if [[ -z "${DOMAINS:-}" ]]; then
  DOMAINS=$(find "$CONFIG_DIR" -maxdepth 1 -name '*.yaml' -printf '%f\n' \
    | sed -nE 's/^(midtrain|sft|rlvr)_(.+)\.yaml$/\2/p; s/^(.+)_(midtrain|sft|rlvr)\.yaml$/\1/p' | sort -u | xargs)
  [[ -n "$DOMAINS" ]] || die "no <stage>_<domain>.yaml configs in CONFIG_DIR=$CONFIG_DIR"
fi

DRY_ID=0
JOB=""
# submit NAME DEPENDENCIES SCRIPT STAGE VAR=VALUE...: submit SCRIPT with those variables
# set; its job id into JOB. DEPENDENCIES: job ids joined by ':' (or empty).
submit() {
  local name=$1 deps=$2 script=$3 upper=${4^^}; shift 4
  local cmd=(sbatch --parsable --job-name="$name" --kill-on-invalid-dep=yes)
  [[ -n "$deps" ]] && cmd+=(--dependency="afterok:$deps")
  local per_stage="SBATCH_ARGS_$upper"
  # shellcheck disable=SC2206  # option lists, split on spaces
  cmd+=(${SBATCH_ARGS:-} ${!per_stage:-} "$BAR_ROOT/slurm/$script")
  if [[ "$DRY_RUN" == 1 ]]; then
    DRY_ID=$(( DRY_ID + 1 ))
    JOB="DRY$DRY_ID"
    local shown
    printf -v shown '%q ' "$@" "${cmd[@]}"
    echo "+ ${shown% }"
    return
  fi
  local out
  out=$(env "$@" "${cmd[@]}") || die "sbatch failed for $name"
  JOB=${out%%;*}
}

mkdir_run_root() { [[ "$DRY_RUN" == 1 ]] || mkdir -p "$RUN_ROOT"; }
mkdir_run_root
summary=()
expert_jobs=()
experts=()
# Every job gets the same variables (empty when unused), so nothing set in this shell
# leaks into a stage it was not meant for.
common_env=("BAR_ROOT=$BAR_ROOT" "DRY_RUN=0")
for domain in $DOMAINS; do
  prev_job=${AFTER:-}
  prev_dir=""
  for stage in $STAGES; do
    config=$(stage_config "$stage" "$domain")
    [[ -n "$config" ]] || continue
    out_dir="$RUN_ROOT/$domain/$stage"
    extra_var="EXTRA_ARGS_${stage^^}"
    submit "bar-$domain-$stage" "$prev_job" "${SCRIPT[$stage]}" "$stage" "${common_env[@]}" \
      "CONFIG=$config" "INIT_FROM=$prev_dir" "OUTPUT_DIR=$out_dir" "EXTRA_ARGS=${!extra_var:-}"
    summary+=("$JOB bar-$domain-$stage${prev_job:+ after $prev_job}")
    prev_job=$JOB
    prev_dir=$out_dir
  done
  [[ -n "$prev_dir" ]] || die "domain '$domain': no config for any of STAGES ($STAGES) in $CONFIG_DIR"
  expert_jobs+=("$prev_job")
  experts+=("$domain=$prev_dir")
done

if [[ "$MERGE" == 1 ]]; then
  deps=$(IFS=:; echo "${expert_jobs[*]}")
  merged="$RUN_ROOT/merged"
  if [[ -n "${BASE:-}" ]]; then
    merge_env=("EXPERTS=" "BASE=$BASE" "REPLACE=${experts[*]}" "ADD=")
  else
    merge_env=("EXPERTS=${experts[*]}" "BASE=" "REPLACE=" "ADD=")
  fi
  submit bar-merge "$deps" merge.sh merge "${common_env[@]}" "SAVE=$merged" "${merge_env[@]}"
  merge_job=$JOB
  summary+=("$merge_job bar-merge after $deps")
  if [[ "$ROUTER" == 1 ]]; then
    [[ -f "$ROUTER_CONFIG" ]] || die "ROUTER_CONFIG=$ROUTER_CONFIG: file not found (ROUTER=0 to skip)"
    submit bar-router "$merge_job" router.sh router "${common_env[@]}" "CONFIG=$ROUTER_CONFIG" \
      "INIT_FROM=$merged" "OUTPUT_DIR=$RUN_ROOT/router" "EXTRA_ARGS=${EXTRA_ARGS_ROUTER:-}"
    summary+=("$JOB bar-router after $merge_job")
  fi
fi

printf '%s\n' "${summary[@]}"
if [[ "$DRY_RUN" != 1 ]]; then
  printf '%s\n' "${summary[@]}" >> "$RUN_ROOT/pipeline_jobs.txt"
  echo "job ids also in $RUN_ROOT/pipeline_jobs.txt; follow with: squeue --me" >&2
fi
