#!/usr/bin/env bash
# The BAR pipeline on a real Slurm: a one-node slurmctld + slurmd started on this machine
# (Debian's slurm-wlm and munge), slurm/pipeline.sh submitted with the tiny configs, one
# job preempted with `scancel --signal=USR1` mid-run, then every output checked
# (tests/slurm/real_slurm/check_pipeline.py).
#
#   sudo bash tests/slurm/real_slurm/run_real_slurm_test.sh --install   # apt-get install first
#   bash tests/slurm/real_slurm/run_real_slurm_test.sh                  # Slurm already installed
#   MEGATRON_BAR_REAL_SLURM=1 python -m pytest tests/slurm/test_real_slurm.py   # the same, in pytest
#
# The chain submitted (configs: examples/configs/tiny, plus sft_math.yaml made here so that
# one domain has two stages): math: midtrain -> sft (from midtrain's last checkpoint);
# tool_use: sft; then merge (after both) and router (after the merge). The math SFT job is
# sent SIGUSR1 a few steps in: it must checkpoint, requeue itself, and resume from that
# checkpoint without repeating a step.
#
# Settings (environment): WORK (default: a new folder under /tmp; kept for inspection),
# PYTHON (default: the repository's .venv/bin/python), SLURM_STATE (default
# /run/bar-slurm-test: daemons' config, state, logs, munge socket), RLVR=1 adds the
# tiny RLVR expert (digits: a Ray head of the job's own beside the training step),
# TIMEOUT (seconds, default 900).
# Needs root (slurmd runs jobs as their owner). The daemons are stopped at the end.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
die() { echo "error: $*" >&2; exit 1; }
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0
fi
INSTALL=0
[[ "${1:-}" == "--install" ]] && INSTALL=1
[[ $EUID -eq 0 ]] || die "run as root: slurmd must be able to start jobs as their owner"
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[[ -x "$PYTHON" ]] || die "PYTHON=$PYTHON is not executable (set up the repository's .venv, or set PYTHON)"
TIMEOUT=${TIMEOUT:-900}
SLURM_STATE=${SLURM_STATE:-/run/bar-slurm-test}
WORK=${WORK:-$(mktemp -d /tmp/bar-real-slurm.XXXXXX)}
mkdir -p "$WORK"
log() { echo "[$(date +%T)] $*"; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  (( INSTALL )) || die "slurm-wlm / munge not installed: rerun with --install (apt-get install -y slurm-wlm munge)"
  log "installing slurm-wlm and munge"
  DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge >"$WORK/apt.log" 2>&1 \
    || { apt-get update >>"$WORK/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge >>"$WORK/apt.log" 2>&1; } \
    || die "apt-get install slurm-wlm munge failed; see $WORK/apt.log"
fi

# -- a one-node cluster on private ports, with its own munge socket -----------------------
M=$SLURM_STATE/munge
stop_cluster() {
  local f
  for f in "$SLURM_STATE/slurmd.pid" "$SLURM_STATE/slurmctld.pid" "$M/munged.pid"; do
    if [[ -f "$f" ]]; then kill "$(cat "$f")" 2>/dev/null || true; fi
  done
}
stop_cluster; sleep 1
rm -rf "$SLURM_STATE"
mkdir -p "$SLURM_STATE"/{state,spool,log} "$M"
chown munge:munge "$M"; chmod 711 "$M"
[[ -f /etc/munge/munge.key ]] || { /usr/sbin/mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
runuser -u munge -- /usr/sbin/munged --socket="$M/munge.socket" --pid-file="$M/munged.pid" \
  --log-file="$M/munged.log" --seed-file="$M/seed" || die "munged did not start; see $M/munged.log"
trap 'stop_cluster' EXIT

HOST=$(hostname -s)
cat > "$SLURM_STATE/slurm.conf" <<CONF
ClusterName=bartest
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$M/munge.socket
StateSaveLocation=$SLURM_STATE/state
SlurmdSpoolDir=$SLURM_STATE/spool
SlurmctldPidFile=$SLURM_STATE/slurmctld.pid
SlurmdPidFile=$SLURM_STATE/slurmd.pid
SlurmctldLogFile=$SLURM_STATE/log/slurmctld.log
SlurmdLogFile=$SLURM_STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=60
MinJobAge=3600
NodeName=$HOST CPUs=$(nproc) RealMemory=$(( $(free -m | awk '/^Mem:/ {print $2}') / 2 )) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$SLURM_STATE/slurm.conf
slurmctld -f "$SLURM_CONF" -i || die "slurmctld did not start; see $SLURM_STATE/log/slurmctld.log"
slurmd -f "$SLURM_CONF" || die "slurmd did not start; see $SLURM_STATE/log/slurmd.log"
for _ in $(seq 60); do
  sinfo -h -o %t 2>/dev/null | grep -qx idle && break
  sleep 1
done
sinfo -h -o %t | grep -qx idle || die "the node did not become idle: $(sinfo 2>&1); see $SLURM_STATE/log/"
log "Slurm $(sinfo --version) up: $(sinfo -h -o '%P %D %t %N')"

# -- inputs: the tiny default, and a second stage for the math domain ----------------------
cd "$WORK"
log "tiny inputs in $WORK/runs/tiny"
OMP_NUM_THREADS=1 "$PYTHON" "$REPO/examples/tiny/make_tiny.py" --out runs/tiny >"$WORK/make_tiny.log" 2>&1 \
  || die "make_tiny.py failed; see $WORK/make_tiny.log"
CONFIGS=$WORK/configs
mkdir -p "$CONFIGS"
cp "$REPO/examples/configs/tiny/"{midtrain_math,sft_tool_use,router}.yaml "$CONFIGS/"
[[ "${RLVR:-0}" == 1 ]] && cp "$REPO/examples/configs/tiny/rlvr_digits.yaml" "$CONFIGS/"
"$PYTHON" - "$CONFIGS" <<'PY'
import sys, yaml
from pathlib import Path
d = Path(sys.argv[1])
cfg = yaml.safe_load((d / "sft_tool_use.yaml").read_text())
cfg["data"]["datasets"] = [{"path": "runs/tiny/data/general.jsonl", "kind": "chat", "domain": "math"}]
cfg["data"].pop("add_special_tokens", None)
cfg["train"]["output_dir"] = "runs/tiny/sft_math"
cfg["train"]["steps"] = 150  # long enough that the USR1 sent after step 4 lands mid-run
(d / "sft_math.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
PY

# -- submit -------------------------------------------------------------------------------
export PYTHON OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
export CONFIG_DIR=$CONFIGS RUN_ROOT=$WORK/runs/bar
export SBATCH_ARGS="--nodes=1 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 --time=00:30:00"
export EXTRA_ARGS_SFT="train.log_interval=1"     # a line per step: repeats would show
export EXTRA_ARGS_RLVR="train.steps=6"
export ROLLOUT_WORKERS=1
bash "$REPO/slurm/pipeline.sh" | tee "$WORK/submitted.txt"
job_of() { awk -v n="$1" '$2 == n { print $1 }' "$WORK/submitted.txt"; }
SFT_MATH=$(job_of bar-math-sft)
[[ -n "$SFT_MATH" ]] || die "pipeline.sh did not submit bar-math-sft"

# -- preempt the math SFT job a few steps in ----------------------------------------------
metrics=$RUN_ROOT/math/sft/metrics.jsonl
deadline=$(( SECONDS + TIMEOUT ))
log "waiting for job $SFT_MATH (math sft) to log 4 steps"
until [[ -f "$metrics" ]] && (( $(wc -l < "$metrics") >= 4 )); do
  (( SECONDS < deadline )) || die "job $SFT_MATH did not reach step 4 in time: $(squeue 2>&1)"
  state=$(scontrol show job "$SFT_MATH" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
  [[ "$state" == PENDING || "$state" == RUNNING ]] || die "job $SFT_MATH is $state before the preemption"
  sleep 0.2
done
log "scancel --signal=USR1 $SFT_MATH (after step $(wc -l < "$metrics"))"
scancel --signal=USR1 "$SFT_MATH"
# A requeued job waits ~2 minutes (Slurm's BeginTime) before it may start again; start it now.
until scontrol show job "$SFT_MATH" | grep -q "Restarts=1"; do
  (( SECONDS < deadline )) || die "job $SFT_MATH was not requeued: $(scontrol show job "$SFT_MATH")"
  sleep 0.5
done
log "job $SFT_MATH requeued; releasing its begin time"
scontrol update JobId="$SFT_MATH" StartTime=now

# -- wait for the chain -------------------------------------------------------------------
mapfile -t JOBS < <(awk '$1 ~ /^[0-9]+$/ { print $1 }' "$WORK/submitted.txt")
log "waiting for jobs ${JOBS[*]}"
while squeue -h -j "$(IFS=,; echo "${JOBS[*]}")" 2>/dev/null | grep -q .; do
  (( SECONDS < deadline )) || die "jobs still queued after ${TIMEOUT}s: $(squeue)"
  sleep 2
done
for j in "${JOBS[@]}"; do scontrol show job -o "$j" > "$WORK/job-$j.txt" || die "no record of job $j"; done

log "checking the outputs"
"$PYTHON" "$REPO/tests/slurm/real_slurm/check_pipeline.py" --work "$WORK" --preempted "$SFT_MATH"
log "PASS (outputs in $WORK)"
