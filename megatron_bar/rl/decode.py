"""Sampling from a transformers causal LM with the KV cache, keeping what a rollout reports
and never more than one decoding step's logits.

``generate`` copies each step's ``[n, V]`` logits to float32 (a copy even when they are
float32 already), and a logits processor that takes log-probs, its softmax and
``multinomial`` each make another ``[n, V]``: at a 100k vocabulary and 64 samples those
copies, not the model or its cache, set a rollout worker's peak memory. This loop asks the
model for the last position's logits only (``logits_to_keep=1``, in the model's own dtype),
and turns them into tokens, log-probs and entropies a few rows at a time
(:func:`sample_rows`), so one ``[n, V]`` and a few ``[rows, V]`` temporaries of at most
``SAMPLE_CHUNK_ELEMENTS`` each are alive at once.

Left-padded prompts get the positions ``generate`` gives them (the attention mask's
cumulative sum), a finished sequence is fed ``pad_id`` until every one is done, and the
loop stops there or at ``max_new_tokens``: greedy decoding returns what ``generate`` does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

# elements of one [rows, V] temporary while sampling (4 MiB in float32): 10 rows at a 100k
# vocabulary; a small vocabulary takes the whole batch at once rather than many small calls
SAMPLE_CHUNK_ELEMENTS = 1 << 20


@dataclass
class Decoded:
    """``[n, T]`` each: the tokens (``pad_id`` after a sequence's EOS), the log-prob of each
    under the distribution it was drawn from, and that distribution's entropy (nats)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor


def sample_rows(logits: torch.Tensor, temperature: float, rows: int | None = None):
    """One decoding step from ``[n, V]`` logits: ``(tokens, logprobs, entropy)``, each ``[n]``.

    A token is drawn from ``softmax(logits / temperature)`` (``torch.multinomial``, from the
    global generator); temperature 0 takes the argmax and reports under ``softmax(logits)``.
    The rows are processed ``rows`` at a time (default: as many as fit
    ``SAMPLE_CHUNK_ELEMENTS``), in float32."""
    rows = rows or max(1, SAMPLE_CHUNK_ELEMENTS // logits.size(-1))
    tokens, logprobs, entropy = [], [], []
    for chunk in logits.split(rows):
        scores = chunk.float()
        if temperature not in (0, 1):
            scores = scores / temperature  # a new [rows, V]: the model's logits stay as they were
        logp = torch.log_softmax(scores, -1)
        probs = logp.exp()
        tok = scores.argmax(-1) if temperature == 0 else torch.multinomial(probs, 1).squeeze(-1)
        entropy.append(-(probs * logp).sum(-1))
        logprobs.append(logp.gather(-1, tok[:, None]).squeeze(-1))
        tokens.append(tok)
    return torch.cat(tokens), torch.cat(logprobs), torch.cat(entropy)


def _cache_keyword(model) -> str:
    """The forward argument that takes the KV cache: transformers renamed ``past_key_values``
    to ``cache`` in 5.x (the old name is deprecated there, not yet removed)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float,
           max_new_tokens: int, eos_id: int, pad_id: int) -> Decoded:
    """Up to ``max_new_tokens`` tokens after each left-padded row of ``input_ids`` (on the
    model's device), drawn with :func:`sample_rows`; stops once every row has sampled
    ``eos_id``."""
    from transformers import DynamicCache

    n = input_ids.size(0)
    cache = DynamicCache(config=model.config)
    cache_kw = _cache_keyword(model)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    feed, mask = input_ids, attention_mask
    unfinished = torch.ones(n, dtype=torch.bool, device=input_ids.device)
    tokens, logprobs, entropy = [], [], []
    for step in range(max_new_tokens):
        out = model(input_ids=feed, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_kw: cache})
        logits = out.logits[:, -1]
        del out  # the step's [n, 1, V] logits are now held by `logits` alone
        tok, lp, ent = sample_rows(logits, temperature)
        del logits  # gone before the next forward makes the next step's
        tok = torch.where(unfinished, tok, torch.full_like(tok, pad_id))
        tokens.append(tok)
        logprobs.append(lp)
        entropy.append(ent)
        unfinished &= tok != eos_id
        if not unfinished.any() or step == max_new_tokens - 1:
            break
        feed = tok[:, None]
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        positions = positions[:, -1:] + 1
    if not tokens:
        empty = torch.empty(n, 0)
        return Decoded(empty.long(), empty, empty)
    return Decoded(torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(entropy, 1))
