"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

megatron's local ``DotProductAttention`` materialises the score matrix with ``baddbmm`` and
a masked softmax; SDPA picks a fused kernel (flash / memory-efficient on GPU, a blocked
kernel on CPU) and takes GQA natively. It is the core attention of the local spec, so the
CPU path is at least as fast as transformers' own models. On GPU with Transformer Engine
the spec uses ``TEDotProductAttention`` instead.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """Drop-in for megatron's ``DotProductAttention``: [s, b, heads, d] in, [s, b, h] out.

    ``attention_mask`` follows megatron's convention (True = masked out) and, when given,
    must already contain the causal part (e.g. a packed-documents mask); without it the
    attention is causal.
    """

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None:
            raise NotImplementedError(
                "packed THD sequences need the Transformer Engine spec; on the local spec "
                "pass a [b, 1, s, s] document mask as attention_mask instead"
            )
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAttention")
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is None:
            attn_mask, is_causal = None, mask_type == AttnMaskType.causal
        else:
            attn_mask, is_causal = ~attention_mask, False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.config.attention_dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=q.size(1) != k.size(1),
        )
        # [b, n, s, d] -> [s, b, n*d]
        return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), -1)
