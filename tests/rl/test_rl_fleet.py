"""The Ray rollout fleet: weights pushed from the megatron trainer reproduce its
log-probs in the workers; a later push sends only the tensors that changed, in buckets,
and the workers again reproduce the trainer; a killed worker is restarted and gets the weights back; every
wait ends in a clear error instead of hanging."""

import os
import signal

import pytest
import torch

from helpers import perturbed_policy
from megatron_bar.convert.hf_io import hf_config_from_model_config
from megatron_bar.rl.fleet import FleetConfig, RolloutError, RolloutFleet
from megatron_bar.rl.weights import gather_hf_state_dict

PROMPT = [1, 5, 6, 7, 8]


@pytest.fixture(scope="module")
def policy(tiny_base):
    # moved away from the upcycled state so the experts differ (unseeded, as before)
    return perturbed_policy(tiny_base["bar2"], scale=0.05, seed=None)


@pytest.fixture(scope="module")
def fleet(policy):
    fleet = RolloutFleet(hf_config_from_model_config(policy.config, torch.float32),
                         FleetConfig(num_workers=2, timeout_s=120))
    fleet.push_weights(gather_hf_state_dict(policy.gpt, policy.config), version=1)
    yield fleet
    fleet.shutdown()


def trainer_logprobs(policy, prompt, completion):
    with torch.no_grad():
        logits = policy(torch.tensor([prompt + completion]))[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_pushed_weights_reproduce_trainer_logprobs(policy, fleet):
    rollouts = fleet.generate([PROMPT, PROMPT[:3]], 2, 1.0, 12, eos_id=2, pad_id=3, seed=0)
    assert len(rollouts) == 4 and {r["prompt_index"] for r in rollouts} == {0, 1}
    for r in rollouts:
        prompt = PROMPT if r["prompt_index"] == 0 else PROMPT[:3]
        expected = trainer_logprobs(policy, prompt, r["tokens"])
        assert (torch.tensor(r["logprobs"]) - expected).abs().max().item() <= 1e-4
        for worker in (0, 1):
            got = torch.tensor(fleet.logprobs(worker, prompt, r["tokens"]))
            assert (got - expected).abs().max().item() <= 1e-4


def test_second_push_sends_only_what_changed(policy, fleet):
    """After a push, a second push of a policy whose non-anchor experts moved sends only
    those tensors (the anchor, embeddings and attention are unchanged and skipped), and
    both workers then reproduce the trainer's log-probs again."""
    first = fleet.last_sync
    assert first["tensors_unchanged"] == 0 and first["bytes"] > 0
    fleet.push_weights(gather_hf_state_dict(policy.gpt, policy.config), version=2)
    assert fleet.last_sync["tensors"] == 0 and fleet.last_sync["bytes"] == 0
    with torch.no_grad():
        for name, p in policy.gpt.named_parameters():
            if "local_experts.1" in name:
                p.add_(0.05 * torch.randn_like(p))
    state = gather_hf_state_dict(policy.gpt, policy.config)
    expected_keys = [k for k in state if ".experts.1." in k]
    fleet.push_weights(state, version=3)
    sync = fleet.last_sync
    assert expected_keys and sync["tensors"] == len(expected_keys)
    assert sync["bytes"] == sum(state[k].numel() * 4 for k in expected_keys) < first["bytes"] / 2
    rollouts = fleet.generate([PROMPT], 2, 1.0, 10, eos_id=2, pad_id=3, seed=5)
    for r in rollouts:
        expected = trainer_logprobs(policy, PROMPT, r["tokens"])
        assert (torch.tensor(r["logprobs"]) - expected).abs().max().item() <= 1e-4
        for worker in (0, 1):
            got = torch.tensor(fleet.logprobs(worker, PROMPT, r["tokens"]))
            assert (got - expected).abs().max().item() <= 1e-4


def test_buckets_split_a_push(policy, fleet):
    original = fleet.cfg.sync_bucket_mb
    fleet.cfg.sync_bucket_mb = 0.01
    try:
        with torch.no_grad():
            for name, p in policy.gpt.named_parameters():
                if "local_experts.1" in name:
                    p.add_(0.05 * torch.randn_like(p))
        fleet.push_weights(gather_hf_state_dict(policy.gpt, policy.config), version=4)
        assert fleet.last_sync["buckets"] > 1
    finally:
        fleet.cfg.sync_bucket_mb = original
    r = fleet.generate([PROMPT], 2, 1.0, 10, eos_id=2, pad_id=3, seed=6)[-1]
    got = torch.tensor(fleet.logprobs(1, PROMPT, r["tokens"]))
    assert (got - trainer_logprobs(policy, PROMPT, r["tokens"])).abs().max().item() <= 1e-4


def test_killed_worker_is_restarted_with_the_weights(policy, fleet):
    # after the delta pushes above: the restarted process gets the whole model
    pid = fleet.worker_pids()[1]
    os.kill(pid, signal.SIGKILL)
    rollouts = fleet.generate([PROMPT] * 4, 2, 1.0, 8, eos_id=2, pad_id=3, seed=1)
    assert len(rollouts) == 8
    assert fleet.restarts_seen >= 1
    assert fleet.worker_pids()[1] != pid
    completion = rollouts[-1]["tokens"]
    got = torch.tensor(fleet.logprobs(1, PROMPT, completion))
    assert (got - trainer_logprobs(policy, PROMPT, completion)).abs().max().item() <= 1e-4


def test_waits_end_in_a_clear_error(fleet):
    original = fleet.cfg.timeout_s
    fleet.cfg.timeout_s = 1e-4
    try:
        with pytest.raises(RolloutError, match="timed out"):
            fleet.generate([PROMPT] * 8, 8, 1.0, 64, eos_id=-1, pad_id=3, seed=2)
    finally:
        fleet.cfg.timeout_s = original
