"""Data path for BAR training: tokenizers, chat/text records, packing, mixtures.

Typical use::

    tok = load_tokenizer("path/to/olmo2")           # folder with tokenizer.json
    records = read_jsonl("math_sft.jsonl", "chat", max_bad_lines=10).records
    docs = tokenize_records(records, tok)
    sequences, stats = pack_documents(docs, seq_length=4096, pad_id=tok.pad_id)

At scale, tokenize once with ``tools/preprocess_data.py`` (:mod:`megatron_bar.data.preprocess`)
into megatron indexed datasets (:mod:`megatron_bar.data.indexed`), blended at training time
by megatron's BlendedMegatronDatasetBuilder (:mod:`megatron_bar.data.blended`). Those
modules import megatron-core, so they are not imported here.
"""

from megatron_bar.data.chat import (
    CHAT_SPECIAL_TOKENS,
    ROLE_MARKERS,
    ROLES,
    ChatRecord,
    ChatTemplate,
    DataError,
    JsonlReadResult,
    Message,
    Record,
    TextRecord,
    TokenizedDocument,
    encode_text,
    parse_chat_record,
    parse_text_record,
    read_jsonl,
    tokenize_records,
)
from megatron_bar.data.mixture import MixtureResult, mix_datasets, stratified_sample
from megatron_bar.data.packing import (
    PackedBatch,
    PackedSequence,
    PackingStats,
    collate_packed,
    document_attention_mask,
    pack_documents,
)
from megatron_bar.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "CHAT_SPECIAL_TOKENS",
    "ROLE_MARKERS",
    "ROLES",
    "ChatRecord",
    "ChatTemplate",
    "DataError",
    "HFTokenizer",
    "JsonlReadResult",
    "Message",
    "MixtureResult",
    "PackedBatch",
    "PackedSequence",
    "PackingStats",
    "Record",
    "SentencePieceTokenizer",
    "TextRecord",
    "TokenizedDocument",
    "Tokenizer",
    "collate_packed",
    "document_attention_mask",
    "encode_text",
    "load_tokenizer",
    "mix_datasets",
    "pack_documents",
    "parse_chat_record",
    "parse_text_record",
    "read_jsonl",
    "stratified_sample",
    "tokenize_records",
    "train_sentencepiece",
]
