"""BAR stage 2: compose domain experts into one MoE, and upgrade it one expert at a time.

Each domain ends stage 1 with a 2-expert checkpoint (expert 0 = the frozen anchor, expert 1
= the domain's expert) whose shared parameters - embeddings, attention, norms, LM head -
drifted apart where its stages unfroze them. :func:`merge_experts` builds the
(N+1)-expert model:

* expert 0 is the anchor, which must be bit-identical in every input (it is the common
  base; a difference means another base or a broken freeze);
* expert ``j`` is input ``j``'s expert 1, bit for bit;
* shared parameters are the weighted mean of the inputs (uniform by default), computed in
  fp32 and rounded once; a block where all inputs agree is copied, not recomputed;
* router rows: row 0 (the anchor's) is averaged like a shared parameter, row ``j`` is input
  ``j``'s row 1;
* vocabularies that grew in some inputs are merged: each row of the embedding and the LM
  head comes from the inputs for which that id is a real token (their mean), so the rows of
  a token that one expert added come from that expert; an id that means different tokens in
  two inputs is an error; the merged tokenizer carries every added token.

:func:`upgrade` changes a merged checkpoint: ``replace`` swaps the expert of a name for a
new domain checkpoint's expert 1, ``add`` appends one (the router grows a row). Every other
expert, the router's other rows and the shared parameters are copied bit for bit (the new
expert's own added tokens excepted); the divergence report says how far the new expert's
shared parameters are from the ones it will run with.

Everything streams: inputs are read a block at a time (:mod:`merge_io`) and the output is
written chunk by chunk through megatron's own dist-checkpoint save of a meta-device model
(a chunk taken over unchanged, like an expert, is copied as its stored archive), so memory
does not grow with the model or with the number of experts. Nothing is written
until every check has passed, and the output folder appears only when complete, with
``bar_manifest.json`` (experts, sources, content hashes, averaging, divergence report).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from megatron_bar.bar.merge_io import (
    Buffers,
    ChunkRing,
    ChunkSource,
    CheckpointReader,
    expected_tensors,
    local_slices,
    row_blocks,
    write_checkpoint,
)
from megatron_bar.model.config import ConfigError, ModelConfig
from megatron_bar.utils.fs import atomic_output_dir, check_output_free

log = logging.getLogger(__name__)

MANIFEST_FILE = "bar_manifest.json"
MANIFEST_FORMAT = "megatron_bar.bar_manifest/1"
TOKENIZER_SUBDIR = "tokenizer"
ANCHOR = 0
BASE_NAME = "(base)"  # the base of an upgrade, in reports (not a valid expert name)
DOMAIN_EXPERT = 1  # a domain checkpoint's own expert
# Fields that may differ between the checkpoints being merged: the merge decides them.
MERGE_FIELDS = ("num_experts", "moe_topk", "norm_topk_prob", "vocab_size")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


class MergeError(ConfigError):
    pass


# -- command-line values ------------------------------------------------------------------


def parse_named_dirs(values: Sequence[str], what: str = "--experts") -> list[tuple[str, Path]]:
    """``["math=DIR", ...]`` -> ``[("math", Path(DIR)), ...]``; names unique and simple."""
    out: list[tuple[str, Path]] = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise MergeError(f"{what}: expected NAME=DIR, got {v!r}")
        if not _NAME.match(name):
            raise MergeError(f"{what}: expert name {name!r} must be letters, digits, '_', '.', '-'")
        if any(name == n for n, _ in out):
            raise MergeError(f"{what}: expert name {name!r} is given twice")
        out.append((name, Path(path)))
    return out


def parse_weights(text: str | None) -> dict[str, float] | None:
    """``"math=0.3,code=0.7"`` -> ``{"math": 0.3, "code": 0.7}``."""
    if not text:
        return None
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise MergeError(f"--weights: expected NAME=NUMBER, got {part!r}")
        if name in weights:
            raise MergeError(f"--weights: {name!r} is given twice")
        try:
            w = float(value)
        except ValueError:
            raise MergeError(f"--weights: {value!r} (for {name!r}) is not a number") from None
        if not (w >= 0 and math.isfinite(w)):
            raise MergeError(f"--weights: the weight of {name!r} must be a finite number >= 0, got {value}")
        weights[name] = w
    return weights


# -- inputs -------------------------------------------------------------------------------


@dataclass
class _Input:
    name: str
    reader: CheckpointReader
    weight: float = 1.0
    tokens: list | None = None  # id -> token string, from its tokenizer (None: no tokenizer)
    tokenizer: object = None
    model_keys: list = field(default_factory=list)  # the model's tensors (not optimizer state)
    ignored: int = 0  # other tensors in the checkpoint
    anchor_of: "_Input | None" = None  # the input whose anchor this one's was found equal to
    _hash: str | None = None

    def content_hash(self) -> str:
        if self._hash is None:
            if self.anchor_of is not None:
                # its anchor's bytes are the reference's (compared bit for bit): their
                # digests are taken from the reference's, not hashed a second time
                self.anchor_of.content_hash()
                for key in _expert_keys(self.model_keys):
                    self.reader.adopt_hashes(key, self.anchor_of.reader, _anchor_box)
            self._hash = self.reader.content_hash(self.model_keys)
        return self._hash

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


def _open_input(name: str, path: Path) -> _Input:
    if not Path(path).is_dir():
        raise MergeError(f"{name}: {path} is not a checkpoint folder")
    inp = _Input(name, CheckpointReader(path))
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


def _check_same_architecture(ref: _Input, others: Sequence[_Input]) -> None:
    a = _arch(ref.cfg)
    for inp in others:
        b = _arch(inp.cfg)
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diff:
            desc = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in diff)
            raise MergeError(
                f"{inp.name} ({inp.path}) has another architecture than {ref.name} ({ref.path}): {desc}"
            )


def _check_tensors(inp: _Input) -> None:
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


def _check_same_dtypes(ref: _Input, others: Sequence[_Input]) -> None:
    for inp in others:
        a, b = ref.reader.dtype(_VOCAB_KEYS[0]), inp.reader.dtype(_VOCAB_KEYS[0])
        if a != b:
            raise MergeError(f"{inp.name} stores {b} tensors, {ref.name} {a}: convert one of them first")


def _expert_keys(keys) -> list[str]:
    return [k for k in keys if ".mlp.experts." in k]


def _anchor_box(offsets, sizes) -> bool:
    """A stored box of an expert tensor ([layers, experts, ...]) within expert 0."""
    return offsets[1] == ANCHOR and sizes[1] == 1


def _memcmp():
    import ctypes

    try:
        f = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):
        return None
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return f


_MEMCMP = _memcmp()


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal(a, b)``, fast when they are equal (torch's elementwise compare of a
    4 MB bf16 block costs ~5 ms; when they differ it stops early and is cheap anyway).

    Same bytes mean equal values unless a value is NaN (NaN != NaN); a sum that is not
    NaN proves there is none. Anything else is torch.equal's to decide."""
    if (_MEMCMP is not None and a.dtype == b.dtype and a.shape == b.shape and a.device.type == "cpu"
            and b.device.type == "cpu" and a.is_contiguous() and b.is_contiguous() and a.numel()
            and not a.is_complex()):
        if _MEMCMP(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0:
            if not a.is_floating_point() or not math.isnan(float(a.sum())):
                return True
    return torch.equal(a, b)


def _check_anchor(ref: _Input, inp: _Input, buffers: Buffers, keys: Sequence[str],
                  stop: Callable[[], bool] = lambda: False) -> bool:
    """Expert 0 (the anchor) of ``inp`` equals that of ``ref``, bit for bit, in the expert
    tensors ``keys`` (else a MergeError). ``stop()`` true: give up (returns False)."""
    r0, r1 = ref.reader, inp.reader
    for key in keys:
        shape = r1.shape(key)  # [layers, experts, ...]
        dtype = r1.dtype(key)
        itemsize = torch.empty((), dtype=dtype).element_size()
        worst, where = 0.0, None
        for layer in range(shape[0]):
            off = (layer, ANCHOR) + (0,) * (len(shape) - 2)
            sz = (1, 1) + shape[2:]
            for _, (boff, bsz) in row_blocks(off, sz, itemsize):
                if stop():
                    return False
                # on the file mappings where the box is one stored run (no copy), else read
                a = r1.view(key, boff, bsz, hash=False)
                if a is None:
                    a = r1.read(key, boff, bsz, out=buffers.get("anchor-a", bsz, dtype), hash=False)
                b = r0.view(key, boff, bsz, hash=False)
                if b is None:
                    b = r0.read(key, boff, bsz, out=buffers.get("anchor-b", bsz, dtype), hash=False)
                if not _equal(a, b):
                    d = (a.float() - b.float()).abs().max().item()
                    if where is None or d > worst or math.isnan(d):
                        worst, where = d, layer
        if where is not None:
            raise MergeError(
                f"the anchor expert of {inp.name} ({inp.path}) differs from that of {ref.name}: "
                f"tensor {key!r} (layer {where}, expert 0) max |difference| {worst:.3g}. Every "
                f"expert must start from the same base and keep expert 0 frozen."
            )
    # identical bytes: its content hash takes their digests from the reference's. (The
    # check itself hashes nothing: it runs on a thread of its own, see _AnchorCheck.)
    inp.anchor_of = ref
    return True


class _AnchorCheck:
    """:func:`_check_anchor` of each of ``others`` against ``ref``, on a thread of its own.

    Started as soon as the inputs' architecture is known to agree: comparing the anchors is
    page mapping and memcmp (the GIL released), so it runs beside the main thread's Python
    (the tensor lists, the meta model, the vocabulary and save plans) instead of before the
    writing. :meth:`verdict` is taken where the check used to run - before anything is
    written - and raises what the check raised. It checks the expert tensors the inputs
    share by name and shape; the verdict checks on the main thread any expert tensor of the
    model's list that the thread did not (a checkpoint whose tensor list is odd)."""

    def __init__(self, ref: _Input, others: Sequence[_Input]):
        self.ref, self.others = ref, list(others)
        self.checked: dict[str, list[str]] = {}
        self.error: BaseException | None = None
        self._stop = False  # the merge failed before the verdict: the check is not needed
        self.thread = threading.Thread(target=self._run, name="merge-anchor-check", daemon=True)
        self.thread.start()

    def _keys(self, inp: _Input) -> list[str]:
        r0, r1 = self.ref.reader, inp.reader
        def per_expert(shape):  # [layers, experts, ...] less the number of experts
            return shape[:1] + shape[2:]

        # (sorted as the model's tensor list is: a failing tensor is the one the check on
        # the main thread would have named first)
        return [k for k in _expert_keys(sorted(r1.keys()))
                if k.startswith("decoder.") and k in r0.tensors and len(r1.shape(k)) > 2
                and per_expert(r0.shape(k)) == per_expert(r1.shape(k)) and r0.dtype(k) == r1.dtype(k)]

    def _run(self) -> None:
        buffers = Buffers()
        try:
            for inp in self.others:
                keys = self._keys(inp)
                if not _check_anchor(self.ref, inp, buffers, keys, lambda: self._stop):
                    return
                self.checked[inp.name] = keys
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by verdict()
            self.error = e

    def stop(self) -> None:
        """Give up (the merge ends without a verdict) and wait: the inputs are closed next."""
        self._stop = True
        self.join()

    def join(self) -> None:
        self.thread.join()

    def verdict(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error
        buffers = Buffers()
        for inp in self.others:
            rest = [k for k in _expert_keys(inp.model_keys) if k not in self.checked.get(inp.name, ())]
            if rest:
                _check_anchor(self.ref, inp, buffers, rest)


# -- vocabulary ---------------------------------------------------------------------------


@dataclass
class _VocabPlan:
    vocab_size: int
    padded: int
    # (start, end, indices of the inputs whose rows make it, kind): kind "token" (a real
    # token of each of them), "unused" (no input has a token there; rows they have), "zero"
    segments: list[tuple[int, int, list[int], str]]
    tokens: list | None  # merged id -> token, where tokenizers are known
    added: list[dict]  # ids not common to all inputs: {"id", "token", "from": [names]}


def _plan_vocabulary(inputs: Sequence[_Input], pad_multiple: int, keep_rows_of: int | None = None) -> _VocabPlan:
    """Which input rows make each row of the merged embedding / LM head.

    ``keep_rows_of``: index of an input (the base of an upgrade) whose rows are taken for
    every id it has a token for, the others contributing only ids it lacks.
    """
    with_tok = [i for i, inp in enumerate(inputs) if inp.tokens is not None]
    sizes = {inp.n_real for inp in inputs}
    if len(sizes) > 1 and len(with_tok) < len(inputs):
        bare = [inp.name for inp in inputs if inp.tokens is None]
        raise MergeError(
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
                        raise MergeError(
                            f"token id {tid} is {merged[tid]!r} in {other.name} but {tok!r} in "
                            f"{inp.name}: the experts added different tokens at the same id "
                            f"(or come from different tokenizers); add them in one agreed order"
                        )
                else:
                    merged.append(tok)
                    owner.append(i)
    vocab = max(inp.cfg.vocab_size for inp in inputs)
    if merged is not None and len(merged) > vocab:
        raise MergeError(f"the merged tokenizer has {len(merged)} tokens, more than the {vocab} vocabulary rows")
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
    return _VocabPlan(vocab, padded, segments, merged, added)


def _merge_tokenizers(inputs: Sequence[_Input], plan: _VocabPlan):
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
            raise MergeError(f"merging tokenizers: token {plan.tokens[tid]!r} got id {got[0]}, expected {tid}")
        added.append(plan.tokens[tid])
        have.add(plan.tokens[tid])
    for t in specials:  # tokens another input made special without a new id
        if t not in have:
            tid = tok.token_to_id(t)
            got = tok.add_special_tokens([t])
            if tid is not None and got != [tid]:
                raise MergeError(f"merging tokenizers: special token {t!r} moved from id {tid} to {got[0]}")
            added.append(t)
    for tid, t in enumerate(plan.tokens):
        if tok.id_to_token(tid) != t:
            raise MergeError(f"merging tokenizers: id {tid} is {tok.id_to_token(tid)!r}, expected {t!r}")

    def write(dest: Path):
        shutil.copytree(source, dest)  # files the tokenizer does not write itself
        tok.save(dest)

    return write, {"from": base.name, "added_special_tokens": added}


# -- what each output tensor is made of ---------------------------------------------------


@dataclass
class _Ref:
    """A box of one input tensor; ``axis``/``index`` redirect an expert / router row."""

    inp: int
    axis: int | None = None
    index: int | None = None

    def box(self, off, sz):
        if self.axis is None:
            return off, sz
        off = list(off)
        off[self.axis] = self.index
        return tuple(off), sz


@dataclass
class _GroupStats:
    tensors: set = field(default_factory=set)
    params: int = 0
    averaged_params: int = 0
    max_abs: dict = field(default_factory=dict)  # input name -> max |x - merged|
    # (where, input name, sum of squared distances, sum of squared merged values) per box:
    # summed in the order of "where" (key, offsets), so that the report does not depend
    # on the order in which threads computed the boxes
    sums: list = field(default_factory=list)

    def as_dict(self) -> dict:
        sq_dist, sq_norm = {}, {}
        for _, name, d2, m2 in sorted(self.sums, key=lambda p: (p[0], p[1])):
            sq_dist[name] = sq_dist.get(name, 0.0) + d2
            sq_norm[name] = sq_norm.get(name, 0.0) + m2
        rel = {n: (math.sqrt(sq_dist[n] / sq_norm[n]) if sq_norm[n] > 0 else
                   (0.0 if sq_dist[n] == 0 else math.inf)) for n in sq_dist}
        return {
            "tensors": len(self.tensors),
            "params": self.params,
            "averaged_params": self.averaged_params,
            "max_abs_diff": max(self.max_abs.values(), default=0.0),
            "max_abs_from_merged": dict(self.max_abs),
            "rel_l2_from_merged": rel,
        }


def _group_of(key: str) -> str:
    if key == "embedding.word_embeddings.weight":
        return "embeddings"
    if key == "output_layer.weight":
        return "lm head"
    if key.endswith("router.weight"):
        return "router (anchor row)"
    if "norm" in key:
        return "norms"
    if ".self_attention." in key:
        return "attention"
    return "other"


# Elements of the fp32 pieces the mean and the statistics work on (2 MiB per fp32 buffer:
# a worker's buffers stay in the CPU cache).
_PIECE = 1 << 19
# Up to this many inputs, each input's fp32 piece is kept between the mean and its distance.
_KEEP_INPUTS = 8


class _Composer(ChunkSource):
    """Computes any box of any output tensor from the inputs, a block at a time.

    Memory: a ring of 1.5 times the largest output chunk (:class:`ChunkRing`: the chunks
    computed ahead of the writer - the first while the inputs are checked), one block per input
    (a read-only mapping of its file where it is one stored run, else a buffer) and two
    fp32 pieces for each of the two threads of the mean - whatever the model size; the
    per-input blocks (4 MiB each) are all that grows with the number of experts.
    """

    def __init__(self, inputs: Sequence[_Input], out_dtypes: dict, dry_run: bool = False):
        self.inputs = inputs
        self.out_dtypes = out_dtypes
        self.dry_run = dry_run
        self.rules: dict[str, Callable] = {}
        self.stats: dict[str, _GroupStats] = {}
        self.tensor_status: dict[str, str] = {}
        self.out_shapes: dict = {}
        self.buffers = Buffers()
        self.ring = ChunkRing()  # the output chunks computed ahead of the writer
        self._prefetch = None  # ((key, offsets, sizes), future) of a chunk computed ahead
        # The chunk computed ahead runs beside the writer's compute thread: its statistics
        # go to its own sink (a thread-local override of stats / tensor_status) and are
        # merged when the writer takes the chunk. The lock guards what both threads touch:
        # the statistics and the creation of the helper pool.
        self._sink = threading.local()
        self._lock = threading.Lock()
        self._helper = None  # the second thread of the mean (see _mean)

    # (ChunkSource) fill may run ahead of the writer: the ring bounds it
    computes_ahead = True

    @property
    def first(self) -> tuple | None:
        """(ChunkSource) ``(key, offsets, sizes)`` of the chunk being computed ahead."""
        return self._prefetch[0] if self._prefetch is not None else None

    def prefetch(self, key: str, offsets, sizes) -> None:
        """Start computing output chunk ``(offsets, sizes)`` of ``key`` on a thread now, in
        the ring: the largest computed chunk is computed while the inputs are checked and
        the save is planned. Nothing is written; :meth:`fill` of that chunk returns it
        (:meth:`drop_prefetch` gives it back unused)."""
        from concurrent.futures import Future

        ident = (key, tuple(offsets), tuple(sizes))
        fut: Future = Future()

        def job():
            self._sink.stats, self._sink.status = {}, {}  # the chunk's own, merged when it is used
            try:
                out = self.ring.take(ident[2], self.out_dtypes[key])
                self._produce(key, ident[1], ident[2], out)
                fut.set_result((out, self._sink.stats, self._sink.status))
            except BaseException as e:
                fut.set_exception(e)

        self._prefetch = (ident, fut)
        threading.Thread(target=job, name="merge-prefetch", daemon=True).start()

    def drop_prefetch(self) -> None:
        """Wait for a chunk being computed ahead, and drop it (errors included)."""
        pre, self._prefetch = self._prefetch, None
        if pre is not None and pre[1].exception() is None:
            self.ring.give(pre[1].result()[0])

    drop_first = drop_prefetch  # (ChunkSource) the chunk computed ahead is not in the plan

    def release(self, chunk: torch.Tensor) -> None:
        """(ChunkSource) The writer is done with a chunk :meth:`fill` returned: its memory
        is free."""
        self.ring.give(chunk)

    def stop(self) -> None:
        """(ChunkSource) The writer has stopped: a :meth:`fill` waiting for memory fails."""
        self.ring.close()

    def close(self) -> None:
        """Drop a chunk computed ahead and stop the helper thread."""
        self.drop_prefetch()
        if self._helper is not None:
            self._helper.shutdown()
            self._helper = None

    def _take_prefetch(self, ident):
        """The chunk computed ahead if it is ``ident`` (waits for it), else None."""
        pre = self._prefetch
        if pre is None or pre[0] != ident:
            return None
        self._prefetch = None
        out, stats, status = pre[1].result()
        with self._lock:
            self._merge_stats(stats, status)
        return out

    def _merge_stats(self, stats, status) -> None:
        for group, s in stats.items():
            st = self.stats.setdefault(group, _GroupStats())
            st.tensors |= s.tensors
            st.params += s.params
            st.averaged_params += s.averaged_params
            st.sums += s.sums
            for name, v in s.max_abs.items():
                st.max_abs[name] = max(st.max_abs.get(name, 0.0), v)
        for k, v in status.items():
            if v == "averaged":
                self.tensor_status[k] = v
            else:
                self.tensor_status.setdefault(k, v)

    def prefetch_candidate(self) -> tuple | None:
        """The largest output chunk that is computed (not a stored copy) and that megatron
        saves whole - as the first input stores it: ``(key, offsets, sizes)``, or None."""
        best, best_bytes = None, 0
        reader = self.inputs[0].reader
        for key, (shape, dtype) in self.out_shapes.items():
            if ".mlp.experts." in key or key not in reader.tensors:
                continue
            chunks = reader.stored_chunks(key)
            if len(chunks) != 1 or chunks[0] != ((0,) * len(chunks[0][1]), reader.shape(key)):
                continue
            box = ((0,) * len(shape), tuple(shape))
            if len(shape) != len(reader.shape(key)) or self.stored(key, *box) is not None:
                continue
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if nbytes > best_bytes:
                best, best_bytes = (key, *box), nbytes
        return best

    # rules: key -> split(offsets, sizes) -> [(offsets, sizes, kind, payload)], kind one of
    # "copy" (payload _Ref), "mean" (payload (values [(ref, weight)], reported [(name, ref)])),
    # "zero".

    def fill(self, key: str, offsets, sizes):
        """The output chunk ``(offsets, sizes)`` of ``key``, in memory of :attr:`ring`
        until :meth:`release` (waits for room there). Safe beside the thread that hands
        over the chunk computed ahead (:meth:`prefetch`).

        A chunk that is a stored input chunk as it is (an expert) comes back as that
        input's stored archive, for the writer to copy without reading it here."""
        blob = self.stored(key, offsets, sizes)
        if blob is not None:
            return blob
        if self._prefetch is not None:
            out = self._take_prefetch((key, tuple(offsets), tuple(sizes)))
            if out is not None:
                return out
        out = self.ring.take(tuple(sizes), self.out_dtypes[key])
        self._produce(key, tuple(offsets), tuple(sizes), out)
        return out

    def stored(self, key: str, offsets, sizes):
        """The stored input archive that is output chunk ``(offsets, sizes)`` of ``key`` as
        it is (an expert), else None. Computes nothing; safe beside :meth:`fill`."""
        parts = self.rules[key](tuple(offsets), tuple(sizes))
        if len(parts) == 1 and parts[0][2] == "copy":
            ref = parts[0][3]
            reader = self.inputs[ref.inp].reader
            if reader.dtype(key) == self.out_dtypes[key]:
                return reader.stored_blob(key, *ref.box(tuple(offsets), tuple(sizes)))
        return None

    def survey(self, key: str, offsets, sizes) -> None:
        """Compute a box for its statistics only (dry run): nothing is kept or copied."""
        self._produce(key, tuple(offsets), tuple(sizes), None)

    def _produce(self, key, offsets, sizes, out):
        dtype = self.out_dtypes[key]
        itemsize = torch.empty((), dtype=dtype).element_size()
        for _, (boff, bsz) in row_blocks(offsets, sizes, itemsize):
            dst = out[local_slices(offsets, boff, bsz)] if out is not None else None
            for soff, ssz, kind, payload in self.rules[key](boff, bsz):
                if kind == "copy" and dst is None:
                    continue
                if dst is not None:
                    d = dst[local_slices(boff, soff, ssz)]
                else:
                    d = self.buffers.get("scratch", ssz, dtype)
                if kind == "copy":
                    self._read(payload, key, soff, ssz, d)
                elif kind == "zero":
                    d.zero_()
                else:
                    self._mean(key, soff, ssz, d, *payload)

    def _read(self, ref: _Ref, key, off, sz, out):
        src_off, src_sz = ref.box(off, sz)
        reader = self.inputs[ref.inp].reader
        if out.is_contiguous() and out.dtype == reader.dtype(key):
            reader.read(key, src_off, src_sz, out=out.view(src_sz))
        else:
            out.copy_(reader.read(key, src_off, src_sz).view(out.shape))
        return out

    def _mean(self, key, off, sz, dst, values, reported):
        group = _group_of(key)
        stats = getattr(self._sink, "stats", self.stats)
        status = getattr(self._sink, "status", self.tensor_status)
        me = threading.get_ident()  # (the chunk computed ahead and the writer's run at once)
        n = dst.numel()
        refs = {}
        for ref, _ in values:
            refs[id(ref)] = ref
        for _, ref in reported:
            refs[id(ref)] = ref
        xs = {}
        for j, (rid, ref) in enumerate(refs.items()):
            # the inputs' bytes on their file mappings (read-only: never written to), or
            # read into a buffer where the box is not one stored run
            src_off, src_sz = ref.box(off, sz)
            x = self.inputs[ref.inp].reader.view(key, src_off, src_sz)
            if x is None:
                buf = self.buffers.get(("in", me, j), dst.shape, self.inputs[ref.inp].reader.dtype(key))
                x = self._read(ref, key, off, sz, buf)
            xs[rid] = x.view(dst.shape)
        first = xs[id(values[0][0])]
        same = [len(values) == 1 or _equal(first, xs[id(r)]) for r, _ in values[1:]]
        with self._lock:
            st = stats.setdefault(group, _GroupStats())
            st.tensors.add(key)
            st.params += n
            if all(same):
                status.setdefault(key, "copied")
            else:
                st.averaged_params += n
                status[key] = "averaged"
        if all(same):
            dst.copy_(first)
        if not n or (all(same) and not reported):
            return
        # The fp32 work goes in pieces that stay in the CPU cache (a 4 MiB bf16 block is
        # 8 MiB per fp32 buffer; the dozen passes over it below then run at memory speed).
        flat = dst.is_contiguous() and all(x.is_contiguous() for x in xs.values())
        step = _PIECE if flat else n
        value_ids = {id(r) for r, _ in values}
        total = sum(w for _, w in values)
        uniform = all(same)
        m = min(step, n)

        # Each input's piece is converted to fp32 once and kept for its distance (one
        # buffer per input and worker, a few MiB whatever the model: pieces are small); past
        # _KEEP_INPUTS inputs, one buffer is reused and each input converted twice.
        keep = len(xs) <= _KEEP_INPUTS
        # Two inputs that differ (the common merge of two domains, and any segment two
        # inputs share): both distances come from one difference - with a + b = 1,
        # x0 - (a x0 + b x1) = b (x0 - x1) and x1 - m = -a (x0 - x1) - which saves three
        # of the 13 passes over a piece. The mean is bit for bit the general path's; a
        # distance differs from the general path's (x minus the fp32-rounded mean) by
        # that rounding only (~1e-7 relative).
        pair = (not uniform and len(values) == 2 and keep
                and all(id(ref) in value_ids for _, ref in reported))
        if pair:
            (ref0, w0), (ref1, w1) = values
            other = {id(ref0): w1 / total, id(ref1): w0 / total}

        def work(pieces, worker):
            """The mean and the distances of ``pieces``; returns their statistics in order."""
            worker = me if worker == 0 else worker  # (0: the calling thread's own buffers)
            acc_buf = self.buffers.get(("f32", worker, "acc"), (m,), torch.float32)
            tmp_buf = self.buffers.get(("f32", worker, "tmp"), (m,), torch.float32)
            x_bufs = ({rid: self.buffers.get(("f32", worker, j), (m,), torch.float32)
                       for j, rid in enumerate(xs)} if keep else {})
            got = []
            for p0, p1 in pieces:
                if flat:
                    part = {rid: x.view(-1)[p0:p1] for rid, x in xs.items()}
                    d = dst.view(-1)[p0:p1]
                    acc, tmp = acc_buf[: p1 - p0], tmp_buf[: p1 - p0]
                    fx = {rid: b[: p1 - p0] for rid, b in x_bufs.items()}
                else:
                    part, d = xs, dst
                    acc, tmp = acc_buf.view(dst.shape), tmp_buf.view(dst.shape)
                    fx = {rid: b.view(dst.shape) for rid, b in x_bufs.items()}
                if pair:
                    # each input read once (from memory: the rest stays in the cache)
                    f0, f1 = fx[id(ref0)], fx[id(ref1)]
                    f0.copy_(part[id(ref0)])
                    f1.copy_(part[id(ref1)])
                    torch.mul(f0, w0 / total, out=acc)
                    torch.mul(f1, w1 / total, out=tmp)
                    acc.add_(tmp)
                    d.copy_(acc)
                    if not reported:
                        continue
                    sq_m = float(torch.linalg.vector_norm(acc)) ** 2
                    f0.sub_(f1)
                    d2 = float(torch.linalg.vector_norm(f0)) ** 2
                    lo, hi = torch.aminmax(f0)
                    dmax = max(-float(lo), float(hi))
                    got.append((sq_m, [(name, other[id(ref)] ** 2 * d2, other[id(ref)] * dmax)
                                       for name, ref in reported]))
                    continue
                done = set()  # inputs whose fp32 piece is in fx
                if uniform:
                    acc.copy_(part[id(values[0][0])])
                else:
                    # fp32, rounded once; the same operations as x.float() * w summed in order
                    # (torch.mul(f, s, out=acc) is acc.copy_(f); acc.mul_(s), bit for bit)
                    for i, (ref, w) in enumerate(values):
                        rid = id(ref)
                        if keep:
                            f = fx[rid]
                            f.copy_(part[rid])
                            done.add(rid)
                            torch.mul(f, w / total, out=acc if i == 0 else tmp)
                        else:
                            t = acc if i == 0 else tmp
                            t.copy_(part[rid])
                            t.mul_(w / total)
                        if i:
                            acc.add_(tmp)
                    d.copy_(acc)
                if not reported:
                    continue
                sq_m = float(torch.linalg.vector_norm(acc)) ** 2
                dists = []
                for name, ref in reported:
                    rid = id(ref)
                    if uniform and rid in value_ids:
                        dists.append((name, 0.0, 0.0))
                        continue
                    # x in fp32 (exact), then a same-dtype subtraction: a mixed bf16 - fp32
                    # op takes torch's slow casting path; the result is the same
                    if rid in done:
                        f = fx[rid]  # (each input is reported once: it may be overwritten)
                    else:
                        f = tmp
                        f.copy_(part[rid])
                    f.sub_(acc)
                    d2 = float(torch.linalg.vector_norm(f)) ** 2
                    lo, hi = torch.aminmax(f)
                    dists.append((name, d2, max(-float(lo), float(hi))))
                got.append((sq_m, dists))
            return got

        pieces = [(p0, min(n, p0 + step)) for p0 in range(0, n, step)]
        if len(pieces) > 1:
            # two threads (this one and a helper) on alternate pieces: the arithmetic is
            # what the merge waits for; the statistics are summed in piece order below
            helper = self._helper_pool().submit(work, pieces[1::2], 1)
            try:
                mine = work(pieces[0::2], 0)
            finally:
                theirs = helper.result()
            results = [None] * len(pieces)
            results[0::2], results[1::2] = mine, theirs
        else:
            results = work(pieces, 0)
        if not reported:
            return
        d2s, m2s = {}, {}
        dmaxs = {}
        for sq_m, dists in results:  # (in piece order)
            for name, d2, dmax in dists:
                d2s[name] = d2s.get(name, 0.0) + d2
                m2s[name] = m2s.get(name, 0.0) + sq_m
                dmaxs[name] = max(dmaxs.get(name, 0.0), dmax)
        where = (key, tuple(off))
        with self._lock:
            st.sums += [(where, name, d2s[name], m2s[name]) for name in d2s]
            for name, v in dmaxs.items():
                st.max_abs[name] = max(st.max_abs.get(name, 0.0), v)

    def _helper_pool(self):
        with self._lock:  # (the chunk computed ahead and the writer's may ask at once)
            if self._helper is None:
                from concurrent.futures import ThreadPoolExecutor

                self._helper = ThreadPoolExecutor(1, thread_name_prefix="merge-mean")
            return self._helper


def _split_axis(axis: int, per_index: Callable):
    """A rule that splits a box along ``axis`` into single indices, each made by ``per_index(i)``."""

    def split(off, sz):
        parts = []
        for i in range(off[axis], off[axis] + sz[axis]):
            o, s = list(off), list(sz)
            o[axis], s[axis] = i, 1
            kind, payload = per_index(i)
            parts.append((tuple(o), tuple(s), kind, payload))
        return parts

    return split


def _whole(kind, payload):
    return lambda off, sz: [(off, sz, kind, payload)]


def _vocab_rule(plan: _VocabPlan, inputs: Sequence[_Input], weights: Sequence[float], reported: Sequence[int]):
    """Rows of the embedding / LM head by segment: the mean of the inputs that make it.

    ``reported``: inputs whose distance from the result is reported, on the rows where
    they have a token.
    """

    def split(off, sz):
        parts = []
        lo, hi = off[0], off[0] + sz[0]
        for a, b, who, kind in plan.segments:
            a, b = max(a, lo), min(b, hi)
            if a >= b:
                continue
            o, s = list(off), list(sz)
            o[0], s[0] = a, b - a
            box = (tuple(o), tuple(s))
            if kind == "zero":
                parts.append((*box, "zero", None))
                continue
            rep = [i for i in reported if b <= inputs[i].n_real] if kind == "token" else []
            if len(who) == 1 and set(rep) <= set(who):
                parts.append((*box, "copy", _Ref(who[0])))
                continue
            values = [(_Ref(i), weights[i]) for i in who]
            parts.append((*box, "mean", (values, _dedupe(values, [(inputs[i].name, _Ref(i)) for i in rep]))))
        return parts

    return split


def _dedupe(values, reported):
    """Use the same _Ref object for an input in values and reported (read once)."""
    by_inp = {ref.inp: ref for ref, _ in values}
    return [(name, by_inp.get(ref.inp, ref)) for name, ref in reported]


# -- the manifest and the report ----------------------------------------------------------


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise MergeError(f"{directory}: no {MANIFEST_FILE} - not a checkpoint made by merge_experts")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MergeError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("experts"), list):
        raise MergeError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return f"{x:.2e}"


def _count(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def format_divergence(divergence: dict, names: Sequence[str]) -> str:
    """The divergence report as a table: one row per parameter group."""
    head = ["group", "params", "averaged", "max|x-m|"] + [f"{n}" for n in names]
    rows = [head]
    order = ["embeddings", "attention", "norms", "lm head", "router (anchor row)", "other"]
    for group in sorted(divergence, key=lambda g: order.index(g) if g in order else 99):
        d = divergence[group]
        rel = d["rel_l2_from_merged"]
        rows.append([group, _count(d["params"]), _count(d["averaged_params"]), _fmt(d["max_abs_diff"])]
                    + [_fmt(rel[n]) if n in rel else "-" for n in names])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["divergence of the shared parameters from the merged ones m: max |x - m| over the "
             "inputs x, and per input ||x - m|| / ||m||"]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class MergeResult:
    config: ModelConfig
    manifest: dict
    report: str
    written: Path | None


def _tensor_bytes(shapes: dict) -> int:
    total = 0
    for shape, dtype in shapes.values():
        n = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            n *= s
        total += n
    return total


def _output_config(ref: ModelConfig, num_experts: int, vocab_size: int, topk: int | None, norm: bool | None):
    if topk is None:
        topk = min(ref.moe_topk, num_experts)
    if not 1 <= topk <= num_experts:
        raise MergeError(f"--topk {topk} must be in 1..{num_experts}")
    return ref.with_(
        num_experts=num_experts,
        moe_topk=topk,
        norm_topk_prob=(topk < num_experts) if norm is None else norm,
        vocab_size=vocab_size,
    )


def _run(
    *,
    inputs: list[_Input],
    out_cfg: ModelConfig,
    rules: dict,
    composer: _Composer,
    save_dir: Path | None,
    dry_run: bool,
    plan_lines: list[str],
    report_names: list[str],
    manifest: dict,
    tokenizer_inputs: list[_Input],
    vocab: _VocabPlan,
    dtype: torch.dtype,
    print_fn: Callable,
    checks: Callable = lambda: None,
) -> MergeResult:
    write_tokenizer, tok_info = _merge_tokenizers(tokenizer_inputs, vocab)
    shapes = expected_tensors(out_cfg, dtype)
    missing = [k for k in shapes if k not in rules]
    if missing:
        raise MergeError(f"do not know how to make output tensor {missing[0]!r}")
    composer.rules = rules
    composer.out_dtypes = {k: dt for k, (_, dt) in shapes.items()}
    composer.out_shapes = shapes
    # The largest computed chunk (the embedding's mean) is computed while the anchor is
    # checked and the save is planned - in memory: nothing is written before the checks pass.
    ahead = None if dry_run else composer.prefetch_candidate()
    if ahead is not None:
        composer.prefetch(*ahead)
    try:
        checks()
        ignored = [f"{inp.name}: {inp.ignored}" for inp in inputs if inp.ignored]
        if ignored:
            plan_lines.append(f"  ignored (not model weights, e.g. optimizer state): {', '.join(ignored)} tensors")
        plan_lines.append(f"  output: {len(shapes)} tensors, {_tensor_bytes(shapes) / 2**20:.1f} MiB")
        for line in plan_lines:
            print_fn(line)

        written = None
        if dry_run:
            for key, (shape, _) in shapes.items():
                if ".mlp.experts." in key:
                    continue
                if key.endswith("router.weight"):
                    for layer in range(shape[0]):
                        composer.survey(key, (layer, 0, 0), (1, 1, shape[2]))
                    continue
                composer.survey(key, (0,) * len(shape), shape)
        else:
            with atomic_output_dir(save_dir) as tmp:
                write_checkpoint(out_cfg, dtype, tmp, composer)
                write_tokenizer(tmp / TOKENIZER_SUBDIR)
                for entry in manifest["experts"]:
                    inp = entry.pop("_input", None)
                    if inp is not None:
                        entry["content_hash"] = inp.content_hash()
                base = manifest.get("base")
                if base and "_input" in base:
                    base["content_hash"] = base.pop("_input").content_hash()
                manifest["tokenizer"] = tok_info
                manifest["divergence"] = {g: s.as_dict() for g, s in composer.stats.items()}
                manifest["tensors"] = dict(sorted(composer.tensor_status.items()))
                (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            written = Path(save_dir)
    finally:
        composer.close()  # (on an error: a chunk computed ahead is dropped)
    for entry in manifest["experts"]:
        entry.pop("_input", None)
    if manifest.get("base"):
        manifest["base"].pop("_input", None)
    divergence = {g: s.as_dict() for g, s in composer.stats.items()}
    manifest["divergence"] = divergence
    report = format_divergence(divergence, report_names)
    print_fn(report)
    if written:
        print_fn(f"wrote {written} ({out_cfg.num_experts} experts: anchor + "
                 f"{', '.join(e['name'] for e in manifest['experts'])}; top-{out_cfg.moe_topk})")
    else:
        print_fn("dry run: nothing written")
    return MergeResult(out_cfg, manifest, report, written)


@contextlib.contextmanager
def _one_torch_thread():
    """Block arithmetic on a single intra-op thread: the blocks are a few MB, where
    OpenMP's fork/join costs more than it saves, and the other core hashes what was read."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- stage 2: merge -----------------------------------------------------------------------


def merge_experts(*args, **kwargs) -> MergeResult:
    """Merge N 2-expert domain checkpoints into one (N+1)-expert checkpoint at ``save_dir``.

    ``merge_experts(experts, save_dir, *, weights=None, topk=None, dry_run=False,
    print_fn=print)``. ``experts``: ``[(name, dir), ...]``; expert ``j`` of the result is
    the ``j``-th's expert 1. ``weights``: per-name weights of the shared-parameter average
    (default uniform). ``topk``: experts per token of the result (default: the inputs'
    ``moe_topk``); top-k weights are renormalised whenever fewer than all experts are active.
    """
    with _one_torch_thread():
        return _merge_experts(*args, **kwargs)


def _merge_experts(
    experts: Sequence[tuple[str, str | Path]],
    save_dir: str | Path | None,
    *,
    weights: dict[str, float] | None = None,
    topk: int | None = None,
    dry_run: bool = False,
    print_fn: Callable = print,
) -> MergeResult:
    names = [n for n, _ in experts]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MergeError(f"expert name {dup!r} is given twice")
    if not experts:
        raise MergeError("no experts to merge")
    for n in names:
        if not _NAME.match(n):
            raise MergeError(f"expert name {n!r} must be letters, digits, '_', '.', '-'")
    if not dry_run:
        if save_dir is None:
            raise MergeError("an output folder is needed (or a dry run)")
        save_dir = check_output_free(save_dir)
    paths = [Path(p).resolve() for _, p in experts]
    for i, p in enumerate(paths):
        if p in paths[:i]:
            raise MergeError(f"{names[i]} and {names[paths.index(p)]} are the same checkpoint ({p})")
    if weights is not None:
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise MergeError(f"--weights names {unknown[0]!r}, which is not one of the experts ({', '.join(names)})")
        missing = [n for n in names if n not in weights]
        if missing:
            raise MergeError(f"--weights gives no weight for {', '.join(missing)}")
        if sum(weights.values()) <= 0:
            raise MergeError("--weights: the weights must not all be zero")

    inputs = [_open_input(n, Path(p)) for n, p in experts]
    anchor_check = None
    try:
        ref = inputs[0]
        for inp in inputs:
            if inp.cfg.num_experts != 2:
                raise MergeError(
                    f"{inp.name}: {inp.path} has {inp.cfg.num_experts or 'no'} experts; a domain "
                    f"expert is the 2-expert model that tools/upcycle.py makes (anchor + expert)"
                )
        _check_same_architecture(ref, inputs[1:])
        anchor_check = _AnchorCheck(ref, inputs[1:])
        for inp in inputs:
            _check_tensors(inp)
        _check_same_dtypes(ref, inputs[1:])
        vocab = _plan_vocabulary(inputs, ref.cfg.vocab_pad_multiple)
        checks = anchor_check.verdict  # in _run, while the first computed chunk is computed

        w = [1.0] * len(inputs) if weights is None else [weights[inp.name] for inp in inputs]
        total = sum(w)
        for inp, x in zip(inputs, w):
            inp.weight = x / total
        n_out = len(inputs) + 1
        out_cfg = _output_config(ref.cfg, n_out, vocab.vocab_size, topk, None)
        dtype = ref.reader.dtype(_VOCAB_KEYS[0])

        everyone = list(range(len(inputs)))
        reported = [(inp.name, _Ref(i)) for i, inp in enumerate(inputs)]
        mean_all = [(_Ref(i), inputs[i].weight) for i in everyone]
        mean_all_payload = (mean_all, _dedupe(mean_all, reported))

        def expert_source(e):
            if e == ANCHOR:
                return "copy", _Ref(0, axis=1, index=ANCHOR)
            return "copy", _Ref(e - 1, axis=1, index=DOMAIN_EXPERT)

        def router_source(e):
            if e == ANCHOR:
                values = [(_Ref(i, axis=1, index=ANCHOR), inputs[i].weight) for i in everyone]
                rep = [(inputs[i].name, values[i][0]) for i in everyone]
                return "mean", (values, rep)
            return "copy", _Ref(e - 1, axis=1, index=DOMAIN_EXPERT)

        rules = {}
        composer = _Composer(inputs, {}, dry_run)
        for key in expected_tensors(out_cfg, dtype):
            if ".mlp.experts." in key:
                rules[key] = _split_axis(1, expert_source)
            elif key.endswith("router.weight"):
                rules[key] = _split_axis(1, router_source)
            elif key in _VOCAB_KEYS:
                rules[key] = _vocab_rule(vocab, inputs, [inp.weight for inp in inputs], everyone)
            else:
                rules[key] = _whole("mean", mean_all_payload)

        averaging = {
            "method": "mean" if weights is None else "weighted mean",
            "weights": {inp.name: inp.weight for inp in inputs},
            "given_weights": weights,
            "accumulation": "float32, rounded once to the checkpoint dtype",
            "identical_blocks": "copied bit for bit",
            "router": "row 0 (anchor) averaged like a shared parameter; row j = expert j's row 1",
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "created": _now(),
            "num_experts": n_out,
            "moe_topk": out_cfg.moe_topk,
            "norm_topk_prob": out_cfg.norm_topk_prob,
            "anchor": {"index": ANCHOR, "from": ref.name, "identical_in": names},
            "experts": [
                {"index": i + 1, "name": inp.name, "source": str(inp.path), "source_expert": DOMAIN_EXPERT,
                 "weight": inp.weight, "vocab_size": inp.cfg.vocab_size, "_input": inp}
                for i, inp in enumerate(inputs)
            ],
            "averaging": averaging,
            "vocabulary": {"vocab_size": vocab.vocab_size, "padded": vocab.padded, "added": vocab.added},
            "history": [{"op": "merge", "at": _now(), "experts": names}],
        }
        plan = [
            f"merge plan: {len(inputs)} domain experts + anchor -> "
            f"{save_dir if save_dir else '(dry run)'}",
            f"  model: {out_cfg.num_experts} experts, top-{out_cfg.moe_topk}"
            f"{' (renormalised)' if out_cfg.norm_topk_prob else ''}, vocabulary {vocab.vocab_size} "
            f"(padded {vocab.padded}), {out_cfg.num_layers} layers, hidden {out_cfg.hidden_size}, {dtype}",
            f"  expert 0 (anchor) <- {ref.name}: identical in all {len(inputs)} inputs",
        ]
        for i, inp in enumerate(inputs):
            plan.append(f"  expert {i + 1} {inp.name:<12} <- {inp.path} (its expert 1); weight {inp.weight:.4g}")
        plan.append(f"  shared parameters: {averaging['method']} of {len(inputs)} inputs (identical blocks copied)")
        plan.append("  router: row 0 averaged; row j = expert j's row 1")
        if vocab.added:
            for a in vocab.added[:10]:
                plan.append(f"  vocabulary: id {a['id']} {a['token']!r} from {', '.join(a['from'])}")
            if len(vocab.added) > 10:
                plan.append(f"  vocabulary: ... {len(vocab.added) - 10} more added ids")
        return _run(
            inputs=inputs, out_cfg=out_cfg, rules=rules, composer=composer,
            save_dir=None if dry_run else save_dir, dry_run=dry_run, plan_lines=plan,
            report_names=names, manifest=manifest, tokenizer_inputs=inputs, vocab=vocab,
            dtype=dtype, print_fn=print_fn, checks=checks,
        )
    finally:
        if anchor_check is not None:
            anchor_check.stop()  # (it reads the inputs: they are closed after it ends)
        for inp in inputs:
            inp.reader.close()


# -- stage 2b: replace or add one expert ----------------------------------------------------


def upgrade(*args, **kwargs) -> MergeResult:
    """A merged checkpoint with some experts replaced and/or new ones added.

    ``upgrade(base_dir, save_dir, *, replace=[(name, dir)], add=[(name, dir)], topk=None,
    dry_run=False, print_fn=print)``. Every expert not replaced, the router rows of those
    experts and the anchor's, and the shared parameters are copied bit for bit from the
    base; a new expert brings its expert 1, its router row 1 and the vocabulary rows of
    tokens only it has.
    """
    with _one_torch_thread():
        return _upgrade(*args, **kwargs)


def _upgrade(
    base_dir: str | Path,
    save_dir: str | Path | None,
    *,
    replace: Sequence[tuple[str, str | Path]] = (),
    add: Sequence[tuple[str, str | Path]] = (),
    topk: int | None = None,
    dry_run: bool = False,
    print_fn: Callable = print,
) -> MergeResult:
    if not replace and not add:
        raise MergeError("--base needs --replace NAME=DIR or --add NAME=DIR")
    base_dir = Path(base_dir)
    if not dry_run:
        if save_dir is None:
            raise MergeError("an output folder is needed (or a dry run)")
        save_dir = check_output_free(save_dir)
    manifest_in = read_manifest(base_dir)
    names = [e["name"] for e in manifest_in["experts"]]
    new_names = [n for n, _ in list(replace) + list(add)]
    for i, n in enumerate(new_names):
        if n in new_names[:i]:
            raise MergeError(f"expert name {n!r} is given twice")
    for n, _ in replace:
        if n not in names:
            raise MergeError(f"--replace {n}: the base has no expert {n!r} (it has {', '.join(names)})")
    for n, _ in add:
        if n in names:
            raise MergeError(f"--add {n}: the base already has an expert {n!r}; use --replace")

    base = _open_input(BASE_NAME, base_dir)
    news = [_open_input(n, Path(p)) for n, p in list(replace) + list(add)]
    inputs = [base] + news
    anchor_check = None
    try:
        if base.cfg.num_experts != len(names) + 1:
            raise MergeError(
                f"{base_dir}: {base.cfg.num_experts} experts but its manifest lists {len(names)} + anchor"
            )
        for inp in news:
            if inp.cfg.num_experts != 2:
                raise MergeError(f"{inp.name}: {inp.path} has {inp.cfg.num_experts or 'no'} experts; "
                                 f"a domain expert is a 2-expert checkpoint")
        _check_same_architecture(base, news)
        anchor_check = _AnchorCheck(base, news)
        for inp in inputs:
            _check_tensors(inp)
        _check_same_dtypes(base, news)
        vocab = _plan_vocabulary(inputs, base.cfg.vocab_pad_multiple, keep_rows_of=0)
        checks = anchor_check.verdict  # in _run, while the first computed chunk is computed

        replaced = {n: i + 1 for i, (n, _) in enumerate(replace)}  # name -> index in inputs
        order = list(names) + [n for n, _ in add]
        source_of = {}  # output expert index -> _Ref
        for e, n in enumerate(order, start=1):
            if n in replaced:
                source_of[e] = _Ref(replaced[n], axis=1, index=DOMAIN_EXPERT)
            elif e <= len(names):
                source_of[e] = _Ref(0, axis=1, index=e)
            else:
                source_of[e] = _Ref(len(replace) + 1 + (e - len(names) - 1), axis=1, index=DOMAIN_EXPERT)
        source_of[ANCHOR] = _Ref(0, axis=1, index=ANCHOR)
        n_out = len(order) + 1
        out_cfg = _output_config(base.cfg, n_out, vocab.vocab_size, topk if topk is not None else base.cfg.moe_topk, None)
        dtype = base.reader.dtype(_VOCAB_KEYS[0])

        reported_idx = list(range(len(inputs)))
        keep = [(_Ref(0), 1.0)]
        keep_payload = (keep, _dedupe(keep, [(inp.name, _Ref(i)) for i, inp in enumerate(inputs)]))

        def router_source(e):
            if e == ANCHOR:
                values = [(_Ref(0, axis=1, index=ANCHOR), 1.0)]
                rep = [(BASE_NAME, values[0][0])] + [
                    (inp.name, _Ref(i, axis=1, index=ANCHOR)) for i, inp in enumerate(inputs) if i > 0
                ]
                return "mean", (values, rep)
            ref = source_of[e]
            if ref.inp == 0:
                return "copy", _Ref(0, axis=1, index=e)
            return "copy", ref

        rules = {}
        for key in expected_tensors(out_cfg, dtype):
            if ".mlp.experts." in key:
                rules[key] = _split_axis(1, lambda e: ("copy", source_of[e]))
            elif key.endswith("router.weight"):
                rules[key] = _split_axis(1, router_source)
            elif key in _VOCAB_KEYS:
                rules[key] = _vocab_rule(vocab, inputs, [1.0] * len(inputs), reported_idx)
            else:
                rules[key] = _whole("mean", keep_payload)
        composer = _Composer(inputs, {}, dry_run)

        experts_out = []
        for e, n in enumerate(order, start=1):
            if n in replaced:
                inp = inputs[replaced[n]]
                experts_out.append({"index": e, "name": n, "source": str(inp.path), "source_expert": DOMAIN_EXPERT,
                                    "weight": None, "vocab_size": inp.cfg.vocab_size, "_input": inp})
            elif e <= len(names):
                experts_out.append(dict(manifest_in["experts"][e - 1], index=e))
            else:
                inp = inputs[len(replace) + 1 + (e - len(names) - 1)]
                experts_out.append({"index": e, "name": n, "source": str(inp.path), "source_expert": DOMAIN_EXPERT,
                                    "weight": None, "vocab_size": inp.cfg.vocab_size, "_input": inp})
        op = {"op": "upgrade", "at": _now(), "base": str(base.path),
              "replaced": [n for n, _ in replace], "added": [n for n, _ in add]}
        manifest = dict(manifest_in)
        manifest.update({
            "created": _now(),
            "num_experts": n_out,
            "moe_topk": out_cfg.moe_topk,
            "norm_topk_prob": out_cfg.norm_topk_prob,
            "experts": experts_out,
            "base": {"source": str(base.path), "_input": base},
            "vocabulary": {"vocab_size": vocab.vocab_size, "padded": vocab.padded,
                           "added": manifest_in.get("vocabulary", {}).get("added", []) + [
                               a for a in vocab.added if BASE_NAME not in a["from"]]},
            "history": list(manifest_in.get("history", [])) + [op],
        })
        manifest["averaging"] = dict(manifest_in.get("averaging", {}),
                                     upgrade="shared parameters, anchor and other experts copied from the base")
        plan = [f"upgrade plan: {base_dir} -> {save_dir if save_dir else '(dry run)'}",
                f"  model: {n_out} experts, top-{out_cfg.moe_topk}, vocabulary {vocab.vocab_size}"]
        for e, n in enumerate(order, start=1):
            ref = source_of[e]
            what = "kept from the base" if ref.inp == 0 else f"<- {inputs[ref.inp].path} (its expert 1)"
            tag = " (replaced)" if n in replaced else (" (added)" if e > len(names) else "")
            plan.append(f"  expert {e} {n:<12}{tag} {what}")
        plan.append("  shared parameters, anchor and router rows of kept experts: copied from the base")
        for a in vocab.added:
            if BASE_NAME not in a["from"]:
                plan.append(f"  vocabulary: id {a['id']} {a['token']!r} from {', '.join(a['from'])}")
        return _run(
            inputs=inputs, out_cfg=out_cfg, rules=rules, composer=composer,
            save_dir=None if dry_run else save_dir, dry_run=dry_run, plan_lines=plan,
            report_names=[BASE_NAME] + [inp.name for inp in news], manifest=manifest,
            tokenizer_inputs=inputs, vocab=vocab, dtype=dtype, print_fn=print_fn, checks=checks,
        )
    finally:
        if anchor_check is not None:
            anchor_check.stop()  # (it reads the inputs: they are closed after it ends)
        for inp in inputs:
            inp.reader.close()
