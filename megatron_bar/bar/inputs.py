"""The checkpoints a merge reads, opened and checked before anything is written: the same
architecture, every tensor its config implies (shape, dtype), domain experts with 2
experts, and the anchor expert bit-identical in all (:func:`check_anchor`)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from megatron_bar.bar.merge_io import CheckpointReader, expected_tensors
from megatron_bar.bar.roles import role_of
from megatron_bar.bar.vocab import TOKENIZER_SUBDIR, VOCAB_PARAMS
from megatron_bar.model.config import ConfigError, ModelConfig
from megatron_bar.utils.tensors import BufferPool

ANCHOR = 0
# Fields that may differ between the checkpoints being merged: the merge decides them.
MERGE_FIELDS = ("num_experts", "moe_topk", "norm_topk_prob", "vocab_size")


class MergeError(ConfigError):
    pass


@dataclass
class Input:
    name: str
    reader: CheckpointReader
    weight: float = 1.0
    tokens: list | None = None  # id -> token string, from its tokenizer (None: no tokenizer)
    tokenizer: object = None
    model_keys: list = field(default_factory=list)  # the model's tensors (not optimizer state)
    ignored: int = 0  # other tensors in the checkpoint

    @property
    def cfg(self) -> ModelConfig:
        return self.reader.config

    @property
    def path(self) -> Path:
        return self.reader.dir

    @property
    def n_real(self) -> int:
        """Ids that are tokens of this input (its tokenizer's, else the model's vocabulary)."""
        return len(self.tokens) if self.tokens is not None else self.cfg.vocab_size

    @property
    def n_rows(self) -> int:
        return self.cfg.padded_vocab_size


def open_input(name: str, path: Path) -> Input:
    if not Path(path).is_dir():
        raise MergeError(f"{name}: {path} is not a checkpoint folder")
    inp = Input(name, CheckpointReader(path))
    tok_dir = Path(path) / TOKENIZER_SUBDIR
    if tok_dir.is_dir():
        from megatron_bar.data.tokenizer import HF_TOKENIZER_FILE, SIDECAR_FILE, SPM_MODEL_FILE, load_tokenizer

        if any((tok_dir / f).is_file() for f in (SIDECAR_FILE, HF_TOKENIZER_FILE, SPM_MODEL_FILE)):
            try:
                tok = load_tokenizer(tok_dir)
            except (ValueError, OSError) as e:
                raise MergeError(f"{name}: cannot read the tokenizer in {tok_dir}: {e}") from None
            inp.tokenizer = tok
            inp.tokens = [tok.id_to_token(i) for i in range(tok.vocab_size)]
            if len(inp.tokens) > inp.cfg.vocab_size:
                raise MergeError(
                    f"{name}: its tokenizer has {len(inp.tokens)} tokens but the model only "
                    f"{inp.cfg.vocab_size} vocabulary rows ({tok_dir})"
                )
    return inp


def _arch(cfg: ModelConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in MERGE_FIELDS}


def _check_same_architecture(ref: Input, others: Sequence[Input]) -> None:
    a = _arch(ref.cfg)
    for inp in others:
        b = _arch(inp.cfg)
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diff:
            desc = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in diff)
            raise MergeError(
                f"{inp.name} ({inp.path}) has another architecture than {ref.name} ({ref.path}): {desc}"
            )


def _check_tensors(inp: Input) -> None:
    """The checkpoint holds every tensor its model config implies, with its shape and dtype.

    Other tensors (the optimizer state of a training checkpoint) are ignored.
    """
    if "embedding.word_embeddings.weight" not in inp.reader.tensors:
        raise MergeError(f"{inp.name}: {inp.path} holds no embedding - not a model checkpoint")
    dtype = inp.reader.dtype("embedding.word_embeddings.weight")
    expected = expected_tensors(inp.cfg, dtype)
    have = inp.reader.tensors
    missing = [k for k in expected if k not in have]
    if missing:
        raise MergeError(f"{inp.name}: {inp.path} lacks tensor {missing[0]!r} ({len(missing)} missing) - "
                         f"is it a complete checkpoint of the model in its model_config.json?")
    for k, (shape, dt) in expected.items():
        if inp.reader.shape(k) != shape:
            raise MergeError(
                f"{inp.name}: tensor {k!r} in {inp.path} has shape {list(inp.reader.shape(k))}, "
                f"its model config implies {list(shape)}"
            )
        if inp.reader.dtype(k) != dt:
            raise MergeError(f"{inp.name}: tensor {k!r} in {inp.path} is {inp.reader.dtype(k)}, the rest {dt}")
    inp.model_keys = sorted(expected)
    inp.ignored = len(have) - len(expected)


def _check_same_dtypes(ref: Input, others: Sequence[Input]) -> None:
    for inp in others:
        a, b = ref.reader.dtype(VOCAB_PARAMS[0]), inp.reader.dtype(VOCAB_PARAMS[0])
        if a != b:
            raise MergeError(f"{inp.name} stores {b} tensors, {ref.name} {a}: convert one of them first")


def _expert_keys(keys) -> list[str]:
    return [k for k in keys if role_of(k).group == "expert"]


def check_anchor(ref: Input, others: Sequence[Input]) -> None:
    """Expert 0 (the anchor) of each of ``others`` equals that of ``ref``, bit for bit (else
    a MergeError naming the first such input, its tensor, the layer and the largest
    difference). Each stored chunk of ``ref``'s anchor is read once, and compared with the
    same box of every other input; two chunks at a time, on two threads."""
    pool = BufferPool()

    def differences(key: str, box) -> list[tuple[int, float]]:  # (input, max |difference|) where it differs
        dtype, out = ref.reader.dtype(key), []
        a, b = ref.reader.read(key, *box, out=pool.take(box[1], dtype)), pool.take(box[1], dtype)
        for i, inp in enumerate(others):
            if not torch.equal(a, inp.reader.read(key, *box, out=b)):
                out.append((i, (a.float() - b.float()).abs().max().item()))
        pool.give(a, b)
        return out

    # [layers, experts, ...]: the anchor's chunks are those at expert 0
    boxes = [(key, box) for key in _expert_keys(ref.model_keys) for box in ref.reader.chunks(key)
             if box[0][1] == ANCHOR]
    found: dict[tuple[int, str], tuple[float, int]] = {}  # (input, tensor) -> (max |difference|, layer)
    with ThreadPoolExecutor(2, thread_name_prefix="anchor-check") as threads:
        for (key, box), diffs in zip(boxes, threads.map(lambda kb: differences(*kb), boxes)):
            for i, d in diffs:
                worst = found.get((i, key))
                if worst is None or d > worst[0] or math.isnan(d):
                    found[i, key] = (d, box[0][0])
    if found:
        i, key = min(found)
        inp, (worst, layer) = others[i], found[i, key]
        raise MergeError(
            f"the anchor expert of {inp.name} ({inp.path}) differs from that of {ref.name}: "
            f"tensor {key!r} (layer {layer}, expert 0) max |difference| {worst:.3g}. Every "
            f"expert must start from the same base and keep expert 0 frozen."
        )


def check_inputs(ref: Input, inputs: Sequence[Input], domains: Sequence[Input]) -> None:
    for inp in domains:
        if inp.cfg.num_experts != 2:
            raise MergeError(f"{inp.name}: {inp.path} has {inp.cfg.num_experts or 'no'} experts; a domain "
                             f"expert is the 2-expert model that tools/upcycle.py makes (anchor + expert)")
    others = [inp for inp in inputs if inp is not ref]
    _check_same_architecture(ref, others)
    for inp in inputs:
        _check_tensors(inp)
    _check_same_dtypes(ref, others)
