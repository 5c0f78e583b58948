"""HF Olmo 2 / FlexOlmo <-> megatron: logits against transformers, bit-exact round trip."""

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import megatron_bar
from helpers import TINY, batch, tiny_hf_model
from megatron_bar.convert import mcore_to_hf
from megatron_bar.model.config import ModelConfig

TOL = 1e-4


def _logits_hf(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _check_logits(hf_dir, mcore_dir, moe):
    reference = tiny_hf_model(moe=moe)
    tokens, _ = batch(3, 24)
    expected = _logits_hf(reference, tokens)
    with torch.no_grad():
        ours = megatron_bar.load_model(mcore_dir)(tokens)
    assert ours.shape == (3, 24, TINY["vocab_size"])
    diff = (ours - expected).abs().max().item()
    assert diff <= TOL, f"megatron logits differ from transformers by {diff:.2e}"
    return expected, tokens


def test_dense_logits_match_transformers(hf_dense_dir, mcore_dense_dir):
    cfg = ModelConfig.load(mcore_dense_dir)
    assert not cfg.is_moe and cfg.num_kv_heads < cfg.num_attention_heads  # GQA
    assert cfg.vocab_size % 2 and cfg.padded_vocab_size % 8 == 0  # padded for TP
    _check_logits(hf_dense_dir, mcore_dense_dir, moe=False)


def test_moe_logits_match_transformers(hf_moe_dir, mcore_moe_dir):
    cfg = ModelConfig.load(mcore_moe_dir)
    assert cfg.is_moe and cfg.num_experts == 4 and cfg.moe_topk == 2
    _check_logits(hf_moe_dir, mcore_moe_dir, moe=True)


def _round_trip(hf_dir, mcore_dir, tmp_path, moe):
    out = tmp_path / "hf"
    mcore_to_hf(mcore_dir, out)
    original, back = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(original) == set(back)
    for key in original:
        assert original[key].dtype == back[key].dtype, key
        assert torch.equal(original[key], back[key]), f"{key} changed in HF -> mcore -> HF"
    # ... and transformers loads the export and computes the same logits.
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == ("FlexOlmoForCausalLM" if moe else "Olmo2ForCausalLM")
    tokens, _ = batch(2, 16)
    expected = _logits_hf(tiny_hf_model(moe=moe), tokens)
    assert (_logits_hf(reloaded, tokens) - expected).abs().max().item() <= TOL


def test_dense_round_trip_is_bit_identical(hf_dense_dir, mcore_dense_dir, tmp_path):
    _round_trip(hf_dense_dir, mcore_dense_dir, tmp_path, moe=False)


def test_moe_round_trip_is_bit_identical(hf_moe_dir, mcore_moe_dir, tmp_path):
    _round_trip(hf_moe_dir, mcore_moe_dir, tmp_path, moe=True)


def test_sharded_export_and_topk_at_load(mcore_moe_dir, tmp_path):
    """Small shards give an index that transformers follows; top-k is chosen at load."""
    out = tmp_path / "hf"
    mcore_to_hf(mcore_moe_dir, out, max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    # Issue 27: the shards are readable by whoever can read config.json (safetensors makes 0600).
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1 and modes["config.json"] & 0o044, modes
    tokens, _ = batch(2, 16)
    for k in (1, 4):
        reference = tiny_hf_model(moe=True, num_experts_per_tok=k)
        ours = megatron_bar.load_model(mcore_moe_dir, moe_topk=k)
        with torch.no_grad():
            diff = (ours(tokens) - _logits_hf(reference, tokens)).abs().max().item()
        assert diff <= TOL, f"top-{k}: {diff:.2e}"
