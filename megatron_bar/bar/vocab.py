"""The vocabulary rows of special tokens a stage adds (tool-call markers): grown, or a
padded checkpoint's unused rows taken (:func:`mean_init_rows`).

The new rows of the embedding and of the LM head start as the mean of the existing rows
(the usual choice: the new token starts "average" rather than random, so the first logits
for it are neither huge nor vanishing). Works at any TP size: the vocabulary-parallel
shards are gathered, grown, and re-split by the new padded size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bar.model.config import ModelConfig

VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _gather_rows(shard: torch.Tensor) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return shard.detach().clone()
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts)


def grown_vocab_rows(full_old: torch.Tensor, old_vocab: int, new_vocab: int, new_padded: int):
    """The full new matrix: old rows, then mean rows for the added tokens, then zero padding."""
    hidden = full_old.size(1)
    new = full_old.new_zeros(new_padded, hidden)
    new[:old_vocab] = full_old[:old_vocab]
    new[old_vocab:new_vocab] = full_old[:old_vocab].float().mean(0).to(full_old.dtype)
    return new


@torch.no_grad()
def copy_with_grown_vocab(old_model, old_cfg: ModelConfig, new_model, new_cfg: ModelConfig):
    """Copy every weight of ``old_model`` into ``new_model`` (this rank's shards), growing
    the vocabulary rows from ``old_cfg.vocab_size`` to ``new_cfg.vocab_size``."""
    if new_cfg.vocab_size < old_cfg.vocab_size:
        raise ValueError(f"vocabulary can only grow ({old_cfg.vocab_size} -> {new_cfg.vocab_size})")
    old_state = old_model.state_dict()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in new_model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        if name in VOCAB_PARAMS:
            full = grown_vocab_rows(
                _gather_rows(old_state[name]), old_cfg.vocab_size, new_cfg.vocab_size,
                new_cfg.padded_vocab_size,
            )
            rows = new_cfg.padded_vocab_size // tp
            param.copy_(full[rank * rows : (rank + 1) * rows])
        else:
            param.copy_(old_state[name])


@torch.no_grad()
def mean_init_rows(model, cfg: ModelConfig, first: int, stop: int) -> None:
    """Rows ``first .. stop - 1`` of the embedding and the LM head := the mean of rows
    ``0 .. first - 1`` (the tokens before them), on every TP rank's shard. For special
    tokens that take a padded checkpoint's unused rows, whose values were never trained."""
    if stop <= first:
        return
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = model.state_dict(keep_vars=True)
    for name in VOCAB_PARAMS:
        if name not in params:  # not on this pipeline stage
            continue
        param = params[name]
        full = _gather_rows(param)
        full[first:stop] = full[:first].float().mean(0).to(full.dtype)
        rows = cfg.padded_vocab_size // tp
        param.copy_(full[rank * rows : (rank + 1) * rows])
