"""On-disk tokenized datasets: megatron-core's indexed format plus a loss mask and a summary.

A dataset written by :mod:`megatron_bar.data.preprocess` at prefix ``P`` is:

* ``P.bin`` / ``P.idx``: the token ids, one megatron ``IndexedDataset`` sequence per
  document (``IndexedDatasetBuilder``; uint16 when the vocabulary fits, else int32).
  Any megatron tool reads these files as they are.
* ``P.loss_mask.bin`` / ``P.loss_mask.idx`` (chat mode only): a second indexed dataset with
  the same document boundaries holding the loss mask (uint8, 1 = trained target), so SFT
  keeps training on assistant tokens only. Text mode trains on every token and has none.
* ``P.summary.json``: what the dataset is (mode, documents, tokens, the tokenizer's
  fingerprint and vocabulary size, the largest token id, byte size, sha256 and per-chunk
  XXH3-64 hashes of every file, skipped input lines with reasons). It is renamed into
  place last, so a dataset without it is incomplete; the trainer refuses it.

:func:`open_indexed` is the one way in: it checks the files against the summary (a
truncated or corrupt ``.idx``/``.bin`` is a :class:`~megatron_bar.data.chat.DataError`
naming the file), and, given the model's tokenizer, that the dataset was tokenized with
it (same fingerprint) and has no id beyond its vocabulary. Hashing a cluster-scale
``.bin`` in full at every start would take minutes, so a start hashes the ``.idx`` files
in full and a seeded sample of ``SAMPLE_CHUNKS`` chunks of each ``.bin``; the full check
is ``verify_checksums`` (``tools/preprocess_data.py --verify``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from struct import error as struct_error  # a header cut short
from typing import Iterator

import numpy
import xxhash
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_bar.data.chat import DataError, TokenizedDocument
from megatron_bar.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = "megatron_bar.indexed"
FORMAT_VERSION = 1
SUMMARY_SUFFIX = ".summary.json"
MASK_SUFFIX = ".loss_mask"
MODES = ("text", "chat")
MASK_DTYPE = numpy.uint8


def summary_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}{SUMMARY_SUFFIX}")


def mask_prefix(prefix: str | os.PathLike) -> str:
    return f"{prefix}{MASK_SUFFIX}"


def data_files(prefix: str | os.PathLike, mode: str) -> list[Path]:
    """The data files of a dataset at ``prefix`` (without the summary), in writing order."""
    prefixes = [str(prefix)] + ([mask_prefix(prefix)] if mode == "chat" else [])
    return [Path(f(p)) for p in prefixes for f in (get_bin_path, get_idx_path)]


def token_dtype(vocab_size: int):
    """megatron's choice: uint16 while the vocabulary fits, int32 beyond."""
    return DType.optimal_dtype(vocab_size)


# Chunks of a data file hashed one by one (XXH3-64) by preprocessing; a start checks
# SAMPLE_CHUNKS of them per .bin, chosen by a seed.
CHUNK_BYTES = 1 << 22
SAMPLE_CHUNKS = 8


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def file_digests(path: Path, chunk_bytes: int | None = None) -> dict:
    """What the summary records of a data file, in one pass: its size, sha256 and the
    XXH3-64 of each ``chunk_bytes`` chunk."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    whole, chunks = hashlib.sha256(), []
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            whole.update(chunk)
            chunks.append(xxhash.xxh3_64_hexdigest(chunk))
    return {"bytes": path.stat().st_size, "sha256": whole.hexdigest(),
            "chunk_bytes": chunk_bytes, "chunk_xxh3_64": chunks}


def sampled_chunks(num_chunks: int, seed: int, k: int = SAMPLE_CHUNKS) -> list[int]:
    """The chunks of a file a start checks: all of a small file, else ``k`` chosen by ``seed``."""
    if num_chunks <= k:
        return list(range(num_chunks))
    return sorted(numpy.random.default_rng(seed).choice(num_chunks, size=k, replace=False).tolist())


def _check_chunks(path: Path, want: dict, chunks: list[int]) -> None:
    size, hashes = want["chunk_bytes"], want["chunk_xxh3_64"]
    with open(path, "rb") as f:
        for i in chunks:
            f.seek(i * size)
            if xxhash.xxh3_64_hexdigest(f.read(size)) != hashes[i]:
                raise DataError(f"{path}: bytes {i * size}-{min((i + 1) * size, want['bytes'])} differ "
                                "from the hash preprocessing recorded: the file is corrupt", path=path)


@dataclass
class SkippedLine:
    file: str
    line: int  # 1-based line (JSONL) or row (Parquet / HF datasets) number
    reason: str


@dataclass
class IndexedSummary:
    """Contents of ``P.summary.json``."""

    mode: str
    documents: int
    tokens: int
    loss_tokens: int
    max_token_id: int
    token_dtype: str
    tokenizer_fingerprint: str
    tokenizer_vocab_size: int
    tokenizer: str  # where it was loaded from (informational)
    inputs: list[str]
    files: dict[str, dict] = field(default_factory=dict)  # file name -> file_digests()
    skipped_lines: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[dict] = field(default_factory=list)  # the first ones, with file + line
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def read(cls, prefix: str | os.PathLike) -> "IndexedSummary":
        path = summary_path(prefix)
        if not path.is_file():
            hint = ""
            if Path(get_idx_path(str(prefix))).exists():
                hint = " (the .idx/.bin exist: an interrupted preprocessing, or not written by tools/preprocess_data.py)"
            raise DataError(f"{path}: no dataset summary at prefix {prefix}{hint}", path=path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: unreadable dataset summary ({exc})", path=path) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"{path}: not a {FORMAT} summary", path=path)
        if data.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{path}: format_version {data.get('format_version')!r}, this code reads {FORMAT_VERSION}", path=path
            )
        try:
            return cls(**data)
        except TypeError as exc:
            raise DataError(f"{path}: malformed dataset summary ({exc})", path=path) from exc


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


class IndexedWriter:
    """Writes documents (tokens, and the loss mask in chat mode) at ``prefix``.

    Used for the shards each preprocessing worker writes; :func:`merge_indexed` joins them.
    """

    def __init__(self, prefix: str | os.PathLike, mode: str, vocab_size: int):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.prefix, self.mode, self.vocab_size = str(prefix), mode, vocab_size
        self.dtype = token_dtype(vocab_size)
        self._tokens = IndexedDatasetBuilder(get_bin_path(self.prefix), dtype=self.dtype)
        self._mask = (
            IndexedDatasetBuilder(get_bin_path(mask_prefix(self.prefix)), dtype=MASK_DTYPE) if mode == "chat" else None
        )
        self.documents = self.tokens = self.loss_tokens = 0
        self.max_token_id = -1

    def add(self, tokens, loss_mask=None) -> None:
        ids = numpy.asarray(tokens, dtype=numpy.int64)
        if ids.size == 0:
            raise ValueError("empty document")
        top = int(ids.max())
        if top >= self.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"token id {top} outside the vocabulary of {self.vocab_size}")
        self._tokens.add_document(ids, [ids.size])
        if self._mask is not None:
            mask = numpy.asarray(loss_mask, dtype=MASK_DTYPE)
            if mask.shape != ids.shape:
                raise ValueError(f"loss mask of {mask.size} for {ids.size} tokens")
            self._mask.add_document(mask, [mask.size])
            self.loss_tokens += int(mask.sum())
        else:
            self.loss_tokens += ids.size
        self.documents += 1
        self.tokens += ids.size
        self.max_token_id = max(self.max_token_id, top)

    def finalize(self) -> None:
        self._tokens.finalize(get_idx_path(self.prefix))
        if self._mask is not None:
            self._mask.finalize(get_idx_path(mask_prefix(self.prefix)))


def merge_indexed(shards: list[str], prefix: str | os.PathLike, mode: str, vocab_size: int) -> None:
    """Concatenate shard datasets, in order, into one at ``prefix``.

    What megatron's ``IndexedDatasetBuilder.add_index`` does, without the ``gc.collect()``
    it runs per shard (a fraction of a second each in a process holding torch, and there
    is a shard per task)."""
    pairs = [(str(prefix), list(shards), token_dtype(vocab_size))]
    if mode == "chat":
        pairs.append((mask_prefix(prefix), [mask_prefix(s) for s in shards], MASK_DTYPE))
    for out, parts, dtype in pairs:
        builder = IndexedDatasetBuilder(get_bin_path(out), dtype=dtype)
        for part in parts:
            shard = IndexedDataset(part, multimodal=False, mmap=True)
            if shard.index.dtype != dtype:
                raise ValueError(f"{part}: dtype {shard.index.dtype} != {dtype}")
            offset = len(builder.sequence_lengths)
            builder.sequence_lengths.extend(shard.sequence_lengths.tolist())
            builder.document_indices.extend((offset + shard.document_indices[1:]).tolist())
            del shard
            with open(get_bin_path(part), "rb") as f:
                shutil.copyfileobj(f, builder.data_file, 1 << 24)
        builder.finalize(get_idx_path(out))


# --------------------------------------------------------------------------- #
# Reading and checking
# --------------------------------------------------------------------------- #


@dataclass
class IndexedSource:
    """An opened, checked dataset: the tokens, the mask (chat) and the summary."""

    prefix: str
    summary: IndexedSummary
    tokens: IndexedDataset
    loss_mask: IndexedDataset | None

    @property
    def num_documents(self) -> int:
        return len(self.tokens.document_indices) - 1

    def document(self, i: int) -> TokenizedDocument:
        ids = self.tokens[i].astype(numpy.int64).tolist()
        mask = self.loss_mask[i].astype(numpy.int64).tolist() if self.loss_mask is not None else [1] * len(ids)
        return TokenizedDocument(ids, mask)

    def documents(self) -> Iterator[TokenizedDocument]:
        for i in range(self.num_documents):
            yield self.document(i)


def _open_megatron(prefix: str) -> IndexedDataset:
    """megatron's IndexedDataset with its asserts / numpy errors turned into a DataError."""
    idx = get_idx_path(prefix)
    try:
        return IndexedDataset(prefix, multimodal=False, mmap=True)
    except (AssertionError, ValueError, OSError, struct_error) as exc:
        raise DataError(f"{idx}: corrupt or truncated index ({exc or type(exc).__name__})", path=idx) from exc


def _check_bin_size(ds: IndexedDataset, prefix: str) -> None:
    lengths, pointers = ds.index.sequence_lengths, ds.index.sequence_pointers
    expected = int(pointers[-1]) + int(lengths[-1]) * ds.index.dtype_size if len(lengths) else 0
    actual = os.path.getsize(get_bin_path(prefix))
    if actual != expected:
        raise DataError(
            f"{get_bin_path(prefix)}: {actual} bytes, its index describes {expected}: truncated or not the "
            f"data file of {get_idx_path(prefix)}",
            path=get_bin_path(prefix),
        )


def open_indexed(
    prefix: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    *,
    mode: str | None = None,
    verify_checksums: bool = False,
    sample_seed: int = 0,
) -> IndexedSource:
    """Open the dataset at ``prefix`` and check it; every problem is a DataError naming a file.

    Always checked (no pass over the .bin data): the summary, every file's byte size
    against the summary, the index structure, the .bin size against the index, the
    document/token counts, the mask's document boundaries against the tokens', the
    ``.idx`` files' sha256 (in full), and ``SAMPLE_CHUNKS`` chunks of each ``.bin`` chosen
    by ``sample_seed`` against their recorded hashes (every chunk of a small file).
    ``tokenizer``: the dataset must have been tokenized with it (same fingerprint) and its
    largest id must be below its vocabulary size. ``mode``: expected ``text`` or ``chat``.
    ``verify_checksums``: compare every file's sha256 with the summary (reads it all).
    """
    prefix = str(prefix)
    summary = IndexedSummary.read(prefix)
    if mode is not None and summary.mode != mode:
        raise DataError(f"{prefix}: a {summary.mode} dataset, used as {mode}", path=summary_path(prefix))
    for path in data_files(prefix, summary.mode):
        want = summary.files.get(path.name)
        if not path.is_file():
            raise DataError(f"{path}: missing (dataset at prefix {prefix})", path=path)
        if want is None:
            raise DataError(f"{summary_path(prefix)}: does not describe {path.name}", path=summary_path(prefix))
        size = path.stat().st_size
        if size != want["bytes"]:
            raise DataError(
                f"{path}: {size} bytes, the summary says {want['bytes']}: truncated or overwritten", path=path
            )
    tokens = _open_megatron(prefix)
    _check_bin_size(tokens, prefix)
    if len(tokens.document_indices) - 1 != summary.documents or int(tokens.sequence_lengths.sum()) != summary.tokens:
        raise DataError(
            f"{get_idx_path(prefix)}: {len(tokens.document_indices) - 1} documents / "
            f"{int(tokens.sequence_lengths.sum())} tokens, the summary says {summary.documents} / {summary.tokens}",
            path=get_idx_path(prefix),
        )
    if tokens.index.dtype != token_dtype(summary.tokenizer_vocab_size):
        raise DataError(f"{get_idx_path(prefix)}: token dtype {tokens.index.dtype.__name__} != summary's", path=get_idx_path(prefix))
    mask = None
    if summary.mode == "chat":
        mp = mask_prefix(prefix)
        mask = _open_megatron(mp)
        _check_bin_size(mask, mp)
        if not (
            numpy.array_equal(mask.sequence_lengths, tokens.sequence_lengths)
            and numpy.array_equal(mask.document_indices, tokens.document_indices)
        ):
            raise DataError(f"{get_idx_path(mp)}: document boundaries differ from {get_idx_path(prefix)}", path=get_idx_path(mp))
    _check_contents(prefix, summary, verify_checksums, sample_seed)
    if tokenizer is not None:
        check_tokenizer(prefix, summary, tokenizer)
    return IndexedSource(prefix, summary, tokens, mask)


def _check_contents(prefix: str, summary: IndexedSummary, full: bool, seed: int) -> None:
    """Same bytes as preprocessing wrote: in full (``full``), else the ``.idx`` files in
    full and a seeded sample of each ``.bin``'s chunks (open_indexed's docstring)."""
    for number, path in enumerate(data_files(prefix, summary.mode)):
        want = summary.files[path.name]
        if full or path.suffix == ".idx":
            if sha256_file(path) != want["sha256"]:
                raise DataError(f"{path}: sha256 differs from the summary: the file is corrupt", path=path)
        elif "chunk_xxh3_64" in want:
            _check_chunks(path, want, sampled_chunks(len(want["chunk_xxh3_64"]), seed + number))
        else:
            log.warning("%s: its summary has no per-chunk hashes (written by an older "
                        "preprocess_data.py): only its size is checked at start; "
                        "tools/preprocess_data.py --verify %s checks it in full", path, prefix)


def check_tokenizer(prefix: str, summary: IndexedSummary, tokenizer: Tokenizer) -> None:
    """A dataset tokenized with another vocabulary is an error, not silent garbage."""
    if summary.max_token_id >= tokenizer.vocab_size:
        raise DataError(
            f"dataset {prefix}: token id {summary.max_token_id} is beyond the model tokenizer's vocabulary "
            f"of {tokenizer.vocab_size}",
            path=summary_path(prefix),
        )
    mine = tokenizer.fingerprint()
    if summary.tokenizer_fingerprint != mine:
        raise DataError(
            f"dataset {prefix} was tokenized with another tokenizer: fingerprint "
            f"{summary.tokenizer_fingerprint[:12]}... (vocabulary {summary.tokenizer_vocab_size}, from "
            f"{summary.tokenizer}) but the model's tokenizer is {mine[:12]}... (vocabulary {tokenizer.vocab_size}). "
            f"Preprocess it again with the model's tokenizer "
            f"(with the same data.add_special_tokens)",
            path=summary_path(prefix),
        )
