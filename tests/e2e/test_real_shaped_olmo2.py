"""A checkpoint shaped like OLMo-2-1124-7B-Instruct (tests/olmo2_real_shaped.py: 100352
vocabulary rows, a 100278-token byte-level BPE with the specials at the real ids, the Tulu
template in chat_template.jinja, bf16) through the whole pipeline with no file edited by
hand: convert -> upcycle -> SFT -> RLVR -> merge -> router -> export -> transformers generate."""

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import olmo2_real_shaped as real
from megatron_bar.bar.merge import merge_experts
from megatron_bar.bar.upcycle import upcycle
from megatron_bar.convert import hf_to_mcore, mcore_to_hf
from megatron_bar.data import ChatTemplate, load_tokenizer, parse_chat_record
from megatron_bar.model.config import ModelConfig
from megatron_bar.train.config import load_config
from megatron_bar.train.trainer import train
from megatron_bar.train.vocab_fit import TokenizerMismatch

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny" / "sft_tool_use.yaml"
NEW_TOKEN = "<tool_call>"


def _train(load, data, out, *extra, domains=("math",)):
    datasets = json.dumps([{"path": str(data), "kind": "chat", "domain": d} for d in domains])
    return train(load_config(CONFIG, [
        f"model.load={load}", f"data.datasets={datasets}", "data.seq_length=96",
        "train.global_batch_size=2", "train.micro_batch_size=2", "train.log_interval=1",
        "checkpoint.interval=1000", "router.stats=false", f"train.output_dir={out}", *extra,
    ]))


def _weights(path):
    from megatron_bar.model.builder import build_model
    from megatron_bar.model.checkpoint import load_weights

    cfg = ModelConfig.load(path)
    model = build_model(cfg, perform_initialization=False)
    load_weights(model, cfg, path)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _mask_runs(tokens, mask):
    runs, current = [], []
    for t, m in list(zip(tokens, mask)) + [(None, 0)]:
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return real.build_checkpoint(tmp_path_factory.mktemp("olmo2-instruct-like") / "hf")


@pytest.fixture(scope="module")
def dense(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("mcore") / "dense"
    hf_to_mcore(source, out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in real.conversations()))
    return path


def test_training_ids_are_serving_ids(source, dense):
    """For every conversation: the ids trained on are apply_chat_template's, and the loss
    mask is exactly each assistant reply plus its end token."""
    from transformers import AutoTokenizer

    served = AutoTokenizer.from_pretrained(source)
    tok = load_tokenizer(dense / "tokenizer")
    assert tok.vocab_size == real.TOKENIZER_SIZE and ModelConfig.load(dense).vocab_size == real.VOCAB_ROWS
    template = ChatTemplate(tok)
    assert template.template == real.OLMO2_INSTRUCT_TEMPLATE
    eos = "<|endoftext|>"
    for conv in real.conversations():
        record = parse_chat_record(conv)
        doc = template.encode(record)
        assert doc.tokens == list(served.apply_chat_template(conv["messages"], tokenize=True, return_dict=True)["input_ids"])
        replies = [m["content"] for m in conv["messages"] if m["role"] == "assistant"]
        assert [tok.decode(r) for r in _mask_runs(doc.tokens, doc.loss_mask)] == [r + eos for r in replies]
        prompt = conv["messages"][:-1]
        assert template.encode_prompt(record.messages[:-1]) == list(
            served.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
    # the vocabulary merges "?\n" and ".\n": tokenizing segments apart would give other ids
    assert tok.encode("?\n") == [tok.token_to_id("?\u010a")]


def test_tokenizer_that_does_not_fit_is_refused_before_reading_data(dense, source, tmp_path):
    missing = tmp_path / "never-read.jsonl"
    # more tokens than the model has rows
    big = tmp_path / "big"
    big.mkdir()
    shutil.copy(dense / "model_config.json", big)
    tok = load_tokenizer(dense / "tokenizer")
    tok.add_special_tokens([f"<extra_{i}>" for i in range(real.VOCAB_ROWS - real.TOKENIZER_SIZE + 1)])
    tok.save(big / "tokenizer")
    with pytest.raises(TokenizerMismatch, match=rf"has {real.VOCAB_ROWS + 1} tokens but .* has {real.VOCAB_ROWS} vocabulary rows"):
        _train(big, missing, tmp_path / "out")
    # the RLVR trainer too, before reading its prompts
    from megatron_bar.rl.trainer import RLTrainConfig, train_rl

    rl_config = CONFIG.parent / "rlvr_digits.yaml"
    rl_datasets = json.dumps([{"path": str(missing), "reward": "megatron_bar.demo.toy_rl:digits_reward"}])
    with pytest.raises(TokenizerMismatch, match=rf"has {real.VOCAB_ROWS + 1} tokens but .* has {real.VOCAB_ROWS} vocabulary rows"):
        train_rl(load_config(rl_config, [f"model.load={big}", f"rl.datasets={rl_datasets}",
                                         f"train.output_dir={tmp_path / 'rl'}"], cls=RLTrainConfig))
    # another tokenizer (same size, other tokens) named by data.tokenizer
    other = tmp_path / "other-tok"
    tok = load_tokenizer(dense / "tokenizer")
    tok.save(other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "\u0100unused1000", "\u0100unused1001"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerMismatch, match=rf"{real.TOKENIZER_SIZE} tokens, fingerprint .* is not the tokenizer"):
        _train(dense, missing, tmp_path / "out2", f"data.tokenizer={other}")


def test_pipeline_end_to_end(source, dense, data, tmp_path):
    bar2 = tmp_path / "bar2"
    upcycle(dense, bar2, num_experts=2)

    # SFT with one new special token: it takes the first unused padded row
    sft = _train(bar2, data, tmp_path / "sft", "train.steps=2", f"data.add_special_tokens=[\"{NEW_TOKEN}\"]")
    ckpt = sft.final_checkpoint
    cfg = ModelConfig.load(ckpt)
    tok = load_tokenizer(ckpt / "tokenizer")
    assert cfg.vocab_size == real.VOCAB_ROWS  # the embedding kept its size
    assert tok.token_to_id(NEW_TOKEN) == real.TOKENIZER_SIZE
    for name in ("chat_template.jinja", "special_tokens_map.json", "generation_config.json"):
        assert (ckpt / "tokenizer" / name).read_bytes() == (source / name).read_bytes(), name

    # the second expert at lr 0: its weights are what the stage started from
    other = _train(bar2, data, tmp_path / "sft2", "train.steps=1", "train.seed=7", "optim.lr=0.0",
                   "optim.warmup_steps=0", f"data.add_special_tokens=[\"{NEW_TOKEN}\"]").final_checkpoint
    start, taken = _weights(bar2), _weights(other)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        new_row = real.TOKENIZER_SIZE
        assert torch.allclose(taken[key][new_row], start[key][:new_row].float().mean(0)), key  # mean-initialised
        assert torch.equal(taken[key][:new_row], start[key][:new_row]), key
    # a short RLVR on the SFT expert: prompts rendered with the generation prompt, rollouts
    # sampled from the whole 100352-row output layer
    from megatron_bar.rl.trainer import RLTrainConfig, train_rl

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": c["messages"][:-1]}) + "\n"
                               for c in real.conversations(4)))
    rl_datasets = json.dumps([{"path": str(prompts), "reward": "megatron_bar.demo.toy_rl:digits_reward"}])
    train_rl(load_config(CONFIG.parent / "rlvr_digits.yaml", [
        f"model.load={ckpt}", f"rl.datasets={rl_datasets}", "rl.num_workers=1", "rl.samples_per_prompt=2",
        "rl.prompts_per_rollout=2", "rl.max_response_tokens=4", "train.steps=1", "train.micro_batch_size=4",
        f"train.output_dir={tmp_path / 'rl'}", "checkpoint.interval=1"], cls=RLTrainConfig))
    rl_ckpt = tmp_path / "rl" / "checkpoints" / "iter_0000001"
    assert (rl_ckpt / "tokenizer" / "chat_template.jinja").read_bytes() == (source / "chat_template.jinja").read_bytes()

    merged = tmp_path / "merged"
    merge_experts([("math", rl_ckpt), ("general", other)], merged, print_fn=lambda *a: None)
    # the router stage as the demo runs it: rows fitted to each expert's own routing first
    router = _train(merged, data, tmp_path / "router", "train.stage=router", "train.steps=1",
                    "router.init=domain_routing", "router.stats_sequences=2", domains=("math", "general"))

    export = tmp_path / "export"
    mcore_to_hf(router.final_checkpoint, export)
    hf_config = json.loads((export / "config.json").read_text())
    assert hf_config["dtype"] == "bfloat16"  # the source's, though training kept fp32
    with safe_open(str(next(export.glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.get_logger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            served = AutoTokenizer.from_pretrained(export)
            model = AutoModelForCausalLM.from_pretrained(export)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    assert served.chat_template == (source / "chat_template.jinja").read_text()
    assert model.dtype == torch.bfloat16 and type(model).__name__ == "FlexOlmoForCausalLM"

    messages = real.conversations()[1]["messages"][:1]
    prompt = served.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ours = ChatTemplate(load_tokenizer(router.final_checkpoint / "tokenizer"))
    assert prompt["input_ids"][0].tolist() == ours.encode_prompt(parse_chat_record(real.conversations()[1]).messages[:1])
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4 or out[0, -1].item() == real.EOS_ID
