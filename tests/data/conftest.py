"""Shared fixtures: a small SentencePiece model and a small Olmo-2-style HF tokenizer.

Both are built here from a synthetic corpus, so the tests need no downloads.
They are built once per session (directories) and loaded fresh per test,
because tests add special tokens to the tokenizer objects.
"""

import json
import random

import pytest

from megatron_bar.data.chat import CHAT_SPECIAL_TOKENS
from megatron_bar.data.tokenizer import HFTokenizer, SentencePieceTokenizer, train_sentencepiece

_SYLLABLES = ["ka", "lo", "mi", "tu", "re", "sa", "no", "vi", "pe", "da", "xo", "qu", "ze", "fi", "the", "and"]


def make_corpus(n_lines: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(10)]
        lines.append(" ".join(words) + f" = {rng.randint(0, 999)}.")
    return lines


@pytest.fixture(scope="session")
def corpus_factory():
    return make_corpus


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("spm") / "tok.model"
    return train_sentencepiece(corpus, vocab_size=360, out_path=path, seed=0, user_defined_symbols=CHAT_SPECIAL_TOKENS)


@pytest.fixture
def spm_tokenizer(spm_model_path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(spm_model_path)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    out = tmp_path_factory.mktemp("hf")
    tok.save(str(out / "tokenizer.json"))
    # As in Olmo 2: BOS and EOS are both <|endoftext|>, PAD is <|pad|>.
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture
def hf_tokenizer(hf_tokenizer_dir) -> HFTokenizer:
    return HFTokenizer(hf_tokenizer_dir / "tokenizer.json")


@pytest.fixture(params=["spm", "hf"])
def any_tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")
