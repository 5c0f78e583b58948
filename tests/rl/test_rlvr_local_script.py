"""examples/rlvr_local.sh: the training ranks (two, data parallel, under torchrun) join a
Ray head by address, as slurm/math_rlvr.sh runs them on a cluster; the head is stopped at
the end, and nothing else's Ray is touched."""

import os
import subprocess
import sys
from pathlib import Path

import psutil

from helpers import _free_port
from megatron_bar.demo.toy_rl import write_digit_prompts
from megatron_bar.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "rlvr_local.sh"
CONFIG = REPO / "examples" / "configs" / "tiny" / "rlvr_digits.yaml"


def test_help_and_lint():
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "ROLLOUT_WORKERS" in out.stdout
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    bad = subprocess.run(["bash", str(SCRIPT), "no/such.yaml"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no/such.yaml" in bad.stderr


def test_two_ranks_join_a_ray_head(tiny_base, tmp_path):
    prompts = write_digit_prompts(tmp_path / "digits.jsonl")
    port = _free_port()
    env = {**os.environ, "NPROC": "2", "ROLLOUT_WORKERS": "2", "RAY_PORT": str(port),
           "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "ray"), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(CONFIG), f"model.load={tiny_base['bar2']}",
         f'rl.datasets=[{{path: "{prompts}", reward: "megatron_bar.demo.toy_rl:digits_reward"}}]',
         "train.steps=2", "train.global_batch_size=16", f"train.output_dir={out}", "checkpoint.interval=2"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "checkpoints" / "iter_0000002").is_dir()
    assert (tmp_path / "ray" / "ray_head.log").is_file()
    left = [p for p in psutil.process_iter(["cmdline"])
            if f"--port {port}" in " ".join(p.info["cmdline"] or []) or
            f"--port={port}" in " ".join(p.info["cmdline"] or [])]
    assert not left, f"the Ray head is still running: {[p.pid for p in left]}"
