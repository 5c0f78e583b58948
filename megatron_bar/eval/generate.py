"""Greedy decoding for any ``input_ids -> logits`` model, batched with left padding.

Three kinds of model are accepted:

* :class:`megatron_bar.model.load.CausalLM` (``load_model``): called with a boolean
  ``[b, 1, s, s]`` mask (True = masked: the future and the left padding) and position
  ids that start at each row's first real token, so a padded row computes exactly what
  it computes alone.
* a Hugging Face causal LM (``transformers.PreTrainedModel``): called with its 2-D
  ``attention_mask`` and the same position ids; ``.logits`` is read.
* any other callable ``ids [b, s] -> logits [b, s, V]``: it cannot see a padding mask,
  so prompts are batched only with prompts of the same length (no padding at all).

A Hugging Face model decodes with its KV cache (:func:`_hf_cached_batch`): each step
runs one token per row. The other kinds run the whole sequence at every step (no cache
to get wrong, and the suites are short); for many prompts, evaluate a megatron model
through its transformers copy (:func:`megatron_bar.convert.to_transformers`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch


def _kind(model) -> str:
    from megatron_bar.model.load import CausalLM

    if isinstance(model, CausalLM):
        return "megatron"
    try:
        from transformers import PreTrainedModel

        if isinstance(model, PreTrainedModel):
            return "hf"
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return "plain"


def _device_of(model) -> torch.device:
    """Where the model's weights are (prompts are built on CPU and moved there)."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def _forward(model, kind: str, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Logits of the last position, [b, V]. ``real``: [b, s] bool, False on left padding."""
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    if kind == "plain":
        return model(ids)[:, -1]
    if kind == "hf":
        out = model(input_ids=ids, attention_mask=real.long(), position_ids=positions)
        return out.logits[:, -1]
    s = ids.size(1)
    causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).triu(1)  # True above the diagonal: the future
    # A real query never sees a pad key; a pad query sees only itself (a row with every
    # key masked would give NaN, and NaN * 0 in the next matmul is still NaN).
    pad_key = ~real[:, None, None, :]
    own = torch.eye(s, dtype=torch.bool, device=ids.device)[None, None]
    mask = causal[None, None] | (pad_key & ~own)
    return model(ids, attention_mask=mask, position_ids=positions)[:, -1]


@torch.no_grad()
def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    eos_id: int,
    pad_id: int = 0,
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy completions (without the prompt, cut after the first ``eos_id``, which is
    not included), in the order of ``prompts``."""
    kind = _kind(model)
    on = _device_of(model)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    if kind == "plain":  # batches of equal length only
        groups = defaultdict(list)
        for i in order:
            groups[len(prompts[i])].append(i)
        batches = [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
    else:
        batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    results: list[list[int]] = [[] for _ in prompts]
    if kind == "hf":
        for batch in batches:
            gen = _hf_cached_batch(model, [prompts[i] for i in batch], eos_id, pad_id, max_new_tokens, on)
            for row, i in enumerate(batch):
                tokens = gen[row]
                results[i] = tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
        return results
    for batch in batches:
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        real = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, i in enumerate(batch):
            p = list(prompts[i])
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            real[row, width - len(p):] = True
        # A row that has emitted EOS leaves the batch: short answers (most of a suite) stop
        # costing compute while long ones go on.
        gen = torch.full((len(batch), max_new_tokens), eos_id, dtype=torch.long)
        active = torch.arange(len(batch))
        ids, real = ids.to(on), real.to(on)
        for t in range(max_new_tokens):
            logits = _forward(model, kind, ids, real).float()
            nxt = logits.argmax(-1).cpu()
            gen[active, t] = nxt
            going = nxt != eos_id
            if not bool(going.any()):
                break
            active = active[going]
            keep = going.to(on)
            ids = torch.cat([ids[keep], nxt[going, None].to(on)], dim=1)
            real = torch.cat([real[keep], torch.ones(len(active), 1, dtype=torch.bool, device=on)], dim=1)
        gen = gen.tolist()
        for row, i in enumerate(batch):
            tokens = gen[row]
            results[i] = tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
    return results


def _hf_cached_batch(model, prompts: list[Sequence[int]], eos_id: int, pad_id: int, max_new_tokens: int,
                     on: torch.device) -> list[list[int]]:
    """Greedy decoding of one left-padded batch with the model's KV cache, by the rollout's
    own loop (:func:`megatron_bar.rl.decode.decode` at temperature 0): the same inputs,
    positions and masks as the uncached loop, one new token per row per step."""
    from megatron_bar.rl.decode import decode

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        real[row, width - len(p):] = 1
    out = decode(model, ids.to(on), real.to(on), temperature=0.0, max_new_tokens=max_new_tokens,
                 eos_id=eos_id, pad_id=pad_id)
    return out.tokens.tolist()
