"""``rl.engine: megatron``: megatron-core's inference engine on the trainer's modules.

Checked against two independent things: the transformers engine's greedy tokens (another
model implementation, another decoding loop, left padding instead of megatron's
right-aligned prompts) and the trainer's own log-probs of the sampled tokens (one full
forward of prompt + completion, no KV cache). Then one RLVR run through the CLI with it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import perturbed_policy
from megatron_bar.convert.hf_io import hf_config_from_model_config
from megatron_bar.demo.toy_rl import write_digit_prompts
from megatron_bar.rl.grpo import token_entropy
from megatron_bar.rl.mcore_engine import MegatronRolloutWorker
from megatron_bar.rl.rollout import RolloutWorker
from megatron_bar.rl.weights import gather_hf_state_dict, gather_mcore_state_dict
from megatron_bar.train.engine import Microbatch, forward_logprobs
from megatron_bar.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [4, 4]]  # three lengths: megatron starts each at its own step


@pytest.fixture(scope="module", params=["dense", "bar2"])
def engines(request, tiny_base):
    policy = perturbed_policy(tiny_base[request.param])
    hf = RolloutWorker(hf_config_from_model_config(policy.config, torch.float32))
    hf.set_weights(gather_hf_state_dict(policy.gpt, policy.config), 1)
    mc = MegatronRolloutWorker(policy.config.to_dict())
    mc.set_weights(gather_mcore_state_dict(policy.gpt, policy.config), 1)
    return policy, hf, mc


def test_greedy_tokens_equal_the_transformers_engine(engines):
    _, hf, mc = engines
    ours = mc.generate(PROMPTS, 2, 0.0, 12, eos_id=2, pad_id=3, seed=0)
    theirs = hf.generate(PROMPTS, 2, 0.0, 12, eos_id=2, pad_id=3, seed=0)
    assert [r["prompt_index"] for r in ours] == [0, 0, 1, 1, 2, 2]
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in theirs]
    assert all(len(r["tokens"]) > 0 for r in ours)
    for a, b in zip(ours, theirs):
        assert a["truncated"] == b["truncated"] and a["version"] == 1
        assert torch.allclose(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), atol=1e-4)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_logprobs_equal_the_trainers(engines, temperature):
    policy, _, mc = engines
    out = mc.generate(PROMPTS, 3, temperature, 10, eos_id=2, pad_id=3, seed=4)
    assert len(out) == 9
    assert len({tuple(r["tokens"]) for r in out}) > 1  # it sampled
    for r in out:
        prompt = PROMPTS[r["prompt_index"]]
        seq = torch.tensor([prompt + r["tokens"]])
        mb = Microbatch(seq[:, :-1], seq[:, 1:], torch.ones(1, seq.size(1) - 1))
        lp = forward_logprobs(policy.gpt, [mb], policy.config.vocab_size, temperature)[0][0, len(prompt) - 1:]
        assert len(r["logprobs"]) == len(r["tokens"])
        assert (torch.tensor(r["logprobs"]) - lp).abs().max().item() <= 1e-5
        with torch.no_grad():
            logits = policy(seq)[0, len(prompt) - 1 : -1].float() / temperature
        assert abs(r["entropy_sum"] - token_entropy(logits).sum().item()) <= 1e-3


def test_a_weight_update_changes_what_it_generates(engines):
    policy, _, mc = engines
    before = mc.generate(PROMPTS, 1, 0.0, 6, eos_id=2, pad_id=3, seed=0)
    state = gather_mcore_state_dict(policy.gpt, policy.config)
    head = "output_layer.weight"
    mc.update_weights({head: state[head].flip(0)}, 2)  # another token is every argmax
    try:
        after = mc.generate(PROMPTS, 1, 0.0, 6, eos_id=2, pad_id=3, seed=0)
        assert [r["tokens"] for r in after] != [r["tokens"] for r in before]
        assert {r["version"] for r in after} == {2}
    finally:
        mc.update_weights({head: state[head]}, 1)
    with pytest.raises(KeyError, match="unknown tensor 'model.embed_tokens.weight'"):
        mc.update_weights({"model.embed_tokens.weight": torch.zeros(1)}, 3)


def test_an_rlvr_run_with_the_megatron_engine(tiny_base, tmp_path):
    train = write_digit_prompts(tmp_path / "digits.jsonl")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_bar.rl", str(REPO / "examples/configs/tiny/rlvr_digits.yaml"),
           f"model.load={tiny_base['bar2']}", "rl.engine=megatron",
           f'rl.datasets=[{{path: "{train}", reward: "megatron_bar.demo.toy_rl:digits_reward"}}]',
           "rl.num_workers=1", "rl.prompts_per_rollout=4", "train.steps=2",
           f"train.output_dir={out}", "checkpoint.interval=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    # the engine's log-probs are the trainer's to rounding (fp32, same modules, same weights)
    assert all(r["rollout_logprob_gap"] < 1e-4 for r in rows if r["samples_trained"])
    assert all(r["weight_sync_bytes"] > 0 for r in rows)  # the trainer's tensors, by megatron name
