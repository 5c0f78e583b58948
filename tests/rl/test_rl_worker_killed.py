"""A rollout worker killed in the middle of a real RLVR run: Ray restarts it, the fleet
gives it the current weights and retries its share, and the run completes every step
exactly once. With two minibatches per rollout the second update sees ratios away from 1
(the clip fraction is measured, not always 0)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron_bar.demo.toy_rl import write_digit_prompts
from megatron_bar.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "tiny" / "rlvr_digits.yaml"
STEPS = 6


def _rows(path: Path) -> list[dict]:
    try:
        return read_metrics(path)
    except (FileNotFoundError, ValueError):
        return []


def test_killed_worker_mid_run(tiny_base, tmp_path):
    prompts = write_digit_prompts(tmp_path / "digits.jsonl")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_bar.rl", str(CONFIG), f"model.load={tiny_base['bar2']}",
           f'rl.datasets=[{{path: "{prompts}", reward: "megatron_bar.demo.toy_rl:digits_reward"}}]',
           "rl.num_workers=2", "rl.minibatches=2", "rl.timeout_s=120", f"train.steps={STEPS}",
           f"train.output_dir={out}", f"checkpoint.interval={STEPS}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while len(_rows(out / "metrics.jsonl")) < 2:
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "the run did not reach step 2"
            time.sleep(0.2)
        victim = json.loads((out / "rollout_workers.json").read_text())["pids"][1]
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step, once
    assert rows[-1]["worker_restarts"] >= 1
    assert all(r["updates"] == 2 for r in rows if r["samples_trained"] > 0)
    assert max(r.get("clip_frac", 0.0) for r in rows) > 0.0
    assert (out / "checkpoints" / f"iter_{STEPS:07d}").is_dir()
