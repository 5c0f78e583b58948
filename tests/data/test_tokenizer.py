import json

import pytest
import sentencepiece as spm

from megatron_bar.data.chat import CHAT_SPECIAL_TOKENS
from megatron_bar.data.tokenizer import (
    SIDECAR_FILE,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)

ROUND_TRIP_TEXTS = [
    "ka lo mi = 42.",
    "  leading and  double  spaces, trailing ",
    "line one\nline two\n\n\ttabbed",
    "unseen: wörld 日本語 🙂 ∫x dx",
    "digits 1234567890 and <|user|> inside text",
    "",
]


# --------------------------------------------------------------------------- SentencePiece


def test_spm_training_is_byte_deterministic(tmp_path, corpus, corpus_factory):
    a = train_sentencepiece(corpus, 360, tmp_path / "a" / "m.model", seed=0, user_defined_symbols=CHAT_SPECIAL_TOKENS)
    b = train_sentencepiece(corpus, 360, tmp_path / "b" / "m.model", seed=0, user_defined_symbols=CHAT_SPECIAL_TOKENS)
    assert a.read_bytes() == b.read_bytes()
    # Sanity: the bytes do depend on the data.
    c = train_sentencepiece(corpus_factory(seed=1), 360, tmp_path / "c.model", seed=0)
    assert c.read_bytes() != a.read_bytes()


def test_spm_ids_match_sentencepiece(spm_tokenizer, spm_model_path):
    raw = spm.SentencePieceProcessor(model_file=str(spm_model_path))
    assert spm_tokenizer.vocab_size == raw.get_piece_size() == 360
    assert (spm_tokenizer.bos_id, spm_tokenizer.eos_id, spm_tokenizer.pad_id) == (1, 2, 3)
    assert raw.encode("ka lo mi", out_type=int) == spm_tokenizer.encode("ka lo mi")
    # The role markers were trained in as single pieces.
    for marker in CHAT_SPECIAL_TOKENS:
        assert spm_tokenizer.encode(marker) == [raw.piece_to_id(marker)]
        assert marker in spm_tokenizer.special_tokens


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(any_tokenizer, text):
    assert any_tokenizer.decode(any_tokenizer.encode(text)) == text


def test_encode_adds_no_bos_eos(any_tokenizer):
    ids = any_tokenizer.encode("ka lo")
    assert any_tokenizer.bos_id not in ids and any_tokenizer.eos_id not in ids


def test_spm_control_tokens_parse_and_skip(spm_tokenizer):
    ids = spm_tokenizer.encode("ka</s>lo")
    assert ids.count(spm_tokenizer.eos_id) == 1
    assert spm_tokenizer.decode(ids) == "ka</s>lo"
    assert spm_tokenizer.decode(ids, skip_special_tokens=True) == "kalo"


def test_decode_rejects_out_of_range(any_tokenizer):
    with pytest.raises(ValueError, match="out of range"):
        any_tokenizer.decode([any_tokenizer.vocab_size])


# --------------------------------------------------------------------------- added special tokens


def test_added_special_token_is_one_new_id_at_end(any_tokenizer):
    before = any_tokenizer.vocab_size
    fingerprint_before = any_tokenizer.fingerprint()
    assert len(any_tokenizer.encode("<tool_call>")) > 1  # not yet a token

    ids = any_tokenizer.add_special_tokens(["<tool_call>", "</tool_call>"])

    assert ids == [before, before + 1]
    assert any_tokenizer.vocab_size == before + 2
    assert any_tokenizer.encode("<tool_call>") == [before]
    assert any_tokenizer.id_to_token(before) == "<tool_call>"
    assert "<tool_call>" in any_tokenizer.special_tokens
    mixed = any_tokenizer.encode('ka<tool_call>{"x": 1}</tool_call>lo')
    assert mixed.count(before) == 1 and mixed.count(before + 1) == 1
    assert any_tokenizer.decode(mixed) == 'ka<tool_call>{"x": 1}</tool_call>lo'
    assert any_tokenizer.decode(mixed, skip_special_tokens=True) == 'ka{"x": 1}lo'
    assert any_tokenizer.fingerprint() != fingerprint_before


def test_add_special_tokens_is_idempotent(any_tokenizer):
    first = any_tokenizer.add_special_tokens(["<tool_call>"])
    size = any_tokenizer.vocab_size
    fp = any_tokenizer.fingerprint()
    assert any_tokenizer.add_special_tokens(["<tool_call>"]) == first
    # A token that already is special (EOS) keeps its id too.
    eos = any_tokenizer.id_to_token(any_tokenizer.eos_id)
    assert any_tokenizer.add_special_tokens([eos]) == [any_tokenizer.eos_id]
    assert any_tokenizer.vocab_size == size
    assert any_tokenizer.fingerprint() == fp


def test_save_load_keeps_added_tokens(any_tokenizer, tmp_path):
    new_id = any_tokenizer.add_special_tokens(["<tool_call>"])[0]
    any_tokenizer.save(tmp_path / "saved")
    loaded = load_tokenizer(tmp_path / "saved")
    assert type(loaded) is type(any_tokenizer)
    assert loaded.vocab_size == any_tokenizer.vocab_size
    assert loaded.encode("ka <tool_call> lo") == any_tokenizer.encode("ka <tool_call> lo")
    assert loaded.token_to_id("<tool_call>") == new_id
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (
        any_tokenizer.bos_id,
        any_tokenizer.eos_id,
        any_tokenizer.pad_id,
    )
    assert loaded.fingerprint() == any_tokenizer.fingerprint()


def test_spm_sidecar_lists_added_tokens(spm_tokenizer, tmp_path):
    spm_tokenizer.add_special_tokens(["<tool_call>"])
    spm_tokenizer.save(tmp_path)
    meta = json.loads((tmp_path / SIDECAR_FILE).read_text())
    assert meta["added_special_tokens"] == [{"content": "<tool_call>", "id": 360}]
    # Loading the .model file alone also picks the sidecar up.
    assert load_tokenizer(tmp_path / "tokenizer.model").token_to_id("<tool_call>") == 360


def test_fingerprint_is_stable_across_loads(spm_model_path):
    assert SentencePieceTokenizer(spm_model_path).fingerprint() == SentencePieceTokenizer(spm_model_path).fingerprint()


# --------------------------------------------------------------------------- HF specifics and loading


def test_hf_special_ids_from_config(hf_tokenizer):
    eot = hf_tokenizer.token_to_id("<|endoftext|>")
    assert hf_tokenizer.bos_id == hf_tokenizer.eos_id == eot
    assert hf_tokenizer.pad_id == hf_tokenizer.token_to_id("<|pad|>")
    assert hf_tokenizer.special_tokens == ["<|endoftext|>", "<|pad|>"]


def test_hf_without_config(tmp_path, hf_tokenizer_dir):
    (tmp_path / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    tok = HFTokenizer(tmp_path / "tokenizer.json")  # falls back to common names
    assert tok.eos_id == tok.token_to_id("<|endoftext|>")
    with pytest.raises(ValueError, match="EOS"):
        HFTokenizer(tmp_path / "tokenizer.json", eos_token="<not-there>")


def test_load_tokenizer_picks_backend(spm_model_path, hf_tokenizer_dir):
    assert isinstance(load_tokenizer(spm_model_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(hf_tokenizer_dir), HFTokenizer)
    assert isinstance(load_tokenizer(hf_tokenizer_dir / "tokenizer.json"), HFTokenizer)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="vocab.txt"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="broken.json"):
        load_tokenizer(tmp_path / "broken.json")
