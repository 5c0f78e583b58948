import pytest
import torch

from megatron_bar.data.chat import TokenizedDocument, tokenize_records
from megatron_bar.data.packing import collate_packed, document_attention_mask, pack_documents

PAD = 0


def _doc(start, n, mask=None):
    """A document with distinctive ids start, start+1, ..."""
    tokens = list(range(start, start + n))
    return TokenizedDocument(tokens, mask if mask is not None else [1] * n)


def _segments(seq):
    """(document index, slice) per document, found from document_ids alone."""
    ids = seq.document_ids.tolist()
    out = {}
    for pos, d in enumerate(ids):
        if d >= 0:
            out.setdefault(d, []).append(pos)
    return out


def test_each_document_is_shifted_inside_itself():
    docs = [_doc(100, 5), _doc(200, 3), _doc(300, 4)]
    seqs, stats = pack_documents(docs, seq_length=16, pad_id=PAD)
    assert len(seqs) == 1
    seq = seqs[0]
    assert sorted(seq.source_indices) == [0, 1, 2]
    for d, positions in _segments(seq).items():
        src = docs[seq.source_indices[d]].tokens
        assert seq.tokens[positions].tolist() == src[:-1]
        assert seq.labels[positions].tolist() == src[1:]
        assert seq.position_ids[positions].tolist() == list(range(len(src) - 1))
    # 4 + 2 + 3 real positions, the rest padding.
    assert stats.num_positions == 9 and stats.num_padding == 7
    pad = seq.document_ids == -1
    assert pad.sum() == 7
    assert (seq.loss_mask[pad] == 0).all() and (seq.labels[pad] == PAD).all() and (seq.tokens[pad] == PAD).all()
    assert seq.cu_seqlens.tolist() == [0, 4, 6, 9, 16]
    assert seq.cu_seqlens.dtype == torch.int32


def test_position_ids_restart_at_each_document():
    docs = [_doc(10 * i + 1, n) for i, n in enumerate([3, 7, 2, 5, 4, 6])]
    seqs, _ = pack_documents(docs, seq_length=12, pad_id=PAD)
    for seq in seqs:
        ids = seq.document_ids.tolist()
        for pos in range(len(ids)):
            # Independent count: positions before this one in the same segment.
            start = pos
            while start > 0 and ids[start - 1] == ids[pos]:
                start -= 1
            assert seq.position_ids[pos] == pos - start
            assert (seq.position_ids[pos] == 0) == (pos == 0 or ids[pos - 1] != ids[pos])


def test_loss_mask_is_the_label_tokens_mask():
    doc = TokenizedDocument([1, 2, 3, 4, 5], [0, 0, 1, 1, 0])
    (seq,), _ = pack_documents([doc], seq_length=6, pad_id=PAD)
    assert seq.loss_mask.dtype == torch.float32
    assert seq.loss_mask.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # mask[1:], then padding


def test_truncation_and_too_short_are_counted():
    docs = [_doc(1, 15), _doc(100, 11), _doc(200, 1), _doc(300, 0)]
    seqs, stats = pack_documents(docs, seq_length=10, pad_id=PAD)
    assert stats.num_documents == 4
    assert stats.num_truncated == 1  # 15 > 11 tokens; 11 tokens fit exactly
    assert stats.num_truncated_tokens == 4
    assert stats.num_too_short == 2
    assert stats.num_packed_documents == 2
    assert len(seqs) == 2
    first = next(s for s in seqs if s.source_indices == (0,))
    assert first.tokens.tolist() == list(range(1, 11)) and first.labels.tolist() == list(range(2, 12))
    assert stats.utilization == 1.0


def test_best_fit_decreasing_is_deterministic():
    # Positions per document: 6, 4, 5, 5, 3 into 10-position sequences.
    docs = [_doc(1, 7), _doc(20, 5), _doc(40, 6), _doc(60, 6), _doc(80, 4)]
    seqs, stats = pack_documents(docs, seq_length=10, pad_id=PAD)
    # 6 opens seq A; 5 opens B; 5 fits B exactly; 4 fits A exactly; 3 opens C.
    assert [s.source_indices for s in seqs] == [(0, 1), (2, 3), (4,)]
    assert stats.num_padding == 7
    again, _ = pack_documents(docs, seq_length=10, pad_id=PAD)
    for a, b in zip(seqs, again):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.document_ids, b.document_ids)


def test_every_document_is_packed_once():
    lengths = [(7 * i) % 23 + 2 for i in range(60)]
    docs = [_doc(1000 * i, n) for i, n in enumerate(lengths)]
    seqs, stats = pack_documents(docs, seq_length=32, pad_id=PAD)
    placed = sorted(i for s in seqs for i in s.source_indices)
    assert placed == list(range(60))
    assert stats.num_positions == sum(n - 1 for n in lengths)
    assert stats.num_sequences * 32 == stats.num_positions + stats.num_padding


def test_attention_mask_matches_brute_force():
    document_ids = torch.tensor([0, 0, 0, 1, 1, 2, -1, -1])
    mask = document_attention_mask(document_ids)
    assert mask.shape == (8, 8) and mask.dtype == torch.bool
    for q in range(8):
        for k in range(8):
            allowed = k <= q and document_ids[q] == document_ids[k]
            assert mask[q, k].item() == (not allowed)
    assert not mask.all(dim=-1).any()  # every row attends to something (itself)


def test_attention_mask_blocks_cross_document_information():
    torch.manual_seed(0)
    docs = [_doc(1, 5), _doc(50, 4), _doc(90, 6)]
    (seq,), _ = pack_documents(docs, seq_length=14, pad_id=PAD)
    mask = document_attention_mask(seq.document_ids)
    length, dim = 14, 8
    q, k, v = (torch.randn(length, dim) for _ in range(3))

    def attend(values):
        scores = (q @ k.T).masked_fill(mask, float("-inf"))
        return torch.softmax(scores, dim=-1) @ values

    out = attend(v)
    first_doc = seq.document_ids == 0
    v2 = v.clone()
    v2[first_doc] += 100.0  # change everything in document 0
    out2 = attend(v2)
    assert torch.allclose(out[~first_doc], out2[~first_doc])
    assert not torch.allclose(out[first_doc], out2[first_doc])


def test_collate_packed():
    docs = [_doc(1, 5), _doc(50, 9), _doc(90, 6)]
    seqs, _ = pack_documents(docs, seq_length=8, pad_id=PAD)
    batch = collate_packed(seqs)
    b = len(seqs)
    assert batch.tokens.shape == (b, 8) and batch.attention_mask.shape == (b, 1, 8, 8)
    assert batch.cu_seqlens[0] == 0 and batch.cu_seqlens[-1] == b * 8
    seg_lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    per_seq = [len(s.cu_seqlens) - 1 for s in seqs]
    assert len(seg_lengths) == sum(per_seq)
    assert batch.max_seqlen == max(seg_lengths) == 8
    with pytest.raises(ValueError):
        collate_packed([])


def test_packing_chat_keeps_trained_tokens(spm_tokenizer):
    from megatron_bar.data.chat import ChatRecord, Message, TextRecord

    records = [
        ChatRecord((Message("user", "ka lo"), Message("assistant", "mi = 1."))),
        TextRecord("the and ka"),
        ChatRecord((Message("user", "xo?"), Message("assistant", "ze"), Message("user", "?"), Message("assistant", "fi"))),
    ]
    docs = tokenize_records(records, spm_tokenizer)
    seqs, stats = pack_documents(docs, seq_length=64, pad_id=spm_tokenizer.pad_id)
    # Every trained token except a document's first is a label somewhere (the first is never a target).
    assert stats.num_loss_tokens == sum(sum(d.loss_mask[1:]) for d in docs)
    trained_labels = [t for s in seqs for t, m in zip(s.labels.tolist(), s.loss_mask.tolist()) if m]
    assert trained_labels.count(spm_tokenizer.eos_id) == 4  # 3 assistant turns + 1 text document


def test_rejects_bad_seq_length():
    with pytest.raises(ValueError):
        pack_documents([_doc(1, 3)], seq_length=0, pad_id=PAD)
