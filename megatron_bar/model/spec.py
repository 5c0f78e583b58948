"""megatron-core layer specs for Olmo 2 and the BAR MoE.

One spec function serves both paths; the only thing that differs between them is the
backend (which linear, norm, core attention and expert modules to build), chosen in
:func:`backend_for` from the platform. Parameter names are the same on both: the
Transformer Engine modules use megatron's names (``linear_qkv.weight``,
``linear_proj.weight``, ``linear_fc1.weight``, ...). The one exception is the grouped-GEMM
expert module (``experts.linear_fc1.weight{e}`` instead of
``experts.local_experts.{e}.linear_fc1.weight``), whose *checkpoint* keys are nevertheless
megatron's SequentialMLP keys, so checkpoints move freely between the two.
"""

from __future__ import annotations

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megatron_bar import platform
from megatron_bar.model.attention import SDPAttention
from megatron_bar.model.layer import Olmo2LayerSubmodules, Olmo2TransformerLayer
from megatron_bar.model.norm import FullWidthQKNorm, RMSNorm


class LocalBackend(LocalSpecProvider):
    """megatron's local modules, with SDPA core attention and a sequence-parallel RMSNorm."""

    def layer_norm(self, rms_norm: bool = True, for_qk: bool = False) -> type:
        return RMSNorm

    def core_attention(self) -> type:
        return SDPAttention


def transformer_engine_backend() -> BackendSpecProvider:
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()


def backend_for(use_transformer_engine: bool | None = None) -> BackendSpecProvider:
    """The Transformer Engine backend where a GPU has it, else the local one."""
    if use_transformer_engine is None:
        use_transformer_engine = platform.has_transformer_engine()
    return transformer_engine_backend() if use_transformer_engine else LocalBackend()


def _mlp_spec(backend: BackendSpecProvider, config) -> ModuleSpec:
    if config.num_moe_experts:
        return get_moe_module_spec_for_backend(
            backend=backend,
            num_experts=config.num_moe_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
        )
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=backend.column_parallel_linear(),
            linear_fc2=backend.row_parallel_linear(),
        ),
    )


def olmo2_layer_spec(config, backend: BackendSpecProvider) -> ModuleSpec:
    """One Olmo 2 layer (dense or MoE, per ``config.num_moe_experts``)."""
    norm = backend.layer_norm(rms_norm=True)
    return ModuleSpec(
        module=Olmo2TransformerLayer,
        submodules=Olmo2LayerSubmodules(
            input_layernorm=IdentityOp,  # Olmo 2 has none: it normalises branch outputs
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=ModuleSpec(module=FullWidthQKNorm, params={"projection": "query"}),
                    k_layernorm=ModuleSpec(module=FullWidthQKNorm, params={"projection": "key"}),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            post_self_attn_layernorm=norm,
            pre_mlp_layernorm=IdentityOp,
            mlp=_mlp_spec(backend, config),
            mlp_bda=get_bias_dropout_add,
            post_mlp_layernorm=norm,
        ),
    )


def olmo2_block_spec(
    config, backend: BackendSpecProvider, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds, and the final norm (``model.norm``)."""
    layer = olmo2_layer_spec(config, backend)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * num_layers, layer_norm=backend.layer_norm(rms_norm=True)
    )
