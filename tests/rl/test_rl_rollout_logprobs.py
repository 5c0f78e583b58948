"""The rollout worker's log-probs and entropy, taken one decoding step at a time, equal a
full-vocabulary reference: transformers' forward over prompt + completion, log-softmax
of the logits / temperature, gathered at the sampled tokens - with left-padded prompts of
different lengths, at a temperature, greedily, and with routing recorded. (That decoding
asks the model for one position's logits per step: tests/rl/test_rl_decode.py.)"""

import pytest
import torch

from helpers import perturbed_bar2_worker
from megatron_bar.rl.grpo import token_entropy

PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10]]


@pytest.fixture(scope="module")
def worker(tiny_base):
    return perturbed_bar2_worker(tiny_base["bar2"])


def _reference(worker, prompt, completion, temperature):
    with torch.no_grad():
        logits = worker.model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    logits = logits / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    return lp, token_entropy(logits).sum()


@pytest.mark.parametrize("temperature,record", [(0.7, False), (1.0, True), (0.0, False)])
def test_stepwise_logprobs_equal_a_full_vocabulary_forward(worker, temperature, record):
    out = worker.generate(PROMPTS, 3, temperature, 10, eos_id=2, pad_id=3, seed=4, record_routing=record)
    assert len(out) == 6
    for r in out:
        prompt = PROMPTS[r["prompt_index"]]
        lp, entropy = _reference(worker, prompt, r["tokens"], temperature or 1.0)
        assert len(r["logprobs"]) == len(r["tokens"]) > 0
        assert (torch.tensor(r["logprobs"]) - lp).abs().max().item() <= 1e-4
        assert abs(r["entropy_sum"] - entropy.item()) <= 1e-3
        if temperature == 0:  # greedy: each token is the argmax, log-prob the largest
            assert all(x <= 1e-6 for x in r["logprobs"])
        if record:
            assert r["routing"].shape[1] == len(prompt) + len(r["tokens"]) - 1

