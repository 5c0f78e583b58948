"""The vocabulary: the rows of special tokens a stage adds (tool-call markers), grown or
taken from a padded checkpoint's unused rows (:func:`mean_init_rows`), and merged across
domain experts (which input rows make each row of the merged embedding and LM head, and
the merged tokenizer).

The new rows of the embedding and of the LM head start as the mean of the existing rows
(the usual choice: the new token starts "average" rather than random, so the first logits
for it are neither huge nor vanishing). Works at any TP size: the vocabulary-parallel
shards are gathered, grown, and re-split by the new padded size.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bar.model.config import ConfigError, ModelConfig

VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
TOKENIZER_SUBDIR = "tokenizer"


class VocabMergeError(ConfigError):
    pass


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


# -- merging the vocabularies of domain experts -------------------------------------------
# (inputs: the merge's, with name, path, cfg, tokens, tokenizer, n_real, n_rows)


@dataclass
class VocabPlan:
    vocab_size: int
    padded: int
    # (start, end, indices of the inputs whose rows make it, kind): kind "token" (a real
    # token of each of them), "unused" (no input has a token there; rows they have), "zero"
    segments: list[tuple[int, int, list[int], str]]
    tokens: list | None  # merged id -> token, where tokenizers are known
    added: list[dict]  # ids not common to all inputs: {"id", "token", "from": [names]}


def plan_vocabulary(inputs: Sequence, pad_multiple: int, keep_rows_of: int | None = None) -> VocabPlan:
    """Which input rows make each row of the merged embedding / LM head.

    ``keep_rows_of``: index of an input (the base of an upgrade) whose rows are taken for
    every id it has a token for, the others contributing only ids it lacks.
    """
    with_tok = [i for i, inp in enumerate(inputs) if inp.tokens is not None]
    sizes = {inp.n_real for inp in inputs}
    if len(sizes) > 1 and len(with_tok) < len(inputs):
        bare = [inp.name for inp in inputs if inp.tokens is None]
        raise VocabMergeError(
            f"the vocabularies differ ({', '.join(f'{x.name}: {x.n_real}' for x in inputs)}) but "
            f"{', '.join(bare)} carry no tokenizer/ folder to tell which tokens were added"
        )
    merged: list | None = None
    owner: list[int] = []  # which input first defined each id
    if with_tok:
        merged = []
        for i in with_tok:
            inp = inputs[i]
            for tid, tok in enumerate(inp.tokens):
                if tid < len(merged):
                    if merged[tid] != tok:
                        other = inputs[owner[tid]]
                        raise VocabMergeError(
                            f"token id {tid} is {merged[tid]!r} in {other.name} but {tok!r} in "
                            f"{inp.name}: the experts added different tokens at the same id "
                            f"(or come from different tokenizers); add them in one agreed order"
                        )
                else:
                    merged.append(tok)
                    owner.append(i)
    vocab = max(inp.cfg.vocab_size for inp in inputs)
    if merged is not None and len(merged) > vocab:
        raise VocabMergeError(f"the merged tokenizer has {len(merged)} tokens, more than the {vocab} vocabulary rows")
    padded = int(math.ceil(vocab / pad_multiple) * pad_multiple)
    bounds = {0, padded}
    for inp in inputs:
        bounds.update({min(inp.n_real, padded), min(inp.n_rows, padded)})
    bounds = sorted(bounds)
    segments = []
    for a, b in zip(bounds, bounds[1:]):
        has_token = [i for i, inp in enumerate(inputs) if b <= inp.n_real]
        if keep_rows_of is not None and keep_rows_of in has_token:
            has_token = [keep_rows_of]
        if has_token:
            segments.append((a, b, has_token, "token"))
            continue
        has_row = [i for i, inp in enumerate(inputs) if b <= inp.n_rows]
        if keep_rows_of is not None and keep_rows_of in has_row:
            has_row = [keep_rows_of]
        segments.append((a, b, has_row, "unused" if has_row else "zero"))
    common = min(inp.n_real for inp in inputs)
    added = []
    top = max(inp.n_real for inp in inputs)
    for tid in range(common, top):
        added.append({
            "id": tid,
            "token": merged[tid] if merged is not None and tid < len(merged) else None,
            "from": [inp.name for inp in inputs if tid < inp.n_real],
        })
    return VocabPlan(vocab, padded, segments, merged, added)


def merge_tokenizers(inputs: Sequence, plan: VocabPlan):
    """The merged tokenizer, built and checked before anything is written.

    Returns ``(write, info)``: ``write(dest)`` puts the tokenizer folder at ``dest`` (the
    folder of the input with the largest vocabulary, plus every token others added).
    """
    with_tok = [inp for inp in inputs if inp.tokenizer is not None]
    if not with_tok:
        first = next((inp for inp in inputs if (inp.path / TOKENIZER_SUBDIR).is_dir()), None)
        if first is None:
            return (lambda dest: None), None
        return (lambda dest: shutil.copytree(first.path / TOKENIZER_SUBDIR, dest)), {"from": first.name}
    from megatron_bar.data.tokenizer import load_tokenizer

    base = max(with_tok, key=lambda inp: len(inp.tokens))
    source = base.path / TOKENIZER_SUBDIR
    specials = []
    for inp in with_tok:
        for t in inp.tokenizer.special_tokens:
            if t not in specials:
                specials.append(t)
    if all(inp.tokens == base.tokens and inp.tokenizer.special_tokens == base.tokenizer.special_tokens
           for inp in with_tok):
        return (lambda dest: shutil.copytree(source, dest)), {"from": base.name, "added_special_tokens": []}
    tok = load_tokenizer(source)
    added = []
    have = set(tok.special_tokens)
    for tid in range(tok.vocab_size, len(plan.tokens)):  # ids beyond the base's, in order
        got = tok.add_special_tokens([plan.tokens[tid]])
        if got != [tid]:
            raise VocabMergeError(f"merging tokenizers: token {plan.tokens[tid]!r} got id {got[0]}, expected {tid}")
        added.append(plan.tokens[tid])
        have.add(plan.tokens[tid])
    for t in specials:  # tokens another input made special without a new id
        if t not in have:
            tid = tok.token_to_id(t)
            got = tok.add_special_tokens([t])
            if tid is not None and got != [tid]:
                raise VocabMergeError(f"merging tokenizers: special token {t!r} moved from id {tid} to {got[0]}")
            added.append(t)
    for tid, t in enumerate(plan.tokens):
        if tok.id_to_token(tid) != t:
            raise VocabMergeError(f"merging tokenizers: id {tid} is {tok.id_to_token(tid)!r}, expected {t!r}")

    def write(dest: Path):
        shutil.copytree(source, dest)  # files the tokenizer does not write itself
        tok.save(dest)

    return write, {"from": base.name, "added_special_tokens": added}
