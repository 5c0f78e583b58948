"""A checkpoint shaped like OLMo-2-1124-7B-Instruct, built offline, shrunk to run in seconds.

What is real: the config fields (vocab_size 100352 rows, the special-token ids, rope_theta,
eps, untied embeddings, bf16 weights), a byte-level BPE ``tokenizer.json`` with the same
pre-tokenizer rules (the cl100k split regex, then byte level) whose 100278 tokens put
``<|endoftext|>`` (BOS and EOS) at 100257 and ``<|pad|>`` at 100277, the companion files
(``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json``) and the
Tulu chat template in ``chat_template.jinja`` as transformers 5 saves it. What is not: the
BPE is trained here on a small corpus (ids below 100257 past its merges are unused
placeholders), and the model is 2 layers of width 64 with random weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB_ROWS = 100352
TOKENIZER_SIZE = 100278
EOS_ID = 100257  # <|endoftext|>, also BOS
PAD_ID = 100277  # <|pad|>
# cl100k's split rule, as in Olmo 2's tokenizer.json
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# OLMo-2-1124-7B-Instruct's chat template (no tool role).
OLMO2_INSTRUCT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)
_SPECIALS = {EOS_ID: "<|endoftext|>", 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>",
             100260: "<|fim_suffix|>", 100276: "<|endofprompt|>", PAD_ID: "<|pad|>"}

_WORDS = ("what is the sum of and please add numbers answer question result total "
          "write a function that returns list value code python def return print "
          "hello thanks you are helpful assistant sure here it".split())


def conversations(n: int = 24, seed: int = 0) -> list[dict]:
    """Chat records whose user turns end in ``?`` and assistant turns in ``.`` - the
    tokenizer merges ``?\\n`` and ``.\\n``, so tokenizing segments apart would differ."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 6)))
            messages.append({"role": "user", "content": f"{words}: what is {a} + {b}?"})
            messages.append({"role": "assistant", "content": f"The sum is {a + b}.\nSo {a} + {b} = {a + b}."})
        out.append({"messages": messages, "domain": "math" if i % 2 else "general"})
    return out


def build_tokenizer(out: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] + "\n" for c in conversations(200, seed=1) for m in c["messages"]]
    corpus += ["<|user|>\n", "<|assistant|>\n", "<|system|>\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    # The real vocabulary's ordinary tokens fill ids up to 100256; placeholders stand in here.
    for i in range(len(vocab), TOKENIZER_SIZE):
        vocab[_SPECIALS.get(i, f"<|unused_{i}|>" if i >= EOS_ID else f"\u0100unused{i}")] = i
    spec["added_tokens"] = [
        {"id": i, "content": [k for k, v in vocab.items() if v == i][0] if i not in _SPECIALS else _SPECIALS[i],
         "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i in range(EOS_ID, TOKENIZER_SIZE)
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    names = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
             "unk_token": "<|endoftext|>"}
    (out / "tokenizer_config.json").write_text(json.dumps({
        **names, "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 4096, "tokenizer_class": "GPT2Tokenizer"}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}, indent=2))
    (out / "chat_template.jinja").write_text(OLMO2_INSTRUCT_TEMPLATE)


def build_checkpoint(out: Path, seed: int = 0) -> Path:
    """The HF folder at ``out``: config.json, bf16 model.safetensors and the tokenizer files."""
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    config = Olmo2Config(
        vocab_size=VOCAB_ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        rope_theta=500000.0, rms_norm_eps=1e-6, attention_bias=False, attention_dropout=0.0,
        tie_word_embeddings=False, bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        initializer_range=0.02, use_cache=True,
    )
    torch.manual_seed(seed)
    model = Olmo2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    build_tokenizer(out)
    return out
