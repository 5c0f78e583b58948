"""Dense Olmo 2 -> the 2-expert BAR MoE that every domain expert starts from.

Expert 0 is the *anchor*: a copy of the dense FFN that stays frozen through the domain's
training. Expert 1 is the trainable copy. Everything else (attention, norms, embeddings,
LM head) is copied. The router rows start at zero, so every expert gets the same score
and - with top-k = number of experts, or renormalised top-k weights - the MoE computes
exactly the dense model at step 0: sum_e w_e * FFN(x) with sum_e w_e = 1 and identical
FFNs. (Zero rows give weights 1/E, which are exact in floating point for E = 2.)
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch

from megatron_bar.bar.roles import role_of
from megatron_bar.convert import TOKENIZER_SUBDIR, build_for_conversion, checkpoint_dtype
from megatron_bar.model.checkpoint import load_weights, save_model
from megatron_bar.model.config import ConfigError, ModelConfig
from megatron_bar.utils.fs import check_output_free

log = logging.getLogger(__name__)

ANCHOR_EXPERT = 0
_EXPERT_KEY = re.compile(r"^(decoder\.layers\.\d+\.mlp\.)experts\.local_experts\.\d+\.(.*)$")


def dense_key_for(moe_key: str) -> str | None:
    """The dense tensor a MoE tensor is copied from (None for the router)."""
    if role_of(moe_key).group == "router":
        return None
    m = _EXPERT_KEY.match(moe_key)
    return m.group(1) + m.group(2) if m else moe_key


def upcycle(
    load_dir: str | Path, save_dir: str | Path, num_experts: int = 2, moe_topk: int | None = None
) -> ModelConfig:
    load_dir, save_dir = Path(load_dir), check_output_free(save_dir)
    dense_cfg = ModelConfig.load(load_dir)
    if dense_cfg.is_moe:
        raise ConfigError(f"{load_dir} is already a MoE ({dense_cfg.num_experts} experts)")
    if num_experts < 2:
        raise ConfigError(f"num_experts must be at least 2 (anchor + trainable), got {num_experts}")
    topk = num_experts if moe_topk is None else moe_topk
    moe_cfg = dense_cfg.with_(
        num_experts=num_experts,
        moe_topk=topk,
        # With fewer experts active than exist, renormalising the top-k weights is what
        # keeps the output equal to the dense model's.
        norm_topk_prob=topk < num_experts,
    )
    dtype = checkpoint_dtype(load_dir)
    dense = build_for_conversion(dense_cfg, dtype)
    load_weights(dense, dense_cfg, load_dir)
    dense_state = dense.state_dict()
    del dense

    moe = build_for_conversion(moe_cfg, dtype)
    with torch.no_grad():
        for key, param in moe.state_dict(keep_vars=True).items():
            if key.endswith("_extra_state"):
                continue
            source = dense_key_for(key)
            if source is None:
                param.zero_()
            else:
                param.copy_(dense_state[source])

    def copy_tokenizer(tmp: Path):
        if (load_dir / TOKENIZER_SUBDIR).is_dir():
            shutil.copytree(load_dir / TOKENIZER_SUBDIR, tmp / TOKENIZER_SUBDIR)

    save_model(moe, moe_cfg, save_dir, write_extra=copy_tokenizer)
    log.info("upcycled %s -> %s (%d experts, top-%d)", load_dir, save_dir, num_experts, topk)
    return moe_cfg
