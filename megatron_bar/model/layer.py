"""The Olmo 2 transformer layer: megatron's ``TransformerLayer`` with post-norms.

Olmo 2 has no input layer norm; it normalises the *output* of attention and of the MLP
before the residual add::

    h   = x + post_attention_layernorm(attn(x))
    out = h + post_feedforward_layernorm(mlp(h))

megatron's layer adds the branch output to the residual in its bias-dropout-add
(``self_attn_bda`` / ``mlp_bda``), so that is where the norm goes: the layer wraps each
bda so the branch output is normalised first. Everything else - recompute, sequence
parallelism (the norm sees full hidden vectors of its sequence slice), MoE, pipeline
offsets, checkpoint keys - is megatron's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)


@dataclass
class Olmo2LayerSubmodules(TransformerLayerSubmodules):
    post_self_attn_layernorm: Union[ModuleSpec, type] = IdentityOp
    post_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp


def _normalise_then(norm, bda_builder):
    """A bias-dropout-add builder that normalises the branch output before the add."""

    def builder(training: bool, fused: bool):
        bias_dropout_add = bda_builder(training, fused)

        def apply(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if bias is not None:
                raise ValueError("Olmo 2 layers have no biases")
            return bias_dropout_add((norm(x), None), residual, prob)

        return apply

    return builder


class Olmo2TransformerLayer(TransformerLayer):
    def __init__(self, config, submodules: Olmo2LayerSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.post_self_attn_layernorm = build_module(
            submodules.post_self_attn_layernorm,
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )
        self.post_mlp_layernorm = build_module(
            submodules.post_mlp_layernorm,
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )
        self.self_attn_bda = _normalise_then(self.post_self_attn_layernorm, self.self_attn_bda)
        self.mlp_bda = _normalise_then(self.post_mlp_layernorm, self.mlp_bda)
