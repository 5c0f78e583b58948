"""The trainer's cross entropy and log-probs (megatron's vocab-parallel cross entropy over
the vocabulary shard, padding columns masked) against torch's cross entropy over the true
vocabulary; bf16 logits through megatron's fused variant (the GPU path) too."""

import torch
import torch.nn.functional as F

from megatron_bar import platform
from megatron_bar.train.engine import token_cross_entropy, token_logprobs

VOCAB, PADDED = 200, 256  # 56 padding columns, as megatron pads the vocabulary


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 8, PADDED, generator=g)).to(dtype)
    labels = torch.randint(0, VOCAB, (2, 8), generator=g)
    return logits, labels


def _reference(logits, labels, temperature=1.0):
    """Loss and d(sum of loss)/d(logits) by torch, over the true vocabulary, in fp32."""
    x = (logits.detach().float()[..., :VOCAB] / temperature).requires_grad_()
    loss = F.cross_entropy(x.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").view(labels.shape)
    loss.sum().backward()
    return loss.detach(), x.grad


def test_fp32_loss_and_gradient_match_torch_over_the_true_vocabulary():
    platform.initialize()
    logits, labels = _inputs(torch.float32)
    ref_loss, ref_grad = _reference(logits, labels)
    x = logits.clone().requires_grad_()
    loss = token_cross_entropy(x.clone(), labels, VOCAB)  # it works in place: give it a copy
    loss.sum().backward()
    assert (loss - ref_loss).abs().max().item() < 1e-5
    assert (x.grad[..., :VOCAB] - ref_grad).abs().max().item() < 1e-6
    assert x.grad[..., VOCAB:].abs().max().item() == 0  # padding columns get no gradient


def test_logprobs_at_a_temperature_match_torch():
    platform.initialize()
    logits, labels = _inputs(torch.float32)
    ref_loss, _ = _reference(logits, labels, temperature=0.7)
    lp = token_logprobs(logits.clone(), labels, VOCAB, temperature=0.7)
    assert (lp + ref_loss).abs().max().item() < 1e-5


def test_bf16_goes_through_the_fused_variant_with_fp32_accumulation():
    platform.initialize()
    logits, labels = _inputs(torch.bfloat16)
    ref_loss, ref_grad = _reference(logits, labels)  # fp32 softmax of the same bf16 values
    x = logits.clone().requires_grad_()
    loss = token_cross_entropy(x.clone(), labels, VOCAB)
    loss.sum().backward()
    assert loss.dtype == torch.float32
    assert (loss - ref_loss).abs().max().item() < 1e-5
    assert x.grad.dtype == torch.bfloat16
    assert (x.grad[..., :VOCAB].float() - ref_grad).abs().max().item() <= 2 ** -7
    assert x.grad[..., VOCAB:].abs().max().item() == 0


def test_training_step_loss_is_transformers_loss(mcore_dense_dir, hf_dense_dir):
    """The training path (the model computes the loss from its logits shard, labels passed
    in) gives transformers' cross entropy of the same model over the true vocabulary."""
    from transformers import AutoModelForCausalLM

    from helpers import batch
    from megatron_bar.model.builder import build_model
    from megatron_bar.model.checkpoint import load_weights
    from megatron_bar.model.config import ModelConfig
    from megatron_bar.train.engine import Microbatch, forward_backward, wrap_ddp

    platform.initialize()
    cfg = ModelConfig.load(mcore_dense_dir)
    assert cfg.padded_vocab_size > cfg.vocab_size  # the padding columns are there to mask
    model = build_model(cfg, calculate_per_token_loss=True)  # the trainer's setting
    load_weights(model, cfg, mcore_dense_dir)
    ddp = wrap_ddp(model)
    tokens, labels = batch(4, 16, seed=5)
    mbs = [Microbatch(tokens[i:i + 2], labels[i:i + 2], torch.ones(2, 16)) for i in (0, 2)]
    out = forward_backward(ddp, mbs, cfg.vocab_size)
    hf = AutoModelForCausalLM.from_pretrained(hf_dense_dir).eval()
    with torch.no_grad():
        for mb, loss_sum, count in zip(mbs, out.losses, out.tokens):
            logits = hf(mb.tokens).logits.float()
            expected = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), mb.labels.reshape(-1))
            assert abs((loss_sum / count).item() - expected.item()) < 1e-5
