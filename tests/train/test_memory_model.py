"""The memory model's parameter counts are those of the model megatron builds (per freeze
group, dense and MoE), and its state arithmetic is the optimizer's bytes per parameter."""

import pytest

from helpers import TINY
from megatron_bar import platform
from megatron_bar.bar.freeze import param_group
from megatron_bar.model.builder import build_model
from megatron_bar.model.config import ModelConfig
from megatron_bar.train.memory_model import StepShape, estimate, param_counts, trainable_split


def _cfg(moe: bool) -> ModelConfig:
    extra = dict(num_experts=4, moe_topk=2) if moe else {}
    return ModelConfig(vocab_size=TINY["vocab_size"], hidden_size=TINY["hidden_size"],
                       ffn_hidden_size=TINY["intermediate_size"], num_layers=TINY["num_hidden_layers"],
                       num_attention_heads=TINY["num_attention_heads"], num_kv_heads=TINY["num_key_value_heads"],
                       **extra)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_param_counts_match_the_built_model(moe):
    platform.initialize()
    cfg = _cfg(moe)
    model = build_model(cfg, device="meta")
    built: dict[str, int] = {}
    for name, p in model.named_parameters():
        group = param_group(name, cfg.num_experts)
        built[group] = built.get(group, 0) + p.numel()
    counts = param_counts(cfg, StepShape(seq_length=16, micro_batch_size=1))
    assert counts.by_group == built
    assert counts.largest == cfg.padded_vocab_size * cfg.hidden_size  # embedding / LM head


def test_state_bytes_per_parameter():
    cfg = _cfg(moe=True)
    # sft trains experts (not the anchor), router, embeddings, LM head
    shape = StepShape(seq_length=16, micro_batch_size=1, stage="sft")
    dense, experts = trainable_split(param_counts(cfg, shape), "sft")
    h, f, layers = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    assert experts == layers * 3 * 3 * h * f  # 3 of the 4 experts, SwiGLU's 3 matrices
    assert dense == 2 * cfg.padded_vocab_size * h + layers * cfg.num_experts * h  # + router
    fp32 = estimate(cfg, shape)
    assert fp32.grads == 4 * (dense + experts)
    assert fp32.optimizer == 8 * (dense + experts)  # Adam's m and v
    # bf16 with the distributed optimizer over DP 4 (experts over DP 4 / EP 2 = 2), EP 2:
    # rank 1 holds experts 2 and 3, neither is the anchor
    bf16 = estimate(cfg, StepShape(seq_length=16, micro_batch_size=1, stage="sft", param_bytes=2,
                                   distributed_optimizer=True, dp=4, ep=2, ep_rank=1))
    dense, experts = trainable_split(param_counts(cfg, StepShape(16, 1, ep=2, ep_rank=1)), "sft")
    assert experts == layers * 2 * 3 * h * f
    assert bf16.optimizer == int(12 * (dense / 4 + experts / 2))
