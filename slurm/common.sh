# shellcheck shell=bash
# What the slurm/*.sh stage scripts share (sourced, never run): help text, settings
# checks, the run-dir log, the rank launcher, signal forwarding and requeue-on-preemption.
#
# The preemption protocol, end to end:
#   1. Slurm warns before the time limit (#SBATCH --signal=B:USR1@300, to this shell) or
#      someone runs `scancel --signal=USR1 JOB` (to the job steps, i.e. the ranks);
#      preemption and the time limit send SIGTERM to both.
#   2. This shell forwards the signal to the running step (srun forwards it to every rank).
#   3. Each rank (megatron_bar/train/preempt.py) finishes its step, all ranks agree to stop,
#      write a checkpoint and exit with code 75 (BAR_REQUEUE_EXIT).
#   4. This shell sees 75 (or that it was signalled itself) and runs `scontrol requeue`;
#      Slurm starts the job again under the same id, appending to the same slurm-<id>.out,
#      and the trainer resumes from `latest`: the next step, nothing repeated.

BAR_REQUEUE_EXIT=75   # = megatron_bar.train.preempt.REQUEUE_EXIT_CODE
BAR_SIGNALLED=""       # the signal this shell received, if any
BAR_CHILD=""           # the running step's pid
# torchrun dies of SIGUSR1 unless told to catch it (it then passes it to its workers, and
# kills them 30 s later if they have not exited).
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1

die() { echo "error: $*" >&2; exit 1; }

# bar_usage SCRIPT: the comment block at the top of SCRIPT (after the #SBATCH lines).
bar_usage() {
  awk 'NR == 1 && /^#!/ { next } /^#SBATCH/ { next } /^# shellcheck/ { next }
       /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

# bar_wants_help ARGS...: true for -h / --help.
bar_wants_help() { [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; }

# bar_require NAME WHAT: NAME must be set and non-empty.
bar_require() {
  [[ -n "${!1:-}" ]] || die "$1 ($2) is required; see --help"
}

# bar_whole_numbers NAME...: each NAME is empty or a whole number.
bar_whole_numbers() {
  local v
  for v in "$@"; do
    [[ -z "${!v:-}" || "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
  done
}

bar_file() {  # bar_file NAME: the file named by $NAME exists
  [[ -f "${!1}" ]] || die "$1=${!1}: file not found"
}

# bar_run CMD...: print (+ CMD), then run unless DRY_RUN=1.
bar_run() {
  echo "+ $*"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then "$@"; fi
}

# bar_yaml_output_dir CONFIG: train.output_dir of a config (what the trainer will use).
bar_yaml_output_dir() {
  "$PYTHON" - "$1" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1])) or {}
print((cfg.get("train") or {}).get("output_dir") or "runs/default")
PY
}

# bar_checkpoint PATH: PATH itself when it is a checkpoint (has model_config.json), else
# the checkpoint named by PATH/checkpoints/latest or PATH/latest (a run dir, or a
# checkpoint root): how one stage finds the final checkpoint of the stage before it.
bar_checkpoint() {
  local p=$1 marker
  if [[ -f "$p/model_config.json" ]]; then echo "$p"; return; fi
  for marker in "$p/checkpoints/latest" "$p/latest"; do
    if [[ -f "$marker" ]]; then echo "$(dirname "$marker")/$(tr -d '[:space:]' < "$marker")"; return; fi
  done
  die "$p: not a checkpoint, and no checkpoints/latest in it (did the stage before finish?)"
}

# bar_log_setup RUN_DIR: the run dir gets jobs.log (one line per event of every attempt)
# and logs/slurm-<job>.out, a link to the job's Slurm output file.
bar_log_setup() {
  BAR_RUN_DIR=$1
  [[ "${DRY_RUN:-0}" == 1 ]] && return
  mkdir -p "$BAR_RUN_DIR/logs"
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    local out
    out=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p' || true)
    if [[ -n "$out" ]]; then ln -sfn "$out" "$BAR_RUN_DIR/logs/slurm-$SLURM_JOB_ID.out"; fi
  fi
  bar_log "start on $(hostname) (attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )))"
}

bar_log() {  # bar_log MESSAGE: to stdout and to RUN_DIR/jobs.log
  local line
  line="$(date '+%F %T') ${SLURM_JOB_NAME:-$(basename "$0")} job ${SLURM_JOB_ID:-local}: $*"
  echo "$line"
  if [[ -n "${BAR_RUN_DIR:-}" && "${DRY_RUN:-0}" != 1 ]]; then echo "$line" >> "$BAR_RUN_DIR/jobs.log"; fi
}

# bar_nodes: the allocation's hostnames into BAR_NODES (this host outside Slurm).
bar_nodes() {
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    command -v scontrol >/dev/null || die "SLURM_JOB_ID is set but scontrol is not on PATH"
    mapfile -t BAR_NODES < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-}")
    (( ${#BAR_NODES[@]} > 0 )) || die "no nodes in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
  else
    BAR_NODES=("$(hostname)")
  fi
}

# bar_rank_launcher NPROC: the command prefix that starts NPROC ranks per node, into
# BAR_LAUNCH. Under Slurm: srun, one task per rank (no torchrun: srun hands the signal to
# every rank itself); each task exports the torch.distributed variables from Slurm's.
# Outside Slurm: python, or torchrun --standalone for several ranks.
bar_rank_launcher() {
  local nproc=$1
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    bar_nodes
    local port=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID//[^0-9]/} % 20000 ))}
    # shellcheck disable=SC2016  # expanded by each task's shell, not this one
    local rank_env='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"'
    BAR_LAUNCH=(srun --nodes="${#BAR_NODES[@]}" --ntasks-per-node="$nproc"
      --export="ALL,MASTER_ADDR=${BAR_NODES[0]},MASTER_PORT=$port"
      bash -c "$rank_env" bar-rank "$PYTHON")
  elif (( nproc > 1 )); then
    BAR_LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc")
  else
    BAR_LAUNCH=("$PYTHON")
  fi
}

_bar_on_signal() {
  local sig=$1
  [[ -z "$BAR_SIGNALLED" ]] && bar_log "received SIG$sig: asking the ranks to checkpoint and stop"
  BAR_SIGNALLED=$sig
  if [[ -n "$BAR_CHILD" ]]; then kill -s "$sig" "$BAR_CHILD" 2>/dev/null || true; fi
}

# bar_run_step CMD...: run the job's main step with USR1 / TERM forwarded to it, then
# exit: 0 when it finished; requeued (under Slurm) when it stopped for a preemption;
# its own exit code when it failed.
bar_run_step() {
  local shown
  printf -v shown '%q ' "$@"
  echo "+ ${shown% }"
  [[ "${DRY_RUN:-0}" == 1 ]] && return 0
  trap '_bar_on_signal USR1' USR1
  trap '_bar_on_signal TERM' TERM
  "$@" &
  BAR_CHILD=$!
  local rc=0
  wait "$BAR_CHILD" || rc=$?
  # A trapped signal interrupts `wait` while the step runs on: wait again.
  while kill -0 "$BAR_CHILD" 2>/dev/null; do rc=0; wait "$BAR_CHILD" || rc=$?; done
  BAR_CHILD=""
  if (( rc == 0 )); then
    bar_log "finished"
    exit 0
  fi
  if (( rc == BAR_REQUEUE_EXIT )) || [[ -n "$BAR_SIGNALLED" ]]; then
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
      bar_log "stopped for preemption (exit $rc): requeueing; the next attempt resumes from the latest checkpoint"
      scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed (is the job --requeue?)"
      exit 0
    fi
    bar_log "stopped for preemption (exit $rc): run the same command again to resume"
    exit "$BAR_REQUEUE_EXIT"
  fi
  bar_log "failed with exit code $rc"
  exit "$rc"
}

# bar_train_stage MODULE STAGE: everything midtrain.sh / sft.sh / router.sh do (and what
# math_rlvr.sh does for its training ranks): settings, overrides, log, launch.
bar_train_stage() {
  local module=$1 stage=$2
  bar_require CONFIG "the stage's YAML config, e.g. examples/configs/olmo2_7b/math_$stage.yaml"
  bar_file CONFIG
  bar_whole_numbers TP PP EP GPUS_PER_NODE MASTER_PORT
  local args=(-m "$module" "$CONFIG")
  [[ -n "${TP:-}" ]] && args+=("parallel.tp=$TP")
  [[ -n "${PP:-}" ]] && args+=("parallel.pp=$PP")
  [[ -n "${EP:-}" ]] && args+=("parallel.ep=$EP")
  if [[ -n "${INIT_FROM:-}" ]]; then
    if [[ "${DRY_RUN:-0}" == 1 && ! -e "$INIT_FROM" ]]; then
      args+=("model.load=<latest checkpoint of $INIT_FROM>")
    else
      local load
      load=$(bar_checkpoint "$INIT_FROM") || exit 1
      args+=("model.load=$load")
    fi
  fi
  local run_dir=""
  if [[ -n "${OUTPUT_DIR:-}" ]]; then
    args+=("train.output_dir=$OUTPUT_DIR")
    run_dir=$OUTPUT_DIR
  elif [[ "${DRY_RUN:-0}" != 1 ]]; then
    run_dir=$(bar_yaml_output_dir "$CONFIG") || die "CONFIG=$CONFIG: cannot read train.output_dir"
  fi
  local extra=()
  # shellcheck disable=SC2206  # EXTRA_ARGS is a list of key=value words
  extra=(${EXTRA_ARGS:-})
  local a
  for a in "${extra[@]}"; do [[ "$a" == train.output_dir=* ]] && run_dir=${a#train.output_dir=}; done
  args+=("${extra[@]}")
  local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
  local nproc=$(( gpus > 0 ? gpus : 1 ))
  bar_rank_launcher "$nproc"
  bar_log_setup "$run_dir"
  [[ "${DRY_RUN:-0}" == 1 ]] || bar_log "$stage: $CONFIG -> $run_dir"
  bar_run_step "${BAR_LAUNCH[@]}" "${args[@]}"
}
