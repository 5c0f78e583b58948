"""The language-model loss and log-probs from this rank's vocabulary shard of the logits.

megatron's vocab-parallel cross entropy: max, sum of exponentials and the label's logit are
reduced over the tensor-parallel group, so no rank ever holds a full vocabulary row; the
softmax is accumulated in fp32 and built in place of the shard. The columns past the true
vocabulary (megatron's padding rows) are masked first, so the loss is over the true
vocabulary, as transformers computes it.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set this rank's columns past the true vocabulary (megatron's padding rows) to -inf,
    in place, so that the softmax is over the true vocabulary only."""
    part = logits.size(-1)
    start = parallel_state.get_tensor_model_parallel_rank() * part
    valid = min(max(vocab_size - start, 0), part)
    if valid < part:
        logits[..., valid:].fill_(float("-inf"))
    return logits


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token cross entropy [b, s] from this rank's vocabulary shard ``logits`` [b, s, v/tp].

    megatron's vocab-parallel cross entropy: max, sum of exponentials and the label's
    logit are reduced over the TP group, the softmax is accumulated in fp32 (a bf16 shard
    is upcast once, as megatron does). It overwrites ``logits`` with the softmax, which it
    keeps for the backward: callers that need the logits afterwards take a copy first.
    bf16 logits go through megatron's fused variant (its gradient is cast to bf16, so it
    applies to bf16 logits only).
    """
    logits = mask_padded_vocab(logits, vocab_size)
    labels = labels.contiguous()
    if logits.dtype == torch.bfloat16:
        return fused_vocab_parallel_cross_entropy(
            logits, labels, parallel_state.get_tensor_model_parallel_group())
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   temperature: float = 1.0) -> torch.Tensor:
    """log p(label) [b, s] under softmax(logits / temperature), from the vocabulary shard
    (differentiable; overwrites ``logits`` as :func:`token_cross_entropy` does)."""
    if temperature != 1.0:
        logits = logits.div_(temperature)
    return -token_cross_entropy(logits, labels, vocab_size)
