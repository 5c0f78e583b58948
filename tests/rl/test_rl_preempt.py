"""SIGUSR1 (Slurm's warning before the time limit) to a real RLVR run: it finishes the step
in flight, checkpoints, shuts its Ray fleet down and exits 75 (the Slurm scripts requeue on
it); the same command again resumes after that step, and every step is trained once -
synchronous and with rl.async_steps 1 (a rollout collected ahead when the signal came is
dropped, and the resumed run collects that step's again)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_bar.demo.toy_rl import write_digit_prompts
from megatron_bar.train.checkpoint import latest_checkpoint
from megatron_bar.train.metrics import read_metrics
from megatron_bar.train.preempt import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "tiny" / "rlvr_digits.yaml"
STEPS = 5


def _steps_logged(path: Path) -> int:
    try:
        return len(read_metrics(path))
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.parametrize("async_steps", [0, 1])
def test_signal_checkpoints_and_resume_completes(tiny_base, tmp_path, async_steps):
    prompts = write_digit_prompts(tmp_path / "digits.jsonl")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_bar.rl", str(CONFIG), f"model.load={tiny_base['bar2']}",
           f'rl.datasets=[{{path: "{prompts}", reward: "megatron_bar.demo.toy_rl:digits_reward"}}]',
           "rl.num_workers=1", f"rl.async_steps={async_steps}", f"train.steps={STEPS}", f"train.output_dir={out}", "checkpoint.interval=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while _steps_logged(out / "metrics.jsonl") < 1:
            assert first.poll() is None, first.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "the run did not reach step 1"
            time.sleep(0.1)
        first.send_signal(signal.SIGUSR1)
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == REQUEUE_EXIT_CODE, stderr[-4000:]
    stopped = latest_checkpoint(out / "checkpoints")
    assert stopped is not None, "no checkpoint after the signal"
    stopped_at = int(stopped.name.split("_")[1])
    assert 1 <= stopped_at < STEPS

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1)), steps  # nothing repeated, nothing skipped
    lags = [r["rollout_policy_lag"] for r in read_metrics(out / "metrics.jsonl")]
    # the first step of each run is collected on-policy
    assert lags == [0 if s in (1, stopped_at + 1) else async_steps for s in steps], lags
    assert latest_checkpoint(out / "checkpoints").name == f"iter_{STEPS:07d}"
