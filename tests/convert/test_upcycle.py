"""Dense -> 2-expert BAR MoE: expert 0 (anchor) and expert 1 copy the dense FFN and the
MoE computes the dense model's logits at step 0."""

import pytest
import torch

import megatron_bar
from helpers import batch, run_tool
from megatron_bar.bar.upcycle import upcycle
from megatron_bar.model.config import ConfigError, ModelConfig


@pytest.mark.parametrize("experts,topk", [(2, None), (3, 1)])
def test_upcycled_logits_equal_dense(mcore_dense_dir, tmp_path, experts, topk):
    out = tmp_path / "moe"
    cfg = upcycle(mcore_dense_dir, out, num_experts=experts, moe_topk=topk)
    assert cfg.num_experts == experts and ModelConfig.load(out).is_moe
    tokens, _ = batch(2, 20)
    with torch.no_grad():
        dense = megatron_bar.load_model(mcore_dense_dir)(tokens)
        moe_model = megatron_bar.load_model(out)
        moe = moe_model(tokens)
    assert torch.equal(moe, dense) or (moe - dense).abs().max().item() <= 1e-6

    state = moe_model.gpt.state_dict()
    dense_state = megatron_bar.load_model(mcore_dense_dir).gpt.state_dict()
    for e in range(experts):
        key = f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight"
        assert torch.equal(state[key], dense_state["decoder.layers.1.mlp.linear_fc1.weight"])
    assert torch.count_nonzero(state["decoder.layers.0.mlp.router.weight"]) == 0


def test_upcycle_tool(mcore_dense_dir, tmp_path):
    proc = run_tool("upcycle.py", "--load", str(mcore_dense_dir), "--save", str(tmp_path / "x"))
    assert proc.returncode == 0, proc.stderr
    assert "expert 0 is the anchor" in proc.stdout


def test_upcycle_needs_two_experts(mcore_dense_dir, tmp_path):
    with pytest.raises(ConfigError, match="at least 2"):
        upcycle(mcore_dense_dir, tmp_path / "x", num_experts=1)
    assert not (tmp_path / "x").exists()
