"""A tiny Olmo 2 base and its SentencePiece tokenizer, rebuilt deterministically.

Nothing is downloaded: the tokenizer is trained on a synthetic corpus made here, the
model is a random transformers ``Olmo2ForCausalLM`` of that vocabulary, converted with
the project's own converter (and upcycled to the 2-expert BAR MoE). The same seed gives
byte-identical files.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_bar.data import CHAT_SPECIAL_TOKENS, train_sentencepiece
from megatron_bar.data.chat import TULU_TEMPLATE
from megatron_bar.data.tokenizer import CHAT_TEMPLATE_FILE, SentencePieceTokenizer

WORDS = (
    "the a an of to in is was for on with as by at from that this it be are not or and "
    "model expert router token answer question number sum add subtract multiply code "
    "function return value list string call tool safety refuse help please thanks user "
    "assistant system compute result print def if else for while true false zero one two "
    "three four five six seven eight nine ten weather city search name arguments json"
).split()


@dataclass(frozen=True)
class TinyModelSpec:
    vocab_size: int = 400  # the synthetic corpus supports up to ~450 unigram pieces
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024


def synthetic_corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.append(f"{rng.randint(0, 999)} + {rng.randint(0, 999)} = {rng.randint(0, 1998)}")
        lines.append(" ".join(words))
    return lines


def build_tokenizer(out_dir: str | Path, vocab_size: int = 400, seed: int = 0,
                    corpus: list[str] | None = None) -> SentencePieceTokenizer:
    """SentencePiece over ``corpus`` (default: :func:`synthetic_corpus`), chat markers atomic,
    with the Tulu chat template in its folder (``chat_template.jinja``), as a real model's
    tokenizer carries its own: the demo's chat data goes through the same path."""
    out_dir = Path(out_dir)
    model_path = train_sentencepiece(
        corpus if corpus is not None else synthetic_corpus(seed=seed), vocab_size,
        out_dir / "tokenizer.model", seed=seed,
        user_defined_symbols=list(CHAT_SPECIAL_TOKENS),
    )
    (out_dir / CHAT_TEMPLATE_FILE).write_text(TULU_TEMPLATE)
    tokenizer = SentencePieceTokenizer(model_path)
    tokenizer.save(out_dir)
    return tokenizer


def build_tiny_base(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec(), seed: int = 0,
                    experts: int = 2, corpus: list[str] | None = None,
                    with_moe: bool = True) -> dict[str, Path]:
    """``out_dir/dense`` (megatron dense) and ``out_dir/bar2`` (2-expert BAR MoE), both
    carrying the tokenizer (trained on ``corpus``, default :func:`synthetic_corpus`).
    ``with_moe=False`` writes only the dense model. Returns the paths."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from megatron_bar.bar.upcycle import upcycle
    from megatron_bar.convert import hf_to_mcore

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        tokenizer = build_tokenizer(hf_dir, spec.vocab_size, seed, corpus)
        torch.manual_seed(seed)
        config = Olmo2Config(
            vocab_size=tokenizer.vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_kv_heads,
            max_position_embeddings=spec.max_position_embeddings,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eos_id,
            bos_token_id=tokenizer.bos_id,
            rope_theta=10000.0,
        )
        Olmo2ForCausalLM(config).save_pretrained(hf_dir)
        paths = {"dense": out_dir / "dense", "bar2": out_dir / "bar2"}
        hf_to_mcore(hf_dir, paths["dense"])
    if not with_moe:
        return {"dense": paths["dense"]}
    upcycle(paths["dense"], paths["bar2"], num_experts=experts)
    return paths


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
