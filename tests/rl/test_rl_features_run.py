"""The RLVR CLI with every option users reach for turned on at once - dynamic sampling,
the overlong penalty (every tiny answer runs to the cap), RLOO, dual-clip, held-out evaluation, routing replay on a top-1 MoE -
runs to the end and logs what each one promises."""

import os
import subprocess
import sys
from pathlib import Path

from helpers import _free_port
from megatron_bar.demo.toy_rl import write_digit_prompts
from megatron_bar.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "tiny" / "rlvr_digits.yaml"


def test_every_option_on(tiny_base, tmp_path):
    train = write_digit_prompts(tmp_path / "digits.jsonl")
    held_out = write_digit_prompts(tmp_path / "held_out.jsonl", n=4, seed=1)
    reward = "megatron_bar.demo.toy_rl:digits_reward"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_bar.rl", str(CONFIG), f"model.load={tiny_base['bar2']}",
           f'rl.datasets=[{{path: "{train}", reward: "{reward}"}}]',
           f'rl.eval_datasets=[{{path: "{held_out}", reward: "{reward}"}}]',
           "rl.eval_interval=2", "rl.eval_samples=2", "rl.dynamic_sampling=true",
           "rl.dynamic_sampling_max_rounds=2", "rl.overlong=penalty", "rl.advantage=rloo",
           "rl.routing_replay=true", "model.moe_topk=1", "rl.num_workers=1", "rl.prompts_per_rollout=4",
           "train.steps=3", f"train.output_dir={out}", "checkpoint.interval=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [("eval/held_out/greedy" in r) for r in rows] == [True, False, True, True]
    for r in rows[1:]:
        assert 1 <= r["dynamic_sampling_rounds"] <= 2
        assert r["dynamic_sampling_refills"] == r["dynamic_sampling_rounds"] - 1
        assert 0.0 <= r["overlong_share"] <= 1.0 and r["entropy"] > 0
    for key in ("eval/held_out/greedy", "eval/held_out/greedy_acc", "eval/held_out/pass@2"):
        assert 0.0 <= rows[-1][key] <= 1.0
    assert any("clip_frac_dual" in r for r in rows[1:])
    # float32 on both sides and the rollout's experts replayed: the engines agree to rounding
    assert all(r["rollout_logprob_gap"] < 1e-4 for r in rows[1:] if r["samples_trained"])
    assert (out / "reward.png").stat().st_size > 1000


def test_routing_replay_on_a_dense_model_is_a_clear_error(tiny_base, tmp_path):
    train = write_digit_prompts(tmp_path / "digits.jsonl")
    cmd = [sys.executable, "-m", "megatron_bar.rl", str(CONFIG), f"model.load={tiny_base['dense']}",
           f'rl.datasets=[{{path: "{train}", reward: "megatron_bar.demo.toy_rl:digits_reward"}}]',
           "rl.routing_replay=true", f"train.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode != 0
    assert "rl.routing_replay" in proc.stderr and "dense" in proc.stderr


def test_pipeline_parallel_logs_the_last_stages_loss(tiny_base, tmp_path):
    """PP=2 under torchrun: microbatches of 5 leave a short last one (it used to break
    megatron's fixed pipeline shapes), and rank 0 - the first stage - logs the loss, clip
    fraction and KL that only the last stage computes."""
    train = write_digit_prompts(tmp_path / "digits.jsonl")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "megatron_bar.rl", str(CONFIG),
           f"model.load={tiny_base['bar2']}",
           f'rl.datasets=[{{path: "{train}", reward: "megatron_bar.demo.toy_rl:digits_reward"}}]',
           "parallel.pp=2", "train.micro_batch_size=5", "rl.kl_beta=0.1", "rl.num_workers=1",
           "train.steps=2", f"train.output_dir={out}", "checkpoint.interval=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert any(r["samples_trained"] % 5 for r in rows)  # a short last microbatch happened
    assert all("clip_frac" in r and "kl" in r for r in rows)
    assert rows[1]["kl"] > 0 and rows[1]["loss"] != 0.0  # the policy moved off the reference at step 1
