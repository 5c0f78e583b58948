"""The rollout's own decoding loop (megatron_bar.rl.decode) against transformers: greedy
decoding returns what ``generate`` returns (left-padded prompts of different lengths, EOS,
fp32 and bf16); sampled tokens' log-probs and entropies equal those of one full forward
over prompt + completion; the model is asked for one position's logits per step; the
sampler draws from softmax(logits / T) and allocates no more than a chunk of rows at once;
a seed fixes the draw."""

import copy

import pytest
import torch

from helpers import perturbed_bar2_worker
from megatron_bar.rl.decode import decode, sample_rows
from megatron_bar.rl.grpo import token_entropy

PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13]]
EOS, PAD = 2, 3


@pytest.fixture(scope="module")
def model(tiny_base):
    return perturbed_bar2_worker(tiny_base["bar2"]).model


def _batch(prompts):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_equals_generate(model, dtype):
    m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    ids, mask = _batch(PROMPTS)
    eos = decode(m, ids, mask, 0.0, 12, -1, PAD).tokens[1, 4].item()  # one row stops early
    ours = decode(m, ids, mask, 0.0, 12, eos, PAD)
    with torch.no_grad():
        ref = m.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                         eos_token_id=eos, pad_token_id=PAD)[:, ids.size(1):]
    assert torch.equal(ours.tokens, ref)
    assert ours.tokens[1, 5:].eq(PAD).all() and ours.tokens.size(1) > 5  # padded after its EOS
    assert ours.logprobs.dtype == torch.float32 and (ours.logprobs <= 1e-6).all()


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_logprobs_equal_a_full_forward(model, temperature):
    ids, mask = _batch(PROMPTS)
    torch.manual_seed(3)
    out = decode(model, ids, mask, temperature, 10, EOS, PAD)
    for i, prompt in enumerate(PROMPTS):
        tokens = out.tokens[i].tolist()
        n = tokens.index(EOS) + 1 if EOS in tokens else len(tokens)
        with torch.no_grad():  # no padding, no cache: positions 0.. of this sequence alone
            logits = model(torch.tensor([prompt + tokens[:n]])).logits[0, len(prompt) - 1 : -1] / temperature
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[:n])[:, None]).squeeze(-1)
        assert (out.logprobs[i, :n] - ref).abs().max().item() <= 1e-4
        assert (out.entropy[i, :n] - token_entropy(logits)).abs().max().item() <= 1e-4


def test_one_position_of_logits_per_step(model, monkeypatch):
    shapes = []
    forward = model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        shapes.append(tuple(out.logits.shape))
        return out

    monkeypatch.setattr(model, "forward", spy)
    ids, mask = _batch(PROMPTS)
    out = decode(model, ids, mask, 1.0, 6, -1, PAD)
    assert out.tokens.shape == (3, 6)
    assert shapes == [(3, 1, model.config.vocab_size)] * 6  # prefill included; no forward after the last


def test_a_seed_fixes_the_draw(model):
    ids, mask = _batch(PROMPTS)
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append(decode(model, ids, mask, 1.0, 8, -1, PAD).tokens)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_sampler_draws_from_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]]).repeat(20000, 1)
    torch.manual_seed(0)
    tokens, logprobs, entropy = sample_rows(logits, 0.5, rows=7)  # chunks that do not divide n
    expected = torch.softmax(logits[0] / 0.5, -1)
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert (freq - expected).abs().max().item() < 0.015
    assert torch.allclose(logprobs, expected.log()[tokens])
    assert torch.allclose(entropy, -(expected * expected.log()).sum().expand(len(tokens)))


def test_sampling_allocates_a_chunk_of_rows_at_most(monkeypatch):
    """No tensor the sampler makes is larger than one [rows, V] chunk in float32: the step's
    [n, V] logits are never copied whole (what generate's float copy, softmax and
    multinomial each did)."""
    from torch.profiler import ProfilerActivity, profile

    import megatron_bar.rl.decode as decode_module

    n, vocab = 64, 4096
    monkeypatch.setattr(decode_module, "SAMPLE_CHUNK_ELEMENTS", 8 * vocab)
    logits = torch.randn(n, vocab)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tokens, _, _ = sample_rows(logits, 0.7)
    allocations = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert tokens.shape == (n,) and allocations
    assert max(allocations) == 8 * vocab * 4  # one [8, V] float32; [n, V] would be 8x that
