"""BAR stage 2: compose domain experts into one MoE, and upgrade it one expert at a time.

Each domain ends stage 1 with a 2-expert checkpoint (expert 0 = the frozen anchor, expert 1
= the domain's expert) whose shared parameters - embeddings, attention, norms, LM head -
drifted apart where its stages unfroze them. :func:`merge_experts` builds the
(N+1)-expert model and :func:`upgrade` changes one (``replace`` swaps the expert of a name
for a new domain checkpoint's expert 1, ``add`` appends one). Both only build a
:class:`MergePlan` - BAR's rules, in :func:`merge_plan` and :func:`upgrade_plan` - and hand
it to one executor (:func:`_run`): the checks, the streaming, the manifest and the
divergence report are the same for both.

Everything streams: each output chunk is made when megatron's save writes it, from the
inputs' chunks (:mod:`merge_io`), so memory does not grow with the number of experts.
Nothing is written until every check has passed (the anchor compared bit for bit
included); the output folder appears only when complete, with ``bar_manifest.json``
(experts, sources, content hashes, averaging, divergence report). A non-finite input value
stops the merge, and nothing is left at the output path.
"""

from __future__ import annotations

import datetime
import errno
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from megatron_bar.bar.merge_io import Buffers, CheckpointReader, expected_tensors, intersect, local_slices, write_checkpoint
from megatron_bar.model.config import ConfigError, ModelConfig
from megatron_bar.utils.fs import atomic_output_dir, check_output_free, incomplete_path

MANIFEST_FILE = "bar_manifest.json"
MANIFEST_FORMAT = "megatron_bar.bar_manifest/1"
TOKENIZER_SUBDIR = "tokenizer"
ANCHOR = 0
BASE_NAME = "(base)"  # the base of an upgrade, in reports (not a valid expert name)
DOMAIN_EXPERT = 1  # a domain checkpoint's own expert
# Fields that may differ between the checkpoints being merged: the merge decides them.
MERGE_FIELDS = ("num_experts", "moe_topk", "norm_topk_prob", "vocab_size")
# An input tensor whose largest magnitude is this many times the others' is reported.
OUTLIER_FACTOR = 100.0
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


def _check_anchor(ref: _Input, inp: _Input) -> None:
    """Expert 0 (the anchor) of ``inp`` equals that of ``ref``, bit for bit (else a
    MergeError naming the tensor, the layer and the largest difference)."""
    buffers = Buffers()
    for key in _expert_keys(inp.model_keys):
        shape = inp.reader.shape(key)  # [layers, experts, ...]
        worst, where = 0.0, None
        for layer in range(shape[0]):
            box = ((layer, ANCHOR) + (0,) * (len(shape) - 2), (1, 1) + shape[2:])
            a = inp.reader.read(key, *box, out=buffers.get("anchor", box[1], inp.reader.dtype(key)))
            b = ref.reader.read(key, *box)
            if not torch.equal(a, b):
                d = (a.float() - b.float()).abs().max().item()
                if where is None or d > worst or math.isnan(d):
                    worst, where = d, layer
        if where is not None:
            raise MergeError(
                f"the anchor expert of {inp.name} ({inp.path}) differs from that of {ref.name}: "
                f"tensor {key!r} (layer {where}, expert 0) max |difference| {worst:.3g}. Every "
                f"expert must start from the same base and keep expert 0 frozen."
            )


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


# -- the plan: what each output tensor is made of ----------------------------------------


@dataclass(frozen=True)
class Src:
    """Input ``input`` (an index into the inputs). ``index``: on the slice's axis, that
    position of the input (an expert, a router row); None: the slice's own positions."""

    input: int
    index: int | None = None


@dataclass(frozen=True)
class Copy:
    """The values of one input, bit for bit."""

    src: Src


@dataclass(frozen=True)
class Mean:
    """The weighted mean of ``srcs`` (weights summing to 1), in fp32 rounded once; copied
    where they all agree. ``report``: (name, input) whose distance from the result goes in
    the divergence report."""

    srcs: tuple[Src, ...]
    weights: tuple[float, ...]
    report: tuple[tuple[str, Src], ...] = ()


@dataclass(frozen=True)
class Zero:
    """Rows no input has (vocabulary padding beyond every input's)."""


Step = Union[Copy, Mean, Zero]


@dataclass(frozen=True)
class Slice:
    """Positions ``[start, stop)`` of an output tensor on ``axis`` (None: all of it),
    made by ``step``."""

    step: Step
    axis: int | None = None
    start: int = 0
    stop: int = 0


@dataclass
class MergePlan:
    """A merge or an upgrade, as BAR's rules make it from the inputs."""

    experts: list[Src]  # output expert e <- this input's expert (index on the expert axis)
    router_rows: list[Step]  # output router row e (index on the row axis)
    shared: Step  # every other tensor (attention, norms, ...): shapes equal in all inputs
    vocab_rows: list[Slice]  # embedding and LM head rows (axis 0)

    def tensor_slices(self, key: str) -> list[Slice]:
        if ".mlp.experts." in key:  # [layers, experts, ...]: expert slices stacked
            return [Slice(Copy(src), 1, e, e + 1) for e, src in enumerate(self.experts)]
        if key.endswith("router.weight"):  # [layers, experts, hidden]
            return [Slice(step, 1, e, e + 1) for e, step in enumerate(self.router_rows)]
        if key in _VOCAB_KEYS:
            return self.vocab_rows
        return [Slice(self.shared)]


def merge_plan(inputs: Sequence[_Input], vocab: _VocabPlan) -> MergePlan:
    """BAR's merge: expert 0 is the anchor (input 0's, equal in all); expert ``j`` is input
    ``j``'s expert 1; router row 0 (the anchor's) and the shared parameters are the
    weighted mean of the inputs; router row ``j`` is input ``j``'s row 1; vocabulary rows
    are the mean of the inputs that have a token there."""
    everyone = range(len(inputs))
    weights = tuple(inp.weight for inp in inputs)

    def mean_of(index=None):
        srcs = tuple(Src(i, index) for i in everyone)
        return Mean(srcs, weights, tuple((inputs[i].name, srcs[i]) for i in everyone))

    return MergePlan(
        experts=[Src(0, ANCHOR)] + [Src(i, DOMAIN_EXPERT) for i in everyone],
        router_rows=[mean_of(ANCHOR)] + [Copy(Src(i, DOMAIN_EXPERT)) for i in everyone],
        shared=mean_of(),
        vocab_rows=_vocab_rows(vocab, inputs, weights),
    )


def upgrade_plan(inputs: Sequence[_Input], names: Sequence[str], replace: dict[str, int],
                 added: Sequence[int], vocab: _VocabPlan) -> MergePlan:
    """BAR's upgrade of a merged base (input 0, experts ``names``): a replaced expert
    (``replace``: name -> input) and an added one (``added``: inputs, in order) bring their
    expert 1 and router row 1; everything else is the base's, bit for bit. The newcomers'
    distance from the base's shared parameters is reported."""
    experts = [Src(0, ANCHOR)] + [Src(replace[n], DOMAIN_EXPERT) if n in replace else Src(0, e)
                                  for e, n in enumerate(names, start=1)]
    experts += [Src(i, DOMAIN_EXPERT) for i in added]

    def keep(index=None):
        return Mean((Src(0, index),), (1.0,),
                    ((BASE_NAME, Src(0, index)),) + tuple((inp.name, Src(i, index))
                                                         for i, inp in enumerate(inputs) if i))

    return MergePlan(
        experts=experts,
        router_rows=[keep(ANCHOR)] + [Copy(src) for src in experts[1:]],
        shared=keep(),
        vocab_rows=_vocab_rows(vocab, inputs, [1.0] * len(inputs)),
    )


def _vocab_rows(plan: _VocabPlan, inputs: Sequence[_Input], weights: Sequence[float]) -> list[Slice]:
    """Embedding / LM head rows by segment: the (renormalised) mean of the inputs that make
    it; the distance of each input with a token there is reported."""
    out = []
    for a, b, who, kind in plan.segments:
        if kind == "zero":
            out.append(Slice(Zero(), 0, a, b))
            continue
        rep = [i for i in range(len(inputs)) if b <= inputs[i].n_real] if kind == "token" else []
        if len(who) == 1 and set(rep) <= set(who):
            out.append(Slice(Copy(Src(who[0])), 0, a, b))
            continue
        total = sum(weights[i] for i in who)
        out.append(Slice(Mean(tuple(Src(i) for i in who), tuple(weights[i] / total for i in who),
                              tuple((inputs[i].name, Src(i)) for i in rep)), 0, a, b))
    return out


# -- the executor -------------------------------------------------------------------------


def _group_of(key: str) -> str:
    if key == "embedding.word_embeddings.weight":
        return "embedding"
    if key == "output_layer.weight":
        return "lm_head"
    if key.endswith("router.weight"):
        return "router (anchor row)"
    if "norm" in key:
        return "norms"
    if ".self_attention." in key:
        return "attention"
    return "other"


@dataclass
class _GroupStats:
    tensors: set = field(default_factory=set)
    params: int = 0
    averaged_params: int = 0
    max_abs: dict = field(default_factory=dict)  # input name -> max |x - merged|
    sq_dist: dict = field(default_factory=dict)  # input name -> sum of (x - merged)^2
    sq_norm: dict = field(default_factory=dict)  # input name -> sum of merged^2 where it is reported

    def as_dict(self) -> dict:
        rel = {n: (math.sqrt(d / self.sq_norm[n]) if self.sq_norm[n] > 0 else (0.0 if d == 0 else math.inf))
               for n, d in self.sq_dist.items()}
        return {
            "tensors": len(self.tensors),
            "params": self.params,
            "averaged_params": self.averaged_params,
            "max_abs_diff": max(self.max_abs.values(), default=0.0),
            "max_abs_from_merged": dict(self.max_abs),
            "rel_l2_from_merged": rel,
        }


class _Executor:
    """Makes any box of any output tensor from the inputs by the plan's steps, one stored
    input chunk at a time, and keeps the divergence statistics of the means."""

    def __init__(self, inputs: Sequence[_Input], plan: MergePlan, shapes: dict):
        self.inputs, self.plan, self.shapes = inputs, plan, shapes
        self.stats: dict[str, _GroupStats] = {}
        self.tensor_status: dict[str, str] = {}
        self.buffers = Buffers()

    def fill(self, key: str, offsets, sizes, copies: bool = True) -> torch.Tensor:
        """Box ``(offsets, sizes)`` of output tensor ``key``, valid until the next call (the
        writer writes each before it asks for the next); ``copies=False``: only the means
        are computed (a dry run's statistics)."""
        shape, dtype = self.shapes[key]
        box = (tuple(offsets), tuple(sizes))
        out = self.buffers.get("out", box[1], dtype)
        for sl in self.plan.tensor_slices(key):
            off, sz = [0] * len(shape), list(shape)
            if sl.axis is not None:
                off[sl.axis], sz[sl.axis] = sl.start, sl.stop - sl.start
            part = intersect(box, (tuple(off), tuple(sz)))
            if part is None:
                continue
            if part == box and isinstance(sl.step, Copy) and copies:  # (an expert: no copy)
                return self._read(sl.step.src, sl, key, part)
            dst = out[local_slices(box[0], *part)]
            if isinstance(sl.step, Zero):
                dst.zero_()
            elif isinstance(sl.step, Copy):
                if copies:
                    self._read(sl.step.src, sl, key, part, dst)
            else:
                self._mean(sl.step, sl, key, part, dst)
        return out

    def _read(self, src: Src, sl: Slice, key: str, part, out=None) -> torch.Tensor:
        off = list(part[0])
        if src.index is not None:
            off[sl.axis] = src.index + part[0][sl.axis] - sl.start
        return self.inputs[src.input].reader.read(key, off, part[1], out=out)

    def _mean(self, step: Mean, sl: Slice, key: str, part, dst: torch.Tensor) -> None:
        # Inputs are read one at a time (twice where reported: for the mean, then for the
        # distance from it), so memory does not grow with their number.
        first = self.buffers.get("first", part[1], dst.dtype).copy_(self._read(step.srcs[0], sl, key, part))
        acc = self.buffers.get("acc", part[1], torch.float32).copy_(first).mul_(step.weights[0])
        tmp = self.buffers.get("tmp", part[1], torch.float32)
        same = True
        for src, w in zip(step.srcs[1:], step.weights[1:]):  # (x * w summed in order, in fp32)
            x = self._read(src, sl, key, part)
            same = same and torch.equal(first, x)
            acc.add_(tmp.copy_(x).mul_(w))
        if same:
            acc.copy_(first)
        dst.copy_(first if same else acc)
        n = dst.numel()
        st = self.stats.setdefault(_group_of(key), _GroupStats())
        st.tensors.add(key)
        st.params += n
        if same:
            self.tensor_status.setdefault(key, "copied")
        else:
            st.averaged_params += n
            self.tensor_status[key] = "averaged"
        sq_m = float(torch.linalg.vector_norm(acc)) ** 2 if step.report else 0.0
        for name, src in step.report:
            if (same and src in step.srcs) or not n:
                d2 = dmax = 0.0
            else:
                x = first if src == step.srcs[0] else self._read(src, sl, key, part)
                d = tmp.copy_(x).sub_(acc)
                d2 = float(torch.linalg.vector_norm(d)) ** 2
                lo, hi = torch.aminmax(d)
                dmax = max(-float(lo), float(hi))
            st.sq_dist[name] = st.sq_dist.get(name, 0.0) + d2
            st.sq_norm[name] = st.sq_norm.get(name, 0.0) + sq_m
            st.max_abs[name] = max(st.max_abs.get(name, 0.0), dmax)

    def survey(self) -> None:
        """A dry run: the means of every output tensor, a layer at a time, nothing kept."""
        for key, (shape, _) in self.shapes.items():
            if ".mlp.experts." in key:
                continue
            layers = range(shape[0]) if key.startswith("decoder.layers.") else [None]
            for layer in layers:
                if layer is None:
                    self.fill(key, (0,) * len(shape), shape, copies=False)
                else:
                    self.fill(key, (layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:], copies=False)


def _outliers(inputs: Sequence[_Input]) -> list[dict]:
    """Input tensors whose largest magnitude is far outside the other inputs' (a flipped
    exponent bit, a diverged run), among the tensors read."""
    out = []
    for key in sorted(set().union(*(inp.reader.max_abs for inp in inputs))):
        tops = {inp.name: inp.reader.max_abs[key] for inp in inputs if key in inp.reader.max_abs}
        for name, top in tops.items():
            others = max((v for n, v in tops.items() if n != name), default=None)
            if others is not None and top > OUTLIER_FACTOR * others:
                out.append({"tensor": key, "input": name, "max_abs": top, "others_max_abs": others})
    return out


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


def format_divergence(divergence: dict, names: Sequence[str], outliers: Sequence[dict] = ()) -> str:
    """The divergence report as a table, one row per parameter group, then the outliers."""
    head = ["group", "params", "averaged", "max|x-m|"] + list(names)
    rows = [head]
    order = ["embedding", "attention", "norms", "lm_head", "router (anchor row)", "other"]
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
    for o in outliers:
        lines.append(f"outlier: {o['input']}'s tensor {o['tensor']!r} reaches |x| = {o['max_abs']:.3g}, the "
                     f"other inputs' at most {o['others_max_abs']:.3g} - check that checkpoint")
    return "\n".join(lines)


@dataclass
class MergeResult:
    config: ModelConfig
    manifest: dict
    report: str
    written: Path | None


def _output_config(ref: ModelConfig, num_experts: int, vocab_size: int, topk: int | None):
    if topk is None:
        topk = min(ref.moe_topk, num_experts)
    if not 1 <= topk <= num_experts:
        raise MergeError(f"--topk {topk} must be in 1..{num_experts}")
    return ref.with_(num_experts=num_experts, moe_topk=topk, norm_topk_prob=topk < num_experts,
                     vocab_size=vocab_size)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- one run, merge or upgrade ------------------------------------------------------------


def _run(inputs: list[_Input], ref: _Input, plan: MergePlan, *, vocab: _VocabPlan, n_experts: int,
         topk: int | None, save_dir: Path | None, plan_lines: list[str], report_names: list[str],
         manifest: dict, hashed: dict, print_fn: Callable) -> MergeResult:
    """Check, execute ``plan`` and write (``save_dir`` None: a dry run).
    ``hashed``: manifest entries -> the input whose content hash they get."""
    out_cfg = _output_config(ref.cfg, n_experts, vocab.vocab_size, topk)
    write_tokenizer, tok_info = _merge_tokenizers(inputs, vocab)
    for inp in inputs[1:]:
        _check_anchor(ref, inp)
    dtype = ref.reader.dtype(_VOCAB_KEYS[0])
    shapes = expected_tensors(out_cfg, dtype)
    ex = _Executor(inputs, plan, shapes)
    ignored = [f"{inp.name}: {inp.ignored}" for inp in inputs if inp.ignored]
    if ignored:
        plan_lines.append(f"  ignored (not model weights, e.g. optimizer state): {', '.join(ignored)} tensors")
    size = sum(math.prod(s) * d.itemsize for s, d in shapes.values())
    plan_lines.append(f"  output: {len(shapes)} tensors, {size / 2**20:.1f} MiB")
    plan_lines[1:1] = [
        f"  model: {out_cfg.num_experts} experts, top-{out_cfg.moe_topk}"
        f"{' (renormalised)' if out_cfg.norm_topk_prob else ''}, vocabulary {vocab.vocab_size} "
        f"(padded {vocab.padded}), {out_cfg.num_layers} layers, hidden {out_cfg.hidden_size}, {dtype}"]
    for line in plan_lines:
        print_fn(line)
    manifest.update(num_experts=out_cfg.num_experts, moe_topk=out_cfg.moe_topk,
                    norm_topk_prob=out_cfg.norm_topk_prob, tokenizer=tok_info)
    if save_dir is None:
        ex.survey()
    else:
        stale = incomplete_path(save_dir)
        if stale.exists():
            print_fn(f"removing {stale}, left behind by a merge that did not finish")
        if _free_bytes(save_dir) < size:
            raise _no_space(save_dir, size)
        with atomic_output_dir(save_dir) as tmp:
            try:
                write_checkpoint(out_cfg, dtype, tmp, ex.fill)
                write_tokenizer(tmp / TOKENIZER_SUBDIR)
                for entry, inp in hashed:
                    entry["content_hash"] = inp.reader.content_hash(inp.model_keys)
                manifest["divergence"] = {g: s.as_dict() for g, s in ex.stats.items()}
                manifest["outliers"] = _outliers(inputs)
                manifest["tensors"] = dict(sorted(ex.tensor_status.items()))
                (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            except (OSError, RuntimeError) as e:  # (torch.save's full disk: "unexpected pos")
                if getattr(e, "errno", None) == errno.ENOSPC or _free_bytes(save_dir) < 1 << 20:
                    raise _no_space(save_dir, size) from None
                raise
    manifest["divergence"] = {g: s.as_dict() for g, s in ex.stats.items()}
    manifest["outliers"] = _outliers(inputs)
    report = format_divergence(manifest["divergence"], report_names, manifest["outliers"])
    print_fn(report)
    if save_dir is not None:
        print_fn(f"wrote {save_dir} ({out_cfg.num_experts} experts: anchor + "
                 f"{', '.join(e['name'] for e in manifest['experts'])}; top-{out_cfg.moe_topk})")
    else:
        print_fn("dry run: nothing written")
    return MergeResult(out_cfg, manifest, report, save_dir)


def _free_bytes(path: Path) -> int:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _no_space(save_dir: Path, size: int) -> MergeError:
    return MergeError(f"{save_dir}: no space left on the device (the merged checkpoint needs about "
                      f"{size / 2**20:.1f} MiB, {_free_bytes(save_dir) / 2**20:.1f} MiB are free); nothing was written")


def _open_all(named: Sequence[tuple[str, Path]], save_dir, dry_run: bool) -> tuple[list[_Input], Path | None]:
    if not dry_run:
        if save_dir is None:
            raise MergeError("an output folder is needed (or a dry run)")
        save_dir = check_output_free(save_dir)
    paths = [Path(p).resolve() for _, p in named]
    for i, p in enumerate(paths):
        if p in paths[:i]:
            raise MergeError(f"{named[i][0]} and {named[paths.index(p)][0]} are the same checkpoint ({p})")
    return [_open_input(n, Path(p)) for n, p in named], (None if dry_run else Path(save_dir))


def _check_inputs(ref: _Input, inputs: Sequence[_Input], domains: Sequence[_Input]) -> None:
    for inp in domains:
        if inp.cfg.num_experts != 2:
            raise MergeError(f"{inp.name}: {inp.path} has {inp.cfg.num_experts or 'no'} experts; a domain "
                             f"expert is the 2-expert model that tools/upcycle.py makes (anchor + expert)")
    others = [inp for inp in inputs if inp is not ref]
    _check_same_architecture(ref, others)
    for inp in inputs:
        _check_tensors(inp)
    _check_same_dtypes(ref, others)


# -- stage 2: merge -----------------------------------------------------------------------


def merge_experts(experts: Sequence[tuple[str, str | Path]], save_dir: str | Path | None, *,
                  weights: dict[str, float] | None = None, topk: int | None = None, dry_run: bool = False,
                  print_fn: Callable = print) -> MergeResult:
    """Merge N 2-expert domain checkpoints into one (N+1)-expert checkpoint at ``save_dir``.

    ``experts``: ``[(name, dir), ...]``; expert ``j`` of the result is the ``j``-th's expert
    1. ``weights``: per-name weights of the shared-parameter mean (default uniform).
    ``topk``: experts per token of the result (default: the inputs' ``moe_topk``); top-k
    weights are renormalised whenever fewer than all experts are active.
    """
    names = [n for n, _ in experts]
    if not experts:
        raise MergeError("no experts to merge")
    for i, n in enumerate(names):
        if n in names[:i]:
            raise MergeError(f"expert name {n!r} is given twice")
        if not _NAME.match(n):
            raise MergeError(f"expert name {n!r} must be letters, digits, '_', '.', '-'")
    if weights is not None:
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise MergeError(f"--weights names {unknown[0]!r}, which is not one of the experts ({', '.join(names)})")
        missing = [n for n in names if n not in weights]
        if missing:
            raise MergeError(f"--weights gives no weight for {', '.join(missing)}")
        if sum(weights.values()) <= 0:
            raise MergeError("--weights: the weights must not all be zero")
    inputs, save_dir = _open_all(experts, save_dir, dry_run)
    ref = inputs[0]
    _check_inputs(ref, inputs, inputs)
    vocab = _plan_vocabulary(inputs, ref.cfg.vocab_pad_multiple)
    w = [1.0] * len(inputs) if weights is None else [weights[inp.name] for inp in inputs]
    for inp, x in zip(inputs, w):
        inp.weight = x / sum(w)
    method = "mean" if weights is None else "weighted mean"
    entries = [{"index": i + 1, "name": inp.name, "source": str(inp.path), "source_expert": DOMAIN_EXPERT,
                "weight": inp.weight, "vocab_size": inp.cfg.vocab_size} for i, inp in enumerate(inputs)]
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": _now(),
        "anchor": {"index": ANCHOR, "from": ref.name, "identical_in": names},
        "experts": entries,
        "averaging": {
            "method": method,
            "weights": {inp.name: inp.weight for inp in inputs},
            "given_weights": weights,
            "accumulation": "float32, rounded once to the checkpoint dtype",
            "identical_blocks": "copied bit for bit",
            "router": "row 0 (anchor) averaged like a shared parameter; row j = expert j's row 1",
        },
        "vocabulary": {"vocab_size": vocab.vocab_size, "padded": vocab.padded, "added": vocab.added},
        "history": [{"op": "merge", "at": _now(), "experts": names}],
    }
    lines = [f"merge plan: {len(inputs)} domain experts + anchor -> {save_dir or '(dry run)'}",
             f"  expert 0 (anchor) <- {ref.name}: identical in all {len(inputs)} inputs"]
    lines += [f"  expert {i + 1} {inp.name:<12} <- {inp.path} (its expert 1); weight {inp.weight:.4g}"
              for i, inp in enumerate(inputs)]
    lines += [f"  shared parameters: {method} of {len(inputs)} inputs (identical blocks copied)",
              "  router: row 0 averaged; row j = expert j's row 1"]
    lines += [f"  vocabulary: id {a['id']} {a['token']!r} from {', '.join(a['from'])}" for a in vocab.added[:10]]
    if len(vocab.added) > 10:
        lines.append(f"  vocabulary: ... {len(vocab.added) - 10} more added ids")
    return _run(inputs, ref, merge_plan(inputs, vocab), vocab=vocab, n_experts=len(inputs) + 1,
                topk=topk, save_dir=save_dir, plan_lines=lines, report_names=names, manifest=manifest,
                hashed=list(zip(entries, inputs)), print_fn=print_fn)


# -- stage 2b: replace or add one expert ----------------------------------------------------


def upgrade(base_dir: str | Path, save_dir: str | Path | None, *, replace: Sequence[tuple[str, str | Path]] = (),
            add: Sequence[tuple[str, str | Path]] = (), topk: int | None = None, dry_run: bool = False,
            print_fn: Callable = print) -> MergeResult:
    """A merged checkpoint with some experts replaced and/or new ones added.

    Every expert not replaced, the router rows of those experts and the anchor's, and the
    shared parameters are copied bit for bit from the base; a new expert brings its expert
    1, its router row 1 and the vocabulary rows of tokens only it has.
    """
    if not replace and not add:
        raise MergeError("--base needs --replace NAME=DIR or --add NAME=DIR")
    base_dir = Path(base_dir)
    if not dry_run and save_dir is not None:
        check_output_free(save_dir)
    manifest_in = read_manifest(base_dir)
    names = [e["name"] for e in manifest_in["experts"]]
    new = list(replace) + list(add)
    for i, (n, _) in enumerate(new):
        if n in [m for m, _ in new[:i]]:
            raise MergeError(f"expert name {n!r} is given twice")
    for n, _ in replace:
        if n not in names:
            raise MergeError(f"--replace {n}: the base has no expert {n!r} (it has {', '.join(names)})")
    for n, _ in add:
        if n in names:
            raise MergeError(f"--add {n}: the base already has an expert {n!r}; use --replace")
    inputs, save_dir = _open_all([(BASE_NAME, base_dir)] + new, save_dir, dry_run)
    base = inputs[0]
    if base.cfg.num_experts != len(names) + 1:
        raise MergeError(f"{base_dir}: {base.cfg.num_experts} experts but its manifest lists {len(names)} + anchor")
    _check_inputs(base, inputs, inputs[1:])
    vocab = _plan_vocabulary(inputs, base.cfg.vocab_pad_multiple, keep_rows_of=0)
    replaced = {n: i + 1 for i, (n, _) in enumerate(replace)}
    added = list(range(len(replace) + 1, len(inputs)))
    order = names + [n for n, _ in add]

    def entry(e, inp):
        return {"index": e, "name": inp.name, "source": str(inp.path), "source_expert": DOMAIN_EXPERT,
                "weight": None, "vocab_size": inp.cfg.vocab_size}

    entries = [entry(e, inputs[replaced[n]]) if n in replaced else dict(manifest_in["experts"][e - 1], index=e)
               for e, n in enumerate(names, start=1)]
    entries += [entry(len(names) + 1 + j, inputs[i]) for j, i in enumerate(added)]
    manifest = dict(manifest_in)
    manifest.update({
        "created": _now(),
        "experts": entries,
        "base": {"source": str(base.path)},
        "vocabulary": {"vocab_size": vocab.vocab_size, "padded": vocab.padded,
                       "added": manifest_in.get("vocabulary", {}).get("added", [])
                       + [a for a in vocab.added if BASE_NAME not in a["from"]]},
        "history": list(manifest_in.get("history", [])) + [
            {"op": "upgrade", "at": _now(), "base": str(base.path),
             "replaced": [n for n, _ in replace], "added": [n for n, _ in add]}],
        "averaging": dict(manifest_in.get("averaging", {}),
                          upgrade="shared parameters, anchor and other experts copied from the base"),
    })
    hashed = [(manifest["base"], base)] + [(entries[order.index(inp.name)], inp) for inp in inputs[1:]]
    lines = [f"upgrade plan: {base_dir} -> {save_dir or '(dry run)'}"]
    for e, n in enumerate(order, start=1):
        tag = " (replaced)" if n in replaced else (" (added)" if e > len(names) else "")
        what = f"<- {entries[e - 1]['source']} (its expert 1)" if tag else "kept from the base"
        lines.append(f"  expert {e} {n:<12}{tag} {what}")
    lines.append("  shared parameters, anchor and router rows of kept experts: copied from the base")
    lines += [f"  vocabulary: id {a['id']} {a['token']!r} from {', '.join(a['from'])}"
              for a in vocab.added if BASE_NAME not in a["from"]]
    return _run(inputs, base, upgrade_plan(inputs, names, replaced, added, vocab), vocab=vocab,
                n_experts=len(order) + 1, topk=topk if topk is not None else base.cfg.moe_topk,
                save_dir=save_dir, plan_lines=lines, report_names=[BASE_NAME] + [n for n, _ in new],
                manifest=manifest, hashed=hashed, print_fn=print_fn)
