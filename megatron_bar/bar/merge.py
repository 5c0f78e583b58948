"""BAR stage 2: compose domain experts into one MoE, and upgrade it one expert at a time.

Each domain ends stage 1 with a 2-expert checkpoint (expert 0 = the frozen anchor, expert 1
= the domain's expert) whose shared parameters - embeddings, attention, norms, LM head -
drifted apart where its stages unfroze them. :func:`merge_experts` builds the
(N+1)-expert model and :func:`upgrade` changes one (``replace`` swaps the expert of a name
for a new domain checkpoint's expert 1, ``add`` appends one). Both only build a
:class:`MergePlan` - BAR's rules, in :func:`merge_plan` and :func:`upgrade_plan` - and hand
it to one executor (:func:`_run`): the checks, the streaming, the manifest and the
divergence report are the same for both.

Everything streams: each output chunk is made from the inputs' chunks just ahead of
megatron's save writing it (:mod:`merge_io`), so memory does not grow with the number of
experts.
Nothing is written until every check has passed (the anchor compared bit for bit
included); the output folder appears only when complete, with ``bar_manifest.json``
(experts, sources, content hashes, averaging, divergence report). A non-finite input value
stops the merge, and nothing is left at the output path.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from megatron_bar.bar.divergence import GroupStats, format_divergence, outliers, report_group
from megatron_bar.bar.inputs import ANCHOR, Input, MergeError, check_anchor, check_inputs, open_input
from megatron_bar.bar.manifest import MANIFEST_FILE, MANIFEST_FORMAT, ManifestError, read_manifest
from megatron_bar.bar.merge_io import expected_tensors, intersect, local_slices, write_checkpoint
from megatron_bar.bar.roles import role_of
from megatron_bar.bar.vocab import (TOKENIZER_SUBDIR, VOCAB_PARAMS, VocabMergeError, VocabPlan, merge_tokenizers,
                                    plan_vocabulary)
from megatron_bar.model.config import ModelConfig
from megatron_bar.utils.fs import atomic_output_dir, check_output_free, incomplete_path
from megatron_bar.utils.tensors import BufferPool, one_thread_per_op

BASE_NAME = "(base)"  # the base of an upgrade, in reports (not a valid expert name)
DOMAIN_EXPERT = 1  # a domain checkpoint's own expert
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


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
    vocab: VocabPlan  # the merged vocabulary those rows make

    def tensor_slices(self, key: str) -> list[Slice]:
        group = role_of(key).group
        if group == "expert":  # [layers, experts, ...]: expert slices stacked
            return [Slice(Copy(src), 1, e, e + 1) for e, src in enumerate(self.experts)]
        if group == "router":  # [layers, experts, hidden]
            return [Slice(step, 1, e, e + 1) for e, step in enumerate(self.router_rows)]
        if group in ("embedding", "lm_head"):
            return self.vocab_rows
        return [Slice(self.shared)]


def merge_plan(inputs: Sequence[Input], vocab: VocabPlan) -> MergePlan:
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
        vocab=vocab,
    )


def upgrade_plan(inputs: Sequence[Input], names: Sequence[str], replace: dict[str, int],
                 added: Sequence[int], vocab: VocabPlan) -> MergePlan:
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
        vocab=vocab,
    )


def _vocab_rows(plan: VocabPlan, inputs: Sequence[Input], weights: Sequence[float]) -> list[Slice]:
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


def _sq_norm(x: torch.Tensor) -> float:
    """The sum of squares of the fp32 vector ``x``, a row of 1024 at a time (fp32 sums over
    millions of values drift by 1e-4 and more)."""
    cut = x.numel() - x.numel() % 1024
    rows = torch.linalg.vector_norm(x[:cut].view(-1, 1024), dim=1).double()
    return float(rows.square().sum()) + float(torch.linalg.vector_norm(x[cut:])) ** 2


class _Executor:
    """Makes any box of any output tensor from the inputs by the plan's steps, reading each
    input's part into the output (or a buffer) directly, on any thread; keeps what each
    mean adds to the divergence report."""

    BLOCK = 1 << 20  # values per step of a mean's fp32 arithmetic (its scratch memory, in cache)

    def __init__(self, inputs: Sequence[Input], plan: MergePlan, shapes: dict):
        self.inputs, self.plan, self.shapes = inputs, plan, shapes
        self.pool = BufferPool()
        self.means: dict[tuple, tuple] = {}  # (key, offsets) -> (values, all equal, [(name, distance stats)])

    def fill(self, key: str, offsets, sizes, copies: bool = True) -> torch.Tensor:
        """Box ``(offsets, sizes)`` of output tensor ``key``, in a buffer of the pool (for
        :meth:`BufferPool.give` once written); ``copies=False``: only the means are computed
        (a dry run's statistics)."""
        shape, dtype = self.shapes[key]
        box = (tuple(offsets), tuple(sizes))
        out = self.pool.take(box[1], dtype)
        for sl in self.plan.tensor_slices(key):
            off, sz = [0] * len(shape), list(shape)
            if sl.axis is not None:
                off[sl.axis], sz[sl.axis] = sl.start, sl.stop - sl.start
            part = intersect(box, (tuple(off), tuple(sz)))
            if part is None:
                continue
            dst = out[local_slices(box[0], *part)]
            if isinstance(sl.step, Zero):
                dst.zero_()
            elif isinstance(sl.step, Copy):
                if copies:
                    self._read(sl.step.src, sl, key, part, dst)
            else:
                self._mean(sl.step, sl, key, part, dst)
        return out

    def _read(self, src: Src, sl: Slice, key: str, part, out: torch.Tensor) -> torch.Tensor:
        off = list(part[0])
        if src.index is not None:
            off[sl.axis] = src.index + part[0][sl.axis] - sl.start
        return self.inputs[src.input].reader.read(key, off, part[1], out=out)

    def _blocks(self, tmp: torch.Tensor, *tensors):
        """Matching blocks of BLOCK values of the (contiguous) ``tensors``, and of ``tmp``."""
        flat = [t.view(-1) for t in tensors]
        for a in range(0, flat[0].numel(), self.BLOCK):
            part = [f[a:a + self.BLOCK] for f in flat]
            yield part + [tmp[:part[0].numel()]]

    def _mean(self, step: Mean, sl: Slice, key: str, part, dst: torch.Tensor) -> None:
        # The first input is read into the output, the others one at a time into x (memory
        # does not grow with their number); a reported input no longer loaded is read again
        # for its distance from the mean.
        work = dst if dst.is_contiguous() else self.pool.take(part[1], dst.dtype)
        acc, x = self.pool.take(part[1], torch.float32), self.pool.take(part[1], dst.dtype)
        tmp = self.pool.take((min(self.BLOCK, work.numel()),), torch.float32)
        self._read(step.srcs[0], sl, key, part, work)
        for a, w0, _ in self._blocks(tmp, acc, work):
            a.copy_(w0).mul_(step.weights[0])
        same, loaded = True, step.srcs[0]
        for src, w in zip(step.srcs[1:], step.weights[1:]):  # (x * w summed in order, in fp32)
            loaded = src
            self._read(src, sl, key, part, x)
            same = same and torch.equal(work, x)
            for a, xb, t in self._blocks(tmp, acc, x):
                a.add_(t.copy_(xb).mul_(w))
        if same:
            acc.copy_(work)
        n, dists = work.numel(), []
        sq_m = _sq_norm(acc.view(-1)) if step.report else 0.0
        for name, src in reversed(step.report):  # (the last input read is still loaded)
            d2 = dmax = 0.0
            if not (same and src in step.srcs) and n:
                if src == step.srcs[0]:
                    v = work
                elif src == loaded:
                    v = x
                else:
                    v, loaded = self._read(src, sl, key, part, x), src
                for a, vb, t in self._blocks(tmp, acc, v):
                    d = t.copy_(vb).sub_(a)
                    d2 += _sq_norm(d)
                    lo, hi = torch.aminmax(d)
                    dmax = max(dmax, -float(lo), float(hi))
            dists.append((name, d2, sq_m, dmax))
        self.means[key, part[0]] = (n, same, dists)
        if not same:
            work.copy_(acc)
        if work is not dst:
            dst.copy_(work)
            self.pool.give(work)
        self.pool.give(acc, x, tmp)

    def report(self) -> tuple[dict[str, GroupStats], dict[str, str]]:
        """The divergence statistics per report group, and each averaged tensor's status
        ("copied": its inputs all agreed), summed in key order (the same whatever the
        threads' order)."""
        stats: dict[str, GroupStats] = {}
        status: dict[str, str] = {}
        for (key, _), (n, same, dists) in sorted(self.means.items()):
            st = stats.setdefault(report_group(key), GroupStats())
            st.tensors.add(key)
            st.params += n
            st.averaged_params += 0 if same else n
            status[key] = "copied" if same and status.get(key) != "averaged" else "averaged"
            for d in dists:
                st.add(*d)
        return stats, status

    def survey(self) -> None:
        """A dry run: the means of every output tensor, a layer at a time, nothing kept."""
        for key, (shape, _) in self.shapes.items():
            if role_of(key).group == "expert":
                continue
            zeros = (0,) * (len(shape) - 1)
            boxes = [((i,) + zeros, (1,) + shape[1:]) for i in range(shape[0])] if key.startswith("decoder.layers.") \
                else [((0,) + zeros, shape)]
            for box in boxes:
                self.pool.give(self.fill(key, *box, copies=False))


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


@one_thread_per_op()
def _run(inputs: list[Input], plan: MergePlan, tokenizer: tuple, *, topk: int | None, save_dir: Path | None,
         lines: list[str], manifest: dict, hashed: list, print_fn: Callable) -> MergeResult:
    """Check, execute ``plan`` and write (``save_dir`` None: a dry run). ``inputs[0]`` is
    the reference (its anchor, architecture, dtype); ``hashed``: (manifest entry, input)
    pairs, the entry getting the input's content hash."""
    ref, vocab = inputs[0], plan.vocab
    out_cfg = _output_config(ref.cfg, len(plan.experts), vocab.vocab_size, topk)
    write_tokenizer, tok_info = tokenizer
    check_anchor(ref, inputs[1:])
    dtype = ref.reader.dtype(VOCAB_PARAMS[0])
    shapes = expected_tensors(out_cfg, dtype)
    ex = _Executor(inputs, plan, shapes)
    ignored = [f"{inp.name}: {inp.ignored}" for inp in inputs if inp.ignored]
    if ignored:
        lines.append(f"  ignored (not model weights, e.g. optimizer state): {', '.join(ignored)} tensors")
    size = sum(math.prod(s) * d.itemsize for s, d in shapes.values())
    lines.append(f"  output: {len(shapes)} tensors, {size / 2**20:.1f} MiB")
    lines[1:1] = [
        f"  model: {out_cfg.num_experts} experts, top-{out_cfg.moe_topk}"
        f"{' (renormalised)' if out_cfg.norm_topk_prob else ''}, vocabulary {vocab.vocab_size} "
        f"(padded {vocab.padded}), {out_cfg.num_layers} layers, hidden {out_cfg.hidden_size}, {dtype}"]
    for line in lines:
        print_fn(line)
    manifest.update(num_experts=out_cfg.num_experts, moe_topk=out_cfg.moe_topk,
                    norm_topk_prob=out_cfg.norm_topk_prob, tokenizer=tok_info)
    def summarise():  # (once every chunk is read: the divergence, outliers, averaged tensors)
        stats, status = ex.report()
        manifest.update(divergence={g: s.as_dict() for g, s in stats.items()}, tensors=dict(sorted(status.items())),
                        outliers=outliers({inp.name: inp.reader.max_abs for inp in inputs}))

    if save_dir is None:
        ex.survey()
        summarise()
    else:
        stale = incomplete_path(save_dir)
        if stale.exists():
            print_fn(f"removing {stale}, left behind by a merge that did not finish")
        # A full disk, found before writing or during it, is a DiskFullError naming save_dir.
        with atomic_output_dir(save_dir, need_bytes=size) as tmp:
            write_checkpoint(out_cfg, dtype, tmp, ex.fill, ex.pool.give)
            write_tokenizer(tmp / TOKENIZER_SUBDIR)
            for entry, inp in hashed:
                entry["content_hash"] = inp.reader.content_hash(inp.model_keys)
            summarise()
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    report = format_divergence(manifest["divergence"], [inp.name for inp in inputs], manifest["outliers"])
    print_fn(report)
    if save_dir is not None:
        print_fn(f"wrote {save_dir} ({out_cfg.num_experts} experts: anchor + "
                 f"{', '.join(e['name'] for e in manifest['experts'])}; top-{out_cfg.moe_topk})")
    else:
        print_fn("dry run: nothing written")
    return MergeResult(out_cfg, manifest, report, save_dir)


def _vocabulary(inputs: Sequence[Input], keep_rows_of: int | None = None) -> tuple[VocabPlan, tuple]:
    """The vocabulary plan and the merged tokenizer ``(write, info)``, or a MergeError."""
    try:
        plan = plan_vocabulary(inputs, inputs[0].cfg.vocab_pad_multiple, keep_rows_of)
        return plan, merge_tokenizers(inputs, plan)
    except VocabMergeError as e:
        raise MergeError(str(e)) from None


def _open_all(named: Sequence[tuple[str, Path]], save_dir, dry_run: bool) -> tuple[list[Input], Path | None]:
    if not dry_run:
        if save_dir is None:
            raise MergeError("an output folder is needed (or a dry run)")
        save_dir = check_output_free(save_dir)
    paths = [Path(p).resolve() for _, p in named]
    for i, p in enumerate(paths):
        if p in paths[:i]:
            raise MergeError(f"{named[i][0]} and {named[paths.index(p)][0]} are the same checkpoint ({p})")
    return [open_input(n, Path(p)) for n, p in named], (None if dry_run else Path(save_dir))


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
    check_inputs(ref, inputs, inputs)
    vocab, tokenizer = _vocabulary(inputs)
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
    return _run(inputs, merge_plan(inputs, vocab), tokenizer, topk=topk, save_dir=save_dir, lines=lines,
                manifest=manifest, hashed=list(zip(entries, inputs)), print_fn=print_fn)


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
    try:
        manifest_in = read_manifest(base_dir)
    except ManifestError as e:
        raise MergeError(str(e)) from None
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
    check_inputs(base, inputs, inputs[1:])
    vocab, tokenizer = _vocabulary(inputs, keep_rows_of=0)
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
    return _run(inputs, upgrade_plan(inputs, names, replaced, added, vocab), tokenizer,
                topk=topk if topk is not None else base.cfg.moe_topk, save_dir=save_dir, lines=lines,
                manifest=manifest, hashed=hashed, print_fn=print_fn)
