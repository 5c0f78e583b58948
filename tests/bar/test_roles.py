"""bar.roles: one answer for a tensor under its HF name, its megatron module name and its
megatron checkpoint key. The HF <-> megatron key map of the converter is the independent
side: both names of every tensor must get the same role."""

import pytest

from megatron_bar.bar.roles import Role, role_of
from megatron_bar.convert.keymap import tensor_maps
from megatron_bar.model.config import ModelConfig

TINY = dict(vocab_size=100, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("experts", [0, 3])
def test_hf_and_megatron_names_have_the_same_role(experts):
    cfg = ModelConfig(**TINY, **({"num_experts": experts, "moe_topk": 2} if experts else {}))
    groups = set()
    for m in tensor_maps(cfg):
        for hf in m.hf:
            assert role_of(hf) == role_of(m.mcore), (m.mcore, hf)
        groups.add(role_of(m.mcore).group)
    want = {"embedding", "lm_head", "attention", "norms"} | ({"router", "expert"} if experts else {"dense_mlp"})
    assert groups == want


def test_roles_by_hand():
    assert role_of("decoder.layers.1.self_attention.q_layernorm.weight") == Role("attention")  # a QK norm
    assert role_of("decoder.layers.mlp.router.weight") == Role("router")  # a checkpoint key
    assert role_of("decoder.layers.1.mlp.experts.linear_fc1.weight3") == Role("expert", 3)  # grouped GEMM
    assert role_of("decoder.layers.mlp.experts.experts.linear_fc2.weight") == Role("expert")  # stacked
    assert role_of("model.layers.0.mlp.experts.1.down_proj.weight") == Role("expert", 1)
    with pytest.raises(ValueError, match="no BAR role"):
        role_of("rng_state")
