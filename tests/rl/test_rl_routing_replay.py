"""Routing replay (R3): the rollout worker records the experts its transformers copy chose
for every token, and the megatron trainer, given them, routes each token to exactly those
experts - checked against transformers forced to the same experts, not against the code
under test. Top-1 of the tiny 2-expert model, with the experts made to differ."""

import pytest
import torch

from megatron_bar import platform
from megatron_bar.convert.hf_io import hf_config_from_model_config
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import load_weights
from megatron_bar.model.config import ModelConfig
from megatron_bar.rl.rollout import RolloutWorker
from megatron_bar.rl.routing import RoutingReplay, stack_routing
from megatron_bar.rl.weights import gather_hf_state_dict

PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10]]


@pytest.fixture(scope="module")
def models(tiny_base):
    if not platform.is_initialized():
        platform.initialize()
    cfg = ModelConfig.load(tiny_base["bar2"]).with_(moe_topk=1)
    gpt = build_model(cfg, moe_enable_routing_replay=True)
    load_weights(gpt, cfg, tiny_base["bar2"])
    torch.manual_seed(0)
    with torch.no_grad():  # move away from the upcycled state so that routing matters
        for name, p in gpt.named_parameters():
            if "local_experts.1" in name or "router" in name:
                p.add_(0.5 * torch.randn_like(p))
    gpt.eval()
    worker = RolloutWorker(hf_config_from_model_config(cfg, torch.float32))
    worker.set_weights(gather_hf_state_dict(gpt, cfg), 1)
    return cfg, gpt, worker


def _megatron_logprobs(gpt, cfg, prompt, completion, routing=None):
    seq = torch.tensor([prompt + completion[:-1]])
    replay = RoutingReplay(gpt)
    if routing is not None:
        replay.set(stack_routing([routing], seq.size(1), cfg.moe_topk))
    try:
        with torch.no_grad():
            logits = gpt(seq, torch.arange(seq.size(1))[None], None)[0, len(prompt) - 1 :, : cfg.vocab_size]
    finally:
        replay.clear()
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def _hf_forced_logprobs(worker, prompt, completion, experts):
    """transformers' FlexOlmo with every router's top-k replaced by ``experts`` [layers, pos, k]:
    the gate's weights are its own softmax probabilities at those experts, as in megatron."""
    gates = [layer.mlp.gate for layer in worker.model.model.layers]
    originals = [g.forward for g in gates]

    def forced(layer, gate):
        def forward(hidden_states):
            hidden_states = hidden_states.reshape(-1, gate.hidden_dim)
            logits = torch.nn.functional.linear(hidden_states, gate.weight)
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            idx = experts[layer].long().reshape(-1, experts.size(-1))
            top = probs.gather(1, idx)
            if gate.norm_topk_prob:
                top = top / top.sum(-1, keepdim=True)
            return logits, top.to(logits.dtype), idx
        return forward

    for i, g in enumerate(gates):
        g.forward = forced(i, g)
    try:
        with torch.no_grad():
            logits = worker.model(torch.tensor([prompt + completion[:-1]])).logits[0, len(prompt) - 1 :]
        return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    finally:
        for g, f in zip(gates, originals):
            g.forward = f


def test_rollout_records_the_experts_of_every_trained_position(models):
    cfg, _, worker = models
    out = worker.generate(PROMPTS, 2, 1.0, 6, eos_id=2, pad_id=3, seed=0, record_routing=True)
    for r in out:
        prompt = PROMPTS[r["prompt_index"]]
        routing = r["routing"]
        assert routing.shape == (cfg.num_layers, len(prompt) + len(r["tokens"]) - 1, 1)
        # the same experts as one uncached forward pass of the whole sequence picks
        seen = []
        hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: seen.append(o[2]))
                 for layer in worker.model.model.layers]
        try:
            worker.logprobs(prompt, r["tokens"])
        finally:
            for h in hooks:
                h.remove()
        full = torch.stack(seen)[:, : routing.size(1)]
        assert torch.equal(full.to(routing.dtype), routing)


def test_trainer_replays_the_given_experts(models):
    cfg, gpt, worker = models
    out = worker.generate(PROMPTS, 2, 1.0, 6, eos_id=2, pad_id=3, seed=1, record_routing=True)
    r = max(out, key=lambda r: len(r["tokens"]))
    prompt = PROMPTS[r["prompt_index"]]
    completion = r["tokens"]
    # replaying the rollout's own choice reproduces the rollout's log-probs
    replayed = _megatron_logprobs(gpt, cfg, prompt, completion, r["routing"])
    assert (replayed - torch.tensor(r["logprobs"])).abs().max().item() <= 1e-4
    # replaying the opposite experts gives what transformers computes with them forced
    flipped = 1 - r["routing"]
    forced = _hf_forced_logprobs(worker, prompt, completion, flipped)
    got = _megatron_logprobs(gpt, cfg, prompt, completion, flipped)
    assert (got - forced).abs().max().item() <= 1e-4
    assert (got - replayed).abs().max().item() > 1e-2  # and the experts did matter


def test_stack_routing_pads_and_orders_sequence_first():
    a = torch.tensor([[[1], [0], [1]]], dtype=torch.int16)  # [1 layer, 3 positions, k=1]
    b = torch.tensor([[[1]]], dtype=torch.int16)
    out = stack_routing([a, b], 4, 1)
    assert out.shape == (1, 4, 2, 1)
    assert out[0, :, 0, 0].tolist() == [1, 0, 1, 0]
    assert out[0, :, 1, 0].tolist() == [1, 0, 0, 0]
