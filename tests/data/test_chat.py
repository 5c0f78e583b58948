import json
import logging

import pytest

from megatron_bar.data.chat import (
    CHAT_SPECIAL_TOKENS,
    ChatRecord,
    ChatTemplate,
    DataError,
    Message,
    TextRecord,
    add_chat_special_tokens,
    encode_text,
    read_jsonl,
    tokenize_records,
)

RECORD = ChatRecord(
    messages=(
        Message("system", "You are terse."),
        Message("user", "ka lo mi = ?"),
        Message("assistant", "ka  lo\nmi = 42."),
        Message("tool", '{"result": 42}'),
        Message("assistant", "Done: 42 🙂"),
    ),
    domain="math",
)


@pytest.fixture
def template(any_tokenizer):
    add_chat_special_tokens(any_tokenizer)
    return ChatTemplate(any_tokenizer)


def _mask_runs(tokens, mask):
    """Maximal runs of consecutive tokens with mask 1."""
    runs, current = [], []
    for t, m in zip(tokens, mask):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_template_renders_documented_string(template):
    tok = template.tokenizer
    bos, eos = tok.id_to_token(tok.bos_id), tok.id_to_token(tok.eos_id)
    expected = (
        f"{bos}<|system|>\nYou are terse.\n<|user|>\nka lo mi = ?\n"
        f"<|assistant|>\nka  lo\nmi = 42.{eos}\n<|tool|>\n{{\"result\": 42}}\n"
        f"<|assistant|>\nDone: 42 🙂{eos}"
    )
    doc = template.encode(RECORD)
    assert template.render_text(RECORD) == expected
    assert tok.decode(doc.tokens) == expected
    assert doc.domain == "math"


def test_role_markers_are_single_tokens(template):
    doc = template.encode(RECORD)
    tok = template.tokenizer
    for role, count in (("system", 1), ("user", 1), ("assistant", 2), ("tool", 1)):
        assert doc.tokens.count(tok.token_to_id(f"<|{role}|>")) == count


def test_loss_mask_covers_exactly_assistant_content_and_eos(template):
    tok = template.tokenizer
    doc = template.encode(RECORD)
    assert len(doc.tokens) == len(doc.loss_mask)
    assert set(doc.loss_mask) == {0, 1}

    runs = _mask_runs(doc.tokens, doc.loss_mask)
    replies = [m.content for m in RECORD.messages if m.role == "assistant"]
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert run[-1] == tok.eos_id  # the closing EOS is trained
        assert tok.decode(run[:-1]) == reply  # and exactly the reply before it
    # Nothing else is trained: the unmasked tokens decode to everything but the replies.
    trained = sum(len(tok.encode(r)) + 1 for r in replies)
    assert sum(doc.loss_mask) == trained
    untrained = tok.decode([t for t, m in zip(doc.tokens, doc.loss_mask) if not m])
    assert "You are terse." in untrained and "ka lo mi = ?" in untrained and '{"result": 42}' in untrained
    assert "Done" not in untrained


def test_template_without_bos(any_tokenizer):
    add_chat_special_tokens(any_tokenizer)
    doc = ChatTemplate(any_tokenizer, add_bos=False).encode(RECORD)
    assert doc.tokens[0] == any_tokenizer.token_to_id("<|system|>")


def test_template_requires_role_markers(hf_tokenizer):
    with pytest.raises(ValueError, match="add_chat_special_tokens"):
        ChatTemplate(hf_tokenizer)
    before = hf_tokenizer.vocab_size
    ids = add_chat_special_tokens(hf_tokenizer)
    assert ids == list(range(before, before + len(CHAT_SPECIAL_TOKENS)))
    assert add_chat_special_tokens(hf_tokenizer) == ids  # idempotent
    ChatTemplate(hf_tokenizer)


def test_encode_text(any_tokenizer):
    doc = encode_text(TextRecord("ka lo mi = 7.", domain="code"), any_tokenizer)
    assert doc.tokens == any_tokenizer.encode("ka lo mi = 7.") + [any_tokenizer.eos_id]
    assert doc.loss_mask == [1] * len(doc.tokens)
    assert doc.domain == "code"


def test_tokenize_records_mixes_kinds(template):
    docs = tokenize_records([RECORD, TextRecord("ka")], template.tokenizer)
    assert docs[0].tokens == template.encode(RECORD).tokens
    assert docs[1].tokens == template.tokenizer.encode("ka") + [template.tokenizer.eos_id]


# --------------------------------------------------------------------------- JSONL


def _write_lines(path, lines):
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return path


GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
CHAT_LINES = [
    GOOD_CHAT,  # 1
    '{"messages": [',  # 2 bad JSON
    json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "domain": "code"}),  # 3
    json.dumps({"domain": "math"}),  # 4 missing key
    json.dumps({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}),  # 5 bad role
    "",  # 6 blank, ignored
    b"\xff\xfe not utf-8",  # 7 bad bytes
    json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 8 no assistant
    GOOD_CHAT,  # 9
]


def test_read_jsonl_skips_and_reports_bad_lines(tmp_path, caplog):
    path = _write_lines(tmp_path / "sft.jsonl", CHAT_LINES)
    with caplog.at_level(logging.WARNING, logger="megatron_bar.data.chat"):
        result = read_jsonl(path, "chat", max_bad_lines=5)
    assert result.bad_line_numbers == [2, 4, 5, 7, 8]
    assert result.num_bad_lines == 5
    assert len(result.records) == 3
    assert result.records[1].domain == "code" and result.records[0].domain is None
    assert result.records[0].messages == (Message("user", "q"), Message("assistant", "a"))
    for line in (2, 4, 5, 7, 8):
        assert any(f"{path}:{line}:" in r.getMessage() for r in caplog.records)
    assert any("robot" in r.getMessage() for r in caplog.records)


def test_read_jsonl_enforces_limit(tmp_path):
    path = _write_lines(tmp_path / "sft.jsonl", CHAT_LINES)
    with pytest.raises(DataError) as info:
        read_jsonl(path, "chat", max_bad_lines=2)
    assert info.value.line_number == 5
    assert info.value.path == path
    assert f"{path}:5" in str(info.value)
    assert isinstance(info.value, ValueError)
    # Strict by default: the first bad line fails.
    with pytest.raises(DataError, match=f"{path}:2"):
        read_jsonl(path, "chat")


def test_read_jsonl_text(tmp_path):
    lines = [json.dumps({"text": "ka lo", "domain": "math"}), json.dumps({"text": ""}), json.dumps({"txt": "x"})]
    path = _write_lines(tmp_path / "mid.jsonl", lines)
    result = read_jsonl(path, "text", max_bad_lines=2)
    assert result.records == [TextRecord("ka lo", "math")]
    assert result.bad_line_numbers == [2, 3]


def test_read_jsonl_missing_file_and_bad_kind(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl", "chat")
    path = _write_lines(tmp_path / "x.jsonl", [GOOD_CHAT])
    with pytest.raises(ValueError, match="kind"):
        read_jsonl(path, "pretrain")
