"""The one table between Hugging Face Olmo 2 / FlexOlmo names and megatron names.

Both conversion directions read it. Each entry names a megatron tensor (its key in the
``state_dict`` of a TP=PP=EP=1 model), the HF tensors it is made of, and the kind of
transform between them; each kind is a pair of inverse functions, so HF -> megatron -> HF
is bit-identical by construction (and tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_bar.model.config import ModelConfig


@dataclass(frozen=True)
class TensorMap:
    mcore: str
    hf: tuple[str, ...]
    kind: str  # a key of TRANSFORMS


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    maps = [
        TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
        TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
        TensorMap("output_layer.weight", ("lm_head.weight",), "vocab"),
    ]
    for i in range(cfg.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        maps += [
            TensorMap(
                mc + "self_attention.linear_qkv.weight",
                tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"),
                "qkv",
            ),
            TensorMap(mc + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",), "copy"),
            TensorMap(mc + "self_attention.q_layernorm.weight", (hf + "self_attn.q_norm.weight",), "copy"),
            TensorMap(mc + "self_attention.k_layernorm.weight", (hf + "self_attn.k_norm.weight",), "copy"),
            TensorMap(mc + "post_self_attn_layernorm.weight", (hf + "post_attention_layernorm.weight",), "copy"),
            TensorMap(mc + "post_mlp_layernorm.weight", (hf + "post_feedforward_layernorm.weight",), "copy"),
        ]
        if cfg.is_moe:
            maps.append(TensorMap(mc + "mlp.router.weight", (hf + "mlp.gate.weight",), "copy"))
            for e in range(cfg.num_experts):
                maps += _mlp_maps(
                    mc + f"mlp.experts.local_experts.{e}.", hf + f"mlp.experts.{e}."
                )
        else:
            maps += _mlp_maps(mc + "mlp.", hf + "mlp.")
    return maps


def _mlp_maps(mc: str, hf: str) -> list[TensorMap]:
    return [
        TensorMap(mc + "linear_fc1.weight", (hf + "gate_proj.weight", hf + "up_proj.weight"), "gate_up"),
        TensorMap(mc + "linear_fc2.weight", (hf + "down_proj.weight",), "copy"),
    ]


def hf_keys(cfg: ModelConfig) -> list[str]:
    return [k for m in tensor_maps(cfg) for k in m.hf]


# -- transforms: (to_mcore(hf_tensors, cfg) -> tensor, to_hf(tensor, cfg) -> hf_tensors) --


def _copy_to_mcore(ts, cfg):
    return ts[0]


def _copy_to_hf(t, cfg):
    return [t]


def _vocab_to_mcore(ts, cfg):
    # megatron pads the vocabulary so every TP size splits it evenly; pad rows are zero.
    (t,) = ts
    pad = cfg.padded_vocab_size - t.size(0)
    return torch.cat([t, t.new_zeros(pad, t.size(1))]) if pad else t


def _vocab_to_hf(t, cfg):
    return [t[: cfg.vocab_size]]


def _qkv_to_mcore(ts, cfg):
    # megatron interleaves by query group: [q heads of group g, k_g, v_g] for each g, so a
    # TP split along rows gives each rank whole groups.
    q, k, v = ts
    groups, d, h = cfg.num_kv_heads, cfg.head_dim, q.size(1)
    per_group = cfg.num_attention_heads // groups
    return torch.cat(
        [q.view(groups, per_group * d, h), k.view(groups, d, h), v.view(groups, d, h)], dim=1
    ).reshape(-1, h)


def _qkv_to_hf(t, cfg):
    groups, d = cfg.num_kv_heads, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    grouped = t.view(groups, (per_group + 2) * d, t.size(1))
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return [x.reshape(-1, t.size(1)).contiguous() for x in (q, k, v)]


def _gate_up_to_mcore(ts, cfg):
    # megatron's SwiGLU: silu(first half) * second half of linear_fc1's output.
    return torch.cat(ts, dim=0)


def _gate_up_to_hf(t, cfg):
    return [x.contiguous() for x in torch.chunk(t, 2, dim=0)]


TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (_copy_to_mcore, _copy_to_hf),
    "vocab": (_vocab_to_mcore, _vocab_to_hf),
    "qkv": (_qkv_to_mcore, _qkv_to_hf),
    "gate_up": (_gate_up_to_mcore, _gate_up_to_hf),
}


def to_mcore(m: TensorMap, hf_tensors: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    return TRANSFORMS[m.kind][0](hf_tensors, cfg)


def to_hf(m: TensorMap, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return TRANSFORMS[m.kind][1](tensor, cfg)


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape every HF tensor must have for ``cfg`` (checked before converting)."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * d, cfg.num_kv_heads * d
    shapes = {}
    for key in hf_keys(cfg):
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            shapes[key] = (cfg.vocab_size, h)
        elif key.endswith("q_proj.weight"):
            shapes[key] = (q, h)
        elif key.endswith(("k_proj.weight", "v_proj.weight")):
            shapes[key] = (kv, h)
        elif key.endswith("o_proj.weight"):
            shapes[key] = (h, q)
        elif key.endswith("q_norm.weight"):
            shapes[key] = (q,)
        elif key.endswith("k_norm.weight"):
            shapes[key] = (kv,)
        elif key.endswith(("gate_proj.weight", "up_proj.weight")):
            shapes[key] = (f, h)
        elif key.endswith("down_proj.weight"):
            shapes[key] = (h, f)
        elif key.endswith("mlp.gate.weight"):
            shapes[key] = (cfg.num_experts, h)
        else:  # norms
            shapes[key] = (h,)
    return shapes
