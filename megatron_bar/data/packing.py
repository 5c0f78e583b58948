"""Pack tokenized documents into fixed-length training sequences.

Shift convention. Each document is shifted *inside itself*: a document of
``n`` tokens ``t`` contributes ``n - 1`` positions with inputs ``t[:-1]``,
labels ``t[1:]`` and loss mask ``mask[1:]`` (the mask of the label token). A
packed sequence has exactly ``seq_length`` positions, so one document can hold
at most ``seq_length + 1`` tokens; longer ones are truncated to that and
counted. (Megatron's GPTDataset instead reads ``seq_length + 1`` tokens of the
concatenated stream and shifts once; shifting per document means no label ever
crosses a document boundary, so nothing has to be masked for that reason.)

Every position carries its document index within the sequence
(``document_ids``, padding is -1), a ``position_id`` that restarts at 0 at each
document start, and ``cu_seqlens`` (segment boundaries, the padding tail being
the last segment so that ``cu_seqlens[-1] == seq_length``), which is what
varlen/THD attention kernels take. :func:`document_attention_mask` builds the
equivalent dense mask.

Packing is best-fit decreasing: documents are taken longest first (ties by
input order) and each goes into the open sequence with the least room that
still fits it, or a new one. That is greedy, deterministic and wastes little
padding. Within a sequence documents keep their input order. The sequences come
out roughly longest-document-first, so shuffle them in the sampler.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_bar.data.chat import TokenizedDocument

PADDING_DOCUMENT_ID = -1


@dataclass
class PackedSequence:
    """One training sequence; every tensor has length ``seq_length`` except ``cu_seqlens``.

    Padding positions have token and label ``pad_id``, loss mask 0 and
    document id -1 (labels stay valid ids so any cross-entropy kernel accepts
    them; the loss mask is what excludes them).
    """

    tokens: torch.Tensor  # int64 [L]
    labels: torch.Tensor  # int64 [L]
    loss_mask: torch.Tensor  # float32 [L]
    position_ids: torch.Tensor  # int64 [L], 0 at each document start
    document_ids: torch.Tensor  # int64 [L], 0, 1, ... per document; -1 for padding
    cu_seqlens: torch.Tensor  # int32 [num_segments + 1], padding tail is the last segment
    source_indices: tuple[int, ...]  # index of each packed document in the input list

    @property
    def num_documents(self) -> int:
        return len(self.source_indices)


@dataclass
class PackingStats:
    num_documents: int = 0  # documents given
    num_packed_documents: int = 0  # documents placed in a sequence
    num_sequences: int = 0
    num_truncated: int = 0  # documents longer than seq_length + 1 tokens
    num_truncated_tokens: int = 0  # tokens dropped by truncation
    num_too_short: int = 0  # documents with < 2 tokens (no position to train); dropped
    num_positions: int = 0  # non-padding positions
    num_padding: int = 0  # padding positions
    num_loss_tokens: int = 0  # positions with loss_mask 1

    @property
    def utilization(self) -> float:
        total = self.num_positions + self.num_padding
        return self.num_positions / total if total else 0.0


def _best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin indices of ``lengths`` into bins of ``capacity``; each bin lists indices in input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))  # smallest room >= n; ties -> oldest bin
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return [sorted(b) for b in bins]


def pack_documents(
    documents: Sequence[TokenizedDocument], seq_length: int, pad_id: int
) -> tuple[list[PackedSequence], PackingStats]:
    """Pack ``documents`` into sequences of ``seq_length`` positions (see module docstring)."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    stats = PackingStats(num_documents=len(documents))
    max_tokens = seq_length + 1

    kept: list[int] = []  # input indices of documents that produce >= 1 position
    spans: list[tuple[list[int], list[int]]] = []  # (tokens, mask) after truncation
    for i, doc in enumerate(documents):
        tokens, mask = list(doc.tokens), list(doc.loss_mask)
        if len(tokens) > max_tokens:
            stats.num_truncated += 1
            stats.num_truncated_tokens += len(tokens) - max_tokens
            tokens, mask = tokens[:max_tokens], mask[:max_tokens]
        if len(tokens) < 2:
            stats.num_too_short += 1
            continue
        kept.append(i)
        spans.append((tokens, mask))

    bins = _best_fit_decreasing([len(t) - 1 for t, _ in spans], seq_length)
    sequences = [_build_sequence([kept[j] for j in b], [spans[j] for j in b], seq_length, pad_id) for b in bins]

    stats.num_packed_documents = len(kept)
    stats.num_sequences = len(sequences)
    for seq in sequences:
        real = int((seq.document_ids >= 0).sum())
        stats.num_positions += real
        stats.num_padding += seq_length - real
        stats.num_loss_tokens += int(seq.loss_mask.sum())
    return sequences, stats


def _build_sequence(
    source_indices: list[int], spans: list[tuple[list[int], list[int]]], seq_length: int, pad_id: int
) -> PackedSequence:
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(seq_length, dtype=torch.float32)
    position_ids = torch.zeros(seq_length, dtype=torch.long)
    document_ids = torch.full((seq_length,), PADDING_DOCUMENT_ID, dtype=torch.long)
    cu = [0]
    pos = 0
    for doc_index, (toks, mask) in enumerate(spans):
        n = len(toks) - 1
        end = pos + n
        tokens[pos:end] = torch.tensor(toks[:-1], dtype=torch.long)
        labels[pos:end] = torch.tensor(toks[1:], dtype=torch.long)
        loss_mask[pos:end] = torch.tensor(mask[1:], dtype=torch.float32)
        position_ids[pos:end] = torch.arange(n)
        document_ids[pos:end] = doc_index
        cu.append(end)
        pos = end
    if pos < seq_length:  # the padding tail is its own segment
        position_ids[pos:] = torch.arange(seq_length - pos)
        cu.append(seq_length)
    return PackedSequence(
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=position_ids,
        document_ids=document_ids,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        source_indices=tuple(source_indices),
    )


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Causal + same-document attention mask, ``True`` = masked out (Megatron's convention).

    ``document_ids`` is ``[..., L]``; the result is ``[..., L, L]`` where entry
    ``[q, k]`` is False exactly when ``k <= q`` and both are in the same
    document. Padding (id -1) attends causally within the padding tail, so no
    row is fully masked (which would give NaN in softmax). For Megatron's
    ``[b, 1, s, s]`` layout, ``unsqueeze(1)`` the batched result.
    """
    length = document_ids.shape[-1]
    same_document = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    return ~(same_document & causal)


@dataclass
class PackedBatch:
    """A micro-batch of packed sequences, stacked for the trainer."""

    tokens: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L] float
    position_ids: torch.Tensor  # [B, L]
    document_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, 1, L, L] bool, True = masked
    # Segment boundaries over the flattened [B * L] batch (THD layout), int32.
    cu_seqlens: torch.Tensor
    max_seqlen: int  # longest segment, for varlen kernels


def collate_packed(sequences: Sequence[PackedSequence]) -> PackedBatch:
    """Stack sequences of equal length into a :class:`PackedBatch`."""
    if not sequences:
        raise ValueError("collate_packed: no sequences")
    length = sequences[0].tokens.numel()
    if any(s.tokens.numel() != length for s in sequences):
        raise ValueError("collate_packed: sequences differ in length")
    document_ids = torch.stack([s.document_ids for s in sequences])
    cu = [sequences[0].cu_seqlens]
    for b, s in enumerate(sequences[1:], start=1):
        cu.append(s.cu_seqlens[1:] + b * length)  # drop the repeated 0 / shift into the flat batch
    cu_seqlens = torch.cat(cu).to(torch.int32)
    return PackedBatch(
        tokens=torch.stack([s.tokens for s in sequences]),
        labels=torch.stack([s.labels for s in sequences]),
        loss_mask=torch.stack([s.loss_mask for s in sequences]),
        position_ids=torch.stack([s.position_ids for s in sequences]),
        document_ids=document_ids,
        attention_mask=document_attention_mask(document_ids).unsqueeze(1),
        cu_seqlens=cu_seqlens,
        max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
    )
