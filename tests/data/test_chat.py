import json
import logging

import pytest

from megatron_bar.data.chat import (
    ChatRecord,
    ChatTemplate,
    DataError,
    Message,
    TextRecord,
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
    return ChatTemplate(any_tokenizer)  # no template of its own: the Tulu default


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
    assert doc.tokens == tok.encode(expected)  # the whole string, as serving tokenizes it
    assert tok.decode(doc.tokens) == expected
    assert doc.domain == "math"


def test_chat_format_adds_no_tokens(any_tokenizer):
    before = any_tokenizer.vocab_size
    ChatTemplate(any_tokenizer).encode(RECORD)
    assert any_tokenizer.vocab_size == before


def test_loss_mask_covers_exactly_assistant_content_and_eos(template):
    tok = template.tokenizer
    eos = tok.id_to_token(tok.eos_id)
    doc = template.encode(RECORD)
    assert len(doc.tokens) == len(doc.loss_mask)
    runs = _mask_runs(doc.tokens, doc.loss_mask)
    replies = [m.content for m in RECORD.messages if m.role == "assistant"]
    assert [tok.decode(run) for run in runs] == [r + eos for r in replies]
    assert all(run[-1] == tok.eos_id for run in runs)  # the closing EOS is trained
    untrained = tok.decode([t for t, m in zip(doc.tokens, doc.loss_mask) if not m])
    assert "You are terse." in untrained and "ka lo mi = ?" in untrained and '{"result": 42}' in untrained
    assert "Done" not in untrained and "mi = 42." not in untrained


CHATML_GENERATION = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_generation_blocks_give_the_mask(any_tokenizer):
    template = ChatTemplate(any_tokenizer, CHATML_GENERATION)
    assert template.has_generation_blocks
    doc = template.encode(RECORD)
    tok = any_tokenizer
    assert doc.tokens == tok.encode(template.render_text(RECORD))
    replies = [m.content for m in RECORD.messages if m.role == "assistant"]
    assert [tok.decode(r) for r in _mask_runs(doc.tokens, doc.loss_mask)] == [r + "<|im_end|>" for r in replies]
    prompt = template.encode_prompt(RECORD.messages[:2])
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_template_of_the_tokenizer_folder_is_used(hf_tokenizer_dir, tmp_path):
    import shutil

    from megatron_bar.data.tokenizer import load_tokenizer

    folder = shutil.copytree(hf_tokenizer_dir, tmp_path / "tok")
    (folder / "chat_template.jinja").write_text(CHATML_GENERATION)
    tok = load_tokenizer(folder)
    assert tok.chat_template == CHATML_GENERATION
    assert ChatTemplate(tok).render_text(RECORD).startswith("<|im_start|>system\nYou are terse.")
    tok.save(tmp_path / "saved")  # the template travels with the tokenizer
    assert (tmp_path / "saved" / "chat_template.jinja").read_text() == CHATML_GENERATION


def test_template_that_drops_a_role_is_refused(any_tokenizer):
    no_tool = "{% for m in messages %}{% if m['role'] != 'tool' %}{{ m['content'] + '\\n' }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match=r"messages\[3\] \(role 'tool'\)"):
        ChatTemplate(any_tokenizer, no_tool).encode(RECORD)


def test_template_without_prefix_property_asks_for_generation_blocks(any_tokenizer):
    # Writes the message count first: a prefix of the conversation renders differently.
    counting = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="generation"):
        ChatTemplate(any_tokenizer, counting).encode(RECORD)


def test_encode_prompt_is_the_prefix_before_the_reply(template):
    doc = template.encode(RECORD)
    prompt = template.encode_prompt(RECORD.messages[:2])
    assert prompt == doc.tokens[: doc.loss_mask.index(1)]


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
