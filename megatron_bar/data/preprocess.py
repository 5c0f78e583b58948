"""Tokenize training data once, offline, into megatron indexed datasets (``tools/preprocess_data.py``).

    preprocess(PreprocessConfig(inputs=["math.jsonl.gz"], output_prefix="data/math",
                                tokenizer="ckpt/tokenizer", mode="chat", workers=8))

Inputs (local files, any mix): JSONL (``.jsonl``/``.json``/``.ndjson``), gzipped JSONL
(``*.gz``), Parquet (``.parquet``), and a dataset saved with Hugging Face ``datasets``
(``save_to_disk`` folder). Records are the trainer's (:mod:`megatron_bar.data.chat`):
``{"text": ...}`` in text mode, ``{"messages": [...]}`` in chat mode; a JSONL line or a row
that is not one is skipped, counted by reason and reported with file and line (row), and
more than ``max_bad_lines`` of them is an error naming the first.

Tokenization is exactly the trainer's on-the-fly path (``encode_text`` / ``ChatTemplate``),
so the same documents give the same ids and loss masks either way; Hugging Face
tokenizers are fed in batches (``encode_batch``, same ids as ``encode``).

Work is split into tasks (byte ranges of a JSONL file starting at line starts, line ranges
of a gzipped file, row groups of a Parquet file, row ranges of a HF dataset); worker
processes each tokenize a task into a shard, and the shards are concatenated in input
order, so the output does not depend on the number of workers. Everything is written
under a temporary folder next to the prefix and renamed into place at the end, summary
last: on an error nothing is left at the prefix.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import math
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from megatron_bar.data import indexed
from megatron_bar.data.chat import (
    ChatTemplate,
    DataError,
    TokenizedDocument,
    _parse_line,
    encode_text,
    parse_chat_record,
    parse_text_record,
)
from megatron_bar.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from megatron_bar.utils.errors import UserError

log = logging.getLogger(__name__)

MAX_SKIPPED_EXAMPLES = 100  # listed in the summary; all are counted
_BATCH = 512  # records tokenized together


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer: str  # a folder or file load_tokenizer reads (the model checkpoint's tokenizer/)
    mode: str = "text"  # text | chat
    workers: int = 1
    max_bad_lines: int = 0  # malformed lines/rows skipped (and reported) before failing
    add_special_tokens: Sequence[str] = ()  # as the trainer's data.add_special_tokens
    overwrite: bool = False
    progress: bool = True
    task_bytes: int = 8 << 20  # JSONL bytes per task (smaller when that leaves workers idle)


def build_tokenizer(path: str, mode: str, add_special_tokens: Sequence[str] = ()) -> Tokenizer:
    """The tokenizer exactly as the trainer builds it: ``data.add_special_tokens`` added
    (chat data uses the tokenizer's own chat template and adds nothing)."""
    tok = load_tokenizer(path)
    if add_special_tokens:
        tok.add_special_tokens(list(add_special_tokens))
    return tok


# --------------------------------------------------------------------------- #
# Inputs and tasks
# --------------------------------------------------------------------------- #


def input_kind(path: Path) -> str:
    """jsonl | gz | parquet | hf, from the name (a folder: a ``save_to_disk`` dataset)."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            raise DataError(f"{path}: a DatasetDict; pass one split's folder (e.g. {path / 'train'})", path=path)
        if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
            return "hf"
        raise DataError(f"{path}: a folder but not a dataset saved with datasets.save_to_disk", path=path)
    name = path.name.lower()
    if name.endswith(".gz"):
        return "gz"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raise DataError(f"{path}: cannot tell the format (expected .jsonl, .jsonl.gz, .parquet or a save_to_disk folder)", path=path)


@dataclass
class Task:
    index: int
    kind: str
    path: str
    start: int  # byte offset (jsonl), line (gz, 0-based), row group (parquet), row (hf)
    end: int
    first_line: int  # 1-based number of the first line / row, for error messages
    weight: float  # share of the input bytes, for progress and ETA


def _jsonl_splits(path: Path, chunk: int) -> list[tuple[int, int, int]]:
    """(start byte, end byte, first line number) ranges of about ``chunk`` bytes at line starts."""
    splits, start, line, newlines, pos, target = [], 0, 1, 0, 0, chunk
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            while target < pos + len(block):
                k = block.find(b"\n", max(target - 1 - pos, 0))
                if k < 0:
                    break  # the next line start is in a later block
                boundary = pos + k + 1
                next_line = newlines + block.count(b"\n", 0, k + 1) + 1
                if boundary > start:
                    splits.append((start, boundary, line))
                start, line, target = boundary, next_line, boundary + chunk
            newlines += block.count(b"\n")
            pos += len(block)
    if start < pos or not splits:
        splits.append((start, pos, line))
    return splits


def plan_tasks(inputs: Sequence[str | Path], workers: int, task_bytes: int) -> list[Task]:
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("no inputs given")
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: input not found", path=p)
    kinds = [input_kind(p) for p in paths]
    sizes = [_size(p) for p in paths]
    total = sum(sizes)
    # Enough tasks to keep every worker busy (4 each), none larger than task_bytes.
    chunk = max(64 << 10, min(task_bytes, math.ceil(total / max(1, 4 * workers))))
    tasks: list[Task] = []

    def add(kind, path, start, end, first, weight):
        tasks.append(Task(len(tasks), kind, str(path), start, end, first, weight))

    for p, kind, size in zip(paths, kinds, sizes):
        if kind == "jsonl":
            for a, b, first in _jsonl_splits(p, chunk):
                add(kind, p, a, b, first, float(b - a))
        elif kind == "gz":
            # Not seekable: one task per worker (each decompresses up to its range).
            lines = _count_gz_lines(p)
            parts = max(1, min(workers, lines))
            bounds = [round(lines * k / parts) for k in range(parts + 1)]
            for a, b in zip(bounds, bounds[1:]):
                add(kind, p, a, b, a + 1, size * (b - a) / max(lines, 1))
        elif kind == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(p).metadata
            rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            per_task = max(1, math.ceil(sum(rows) * chunk / max(size, 1)))
            group_start, acc, first = 0, 0, 1
            for g, n in enumerate(rows):
                acc += n
                if acc >= per_task or g == len(rows) - 1:
                    add(kind, p, group_start, g + 1, first, size * acc / max(sum(rows), 1))
                    group_start, first, acc = g + 1, first + acc, 0
            if not rows:
                add(kind, p, 0, 0, 1, float(size))
        else:  # hf
            n = len(_load_hf(p))
            per_task = max(1, math.ceil(n * chunk / max(size, 1)))
            for a in range(0, max(n, 1), per_task):
                b = min(n, a + per_task)
                add(kind, p, a, b, a + 1, size * (b - a) / max(n, 1))
    return tasks


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _count_gz_lines(p: Path) -> int:
    n, last = 0, b"\n"
    try:
        with gzip.open(p, "rb") as f:
            while block := f.read(1 << 24):
                n += block.count(b"\n")
                last = block[-1:]
    except (OSError, EOFError) as exc:
        raise DataError(f"{p}: not a readable gzip file ({exc})", path=p) from exc
    return n + (last != b"\n")


def _load_hf(p: Path):
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{p}: a DatasetDict; pass one split's folder", path=p)
    return ds


def _raw_items(task: Task) -> Iterator[tuple[int, object]]:
    """(line or row number, bytes of a JSONL line or a row dict), blank lines left out."""
    if task.kind == "jsonl":
        with open(task.path, "rb") as f:
            f.seek(task.start)
            data = f.read(task.end - task.start)
        for k, raw in enumerate(data.split(b"\n")):
            if raw.strip():
                yield task.first_line + k, raw
    elif task.kind == "gz":
        try:
            with gzip.open(task.path, "rb") as f:
                for k, raw in enumerate(itertools.islice(f, task.start, task.end)):
                    if raw.strip():
                        yield task.first_line + k, raw
        except (OSError, EOFError) as exc:
            raise DataError(f"{task.path}: corrupt gzip data ({exc})", path=task.path) from exc
    elif task.kind == "parquet":
        import pyarrow.parquet as pq

        row = task.first_line
        for batch in pq.ParquetFile(task.path).iter_batches(batch_size=1024, row_groups=range(task.start, task.end)):
            for item in batch.to_pylist():
                yield row, item
                row += 1
    else:
        ds = _load_hf(Path(task.path)).select(range(task.start, task.end))
        row = task.first_line
        for batch in ds.iter(batch_size=1024):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                yield row, dict(zip(keys, values))
                row += 1


def where(kind: str, path: str, line: int) -> str:
    return f"{path}:{line}" if kind in ("jsonl", "gz") else f"{path}: row {line}"


# --------------------------------------------------------------------------- #
# Tokenizing (in the workers)
# --------------------------------------------------------------------------- #


class DocumentEncoder:
    """Records -> TokenizedDocument, as the trainer tokenizes them, a batch at a time."""

    def __init__(self, tokenizer: Tokenizer, mode: str):
        self.tokenizer, self.mode = tokenizer, mode
        self._batch = None
        if isinstance(tokenizer, HFTokenizer):
            backend = tokenizer.backend
            self._batch = lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        if mode == "chat":
            self._template = ChatTemplate(tokenizer)

    def encode(self, records) -> list:
        if self.mode == "text":
            if self._batch is None:
                return [encode_text(r, self.tokenizer) for r in records]
            eos = self.tokenizer.eos_id
            return [
                _doc(ids + [eos], r.domain) for ids, r in zip(self._batch([r.text for r in records]), records)
            ]
        return [self._template.encode(r) for r in records]


def _doc(tokens, domain):
    return TokenizedDocument(tokens, [1] * len(tokens), domain)


_PARSERS = {"chat": parse_chat_record, "text": parse_text_record}
_worker: dict = {}


def _init_worker(tokenizer_path, mode, add_special, fingerprint, out_dir, counters):
    # One tokenizer thread per process: the workers are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = build_tokenizer(tokenizer_path, mode, add_special)
    if tok.fingerprint() != fingerprint:  # cannot happen unless the files change under us
        raise UserError(f"worker loaded a different tokenizer from {tokenizer_path}")
    _worker.update(tok=tok, encoder=DocumentEncoder(tok, mode), mode=mode, out=Path(out_dir), counters=counters)


def _run_task(task: Task) -> dict:
    w = _worker
    mode, parse = w["mode"], _PARSERS[w["mode"]]
    progress, docs_done, tokens_done = w["counters"]
    shard = str(w["out"] / f"shard-{task.index:06d}")
    writer = indexed.IndexedWriter(shard, mode, w["tok"].vocab_size)
    bad: list[indexed.SkippedLine] = []
    by_reason: Counter = Counter()
    batch: list = []

    def flush():
        docs = w["encoder"].encode(batch)
        for d in docs:
            writer.add(d.tokens, d.loss_mask)
        with docs_done.get_lock():
            docs_done.value += len(docs)
        with tokens_done.get_lock():
            tokens_done.value += sum(len(d.tokens) for d in docs)
        batch.clear()

    for line, raw in _raw_items(task):
        try:
            record = _parse_line(raw, parse) if isinstance(raw, bytes) else parse(raw)
        except ValueError as exc:
            reason = str(exc)
            by_reason[reason.split(":")[0]] += 1
            if len(bad) < MAX_SKIPPED_EXAMPLES:
                bad.append(indexed.SkippedLine(task.path, line, reason))
            continue
        batch.append(record)
        if len(batch) >= _BATCH:
            flush()
    if batch:
        flush()
    writer.finalize()
    with progress.get_lock():
        progress.value += task.weight
    return dict(
        index=task.index, shard=shard, documents=writer.documents, tokens=writer.tokens,
        loss_tokens=writer.loss_tokens, max_token_id=writer.max_token_id,
        bad=bad, bad_count=sum(by_reason.values()), by_reason=by_reason, kind=task.kind,
    )


# --------------------------------------------------------------------------- #
# The whole job
# --------------------------------------------------------------------------- #


@dataclass
class PreprocessResult:
    summary: indexed.IndexedSummary
    prefix: str
    seconds: float
    files: list[Path] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.summary.tokens / self.seconds if self.seconds else 0.0


def _check_output(prefix: str, mode: str, overwrite: bool) -> None:
    existing = [p for p in indexed.data_files(prefix, "chat") + [indexed.summary_path(prefix)] if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]}: output exists; choose another --output-prefix or pass --overwrite")


def preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """Run the whole job (see the module docstring); returns the summary written."""
    if cfg.mode not in indexed.MODES:
        raise ValueError(f"mode must be one of {indexed.MODES}, got {cfg.mode!r}")
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, got {cfg.workers}")
    if cfg.max_bad_lines < 0:
        raise ValueError(f"max_bad_lines must be >= 0, got {cfg.max_bad_lines}")
    prefix = str(cfg.output_prefix)
    out_parent = Path(prefix).parent
    _check_output(prefix, cfg.mode, cfg.overwrite)
    t0 = time.perf_counter()
    tok = build_tokenizer(cfg.tokenizer, cfg.mode, cfg.add_special_tokens)
    fingerprint = tok.fingerprint()
    tasks = plan_tasks(cfg.inputs, cfg.workers, cfg.task_bytes)

    out_parent.mkdir(parents=True, exist_ok=True)
    tmp = out_parent / f".{Path(prefix).name}.incomplete"
    shutil.rmtree(tmp, ignore_errors=True)  # a killed earlier run
    tmp.mkdir()
    try:
        results = _run_tasks(cfg, tasks, tok, fingerprint, tmp)
        summary = _summarize(cfg, tasks, results, tok, fingerprint)
        tmp_prefix = str(tmp / Path(prefix).name)
        indexed.merge_indexed([r["shard"] for r in results if r["documents"]], tmp_prefix, cfg.mode, tok.vocab_size)
        for path in indexed.data_files(tmp_prefix, cfg.mode):
            # tmp_prefix has the final name, so these are the final file names
            summary.files[path.name] = indexed.file_digests(path)
        indexed.summary_path(tmp_prefix).write_text(summary.to_json(), encoding="utf-8")
        files = _move_into_place(tmp_prefix, prefix, cfg.mode)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    log.debug("wrote %s: %d documents, %d tokens in %.1fs", prefix, summary.documents, summary.tokens, seconds)
    return PreprocessResult(summary, prefix, seconds, files)


def _run_tasks(cfg, tasks, tok, fingerprint, tmp: Path) -> list[dict]:
    from tqdm import tqdm

    ctx = mp.get_context("fork")
    counters = (ctx.Value("d", 0.0), ctx.Value("q", 0), ctx.Value("q", 0))
    total = sum(t.weight for t in tasks)
    init_args = (cfg.tokenizer, cfg.mode, tuple(cfg.add_special_tokens), fingerprint, str(tmp), counters)
    bar = tqdm(total=max(total, 1.0), unit="B", unit_scale=True, desc="tokenizing", disable=not cfg.progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    results: dict[int, dict] = {}
    bad_so_far = 0

    def update():
        elapsed = max(time.perf_counter() - t0, 1e-9)
        bar.n = min(counters[0].value, bar.total)
        bar.set_postfix_str(f"{counters[1].value / elapsed:,.0f} docs/s, {counters[2].value / elapsed:,.0f} tokens/s",
                            refresh=False)
        bar.refresh()

    def take(result):
        nonlocal bad_so_far
        results[result["index"]] = result
        bad_so_far += result["bad_count"]
        if bad_so_far > cfg.max_bad_lines:
            _raise_bad_lines(cfg, list(results.values()), bad_so_far)

    try:
        if cfg.workers == 1:
            previous = os.environ.get("TOKENIZERS_PARALLELISM")
            _init_worker(*init_args)
            try:
                for task in tasks:
                    take(_run_task(task))
                    update()
            finally:
                _worker.clear()
                if previous is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = previous
        else:
            # concurrent.futures, not multiprocessing.Pool: a worker that dies (the OOM
            # killer) breaks the pool with an error instead of losing its task silently
            # and waiting for it forever.
            from concurrent.futures import ProcessPoolExecutor, wait
            from concurrent.futures.process import BrokenProcessPool

            with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=init_args) as pool:
                pending = {pool.submit(_run_task, t) for t in tasks}
                try:
                    while pending:
                        done, pending = wait(pending, timeout=0.2)
                        for fut in done:
                            take(fut.result())  # re-raises a worker's exception
                        update()
                except BrokenProcessPool:
                    raise DataError(f"a tokenizer worker process died (killed, or out of memory?) "
                                    f"while preprocessing {', '.join(map(str, cfg.inputs))}") from None
                finally:
                    for fut in pending:
                        fut.cancel()
    finally:
        update()
        bar.close()
    return [results[t.index] for t in tasks]


def _raise_bad_lines(cfg, results, count):
    first_result = min((r for r in results if r["bad"]), key=lambda r: r["index"])  # input order
    first, kind = first_result["bad"][0], first_result["kind"]
    raise DataError(
        f"{where(kind, first.file, first.line)}: malformed {cfg.mode} record ({first.reason}); "
        f"{count} malformed lines exceed max_bad_lines={cfg.max_bad_lines}",
        path=first.file, line_number=first.line,
    )


def _summarize(cfg, tasks, results, tok, fingerprint) -> indexed.IndexedSummary:
    by_reason: Counter = Counter()
    examples = []
    for r in results:  # in input order
        by_reason.update(r["by_reason"])
        examples.extend(r["bad"])
    for b in examples[:MAX_SKIPPED_EXAMPLES]:
        log.warning("skipped %s: %s", b.file + ":" + str(b.line), b.reason)
    documents = sum(r["documents"] for r in results)
    if documents == 0:
        skipped = sum(by_reason.values())
        raise DataError(
            f"no documents in {', '.join(map(str, cfg.inputs))}"
            + (f" ({skipped} malformed lines skipped)" if skipped else " (empty input)")
        )
    return indexed.IndexedSummary(
        mode=cfg.mode,
        documents=documents,
        tokens=sum(r["tokens"] for r in results),
        loss_tokens=sum(r["loss_tokens"] for r in results),
        max_token_id=max(r["max_token_id"] for r in results),
        token_dtype=indexed.token_dtype(tok.vocab_size).__name__,
        tokenizer_fingerprint=fingerprint,
        tokenizer_vocab_size=tok.vocab_size,
        tokenizer=str(cfg.tokenizer),
        inputs=[str(p) for p in cfg.inputs],
        skipped_lines=sum(by_reason.values()),
        skipped_by_reason=dict(by_reason),
        skipped_examples=[{"file": b.file, "line": b.line, "reason": b.reason} for b in examples[:MAX_SKIPPED_EXAMPLES]],
    )


def _move_into_place(tmp_prefix: str, prefix: str, mode: str) -> list[Path]:
    """Rename the finished files to the prefix. The old summary goes first and the new one
    comes last, so at no moment does a summary describe files it does not match."""
    final_summary = indexed.summary_path(prefix)
    final_summary.unlink(missing_ok=True)
    moved = []
    if mode != "chat":  # a loss mask left at this prefix by an earlier chat run would mislead
        for stale in indexed.data_files(prefix, "chat")[2:]:
            stale.unlink(missing_ok=True)
    for src, dst in zip(indexed.data_files(tmp_prefix, mode), indexed.data_files(prefix, mode)):
        os.replace(src, dst)
        moved.append(dst)
    os.replace(indexed.summary_path(tmp_prefix), final_summary)
    return moved + [final_summary]
