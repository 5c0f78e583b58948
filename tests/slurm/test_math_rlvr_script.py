"""slurm/math_rlvr.sh: syntax, --help, clear errors, and the commands it runs - on this
machine outside Slurm, and inside a (faked) 3-node Slurm allocation."""

import os
import shutil
import subprocess

import pytest

from helpers import REPO

SCRIPT = REPO / "slurm" / "math_rlvr.sh"


def run(env_extra, *args, path_prefix=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(env_extra)
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)


def test_syntax_help_and_shellcheck():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = run({}, "--help")
    assert proc.returncode == 0 and "ROLLOUT_WORKERS" in proc.stdout and "DRY_RUN" in proc.stdout
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", str(SCRIPT)]).returncode == 0


@pytest.mark.parametrize("env,message", [
    ({"CONFIG": "/nonexistent.yaml"}, "CONFIG=/nonexistent.yaml: file not found"),
    ({"TP": "two"}, "TP must be a whole number"),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "PATH": "NO_SLURM"}, "scontrol is not on PATH"),
])
def test_bad_settings_fail_clearly(env, message, path_without_slurm):
    if env.get("PATH") == "NO_SLURM":
        env = {**env, "PATH": path_without_slurm}
    proc = run({"DRY_RUN": "1", **env})
    assert proc.returncode == 1 and message in proc.stderr


def test_dry_run_on_this_machine():
    proc = run({"DRY_RUN": "1", "TP": "2", "ROLLOUT_WORKERS": "3"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("+ ray start --head --port 6379")
    assert "-m megatron_bar.rl" in lines[1] and "parallel.tp=2" in lines[1]
    assert "rl.num_workers=3" in lines[1] and "rl.ray_address=" in lines[1]
    assert lines[0].endswith("--block &")  # a head of this job's own, stopped by killing it
    assert "ray stop" not in proc.stdout  # that would stop other jobs' Ray on a shared node


def test_dry_run_in_a_slurm_allocation(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'node1\\nnode2\\nnode3\\n'\n")
    (fake / "scontrol").chmod(0o755)
    proc = run({"DRY_RUN": "1", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[1-3]",
                "GPUS_PER_NODE": "8", "EP": "2"}, path_prefix=fake)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "+ srun --overlap --nodes=1 --ntasks=1 -w node1 ray start --head" in out
    for node in ("node2", "node3"):
        assert f"+ srun --overlap --nodes=1 --ntasks=1 -w {node} ray start --address node1:6379" in out
        assert f"-w {node} ray start --address node1:6379 --num-cpus" in out and "--block &" in out
    assert "ray stop" not in out
    assert "--nnodes 3 --nproc-per-node 8" in out and "--rdzv-endpoint node1:29500" in out
    assert "+ srun --overlap --nodes=3 --ntasks-per-node=1" in out and "parallel.ep=2" in out
