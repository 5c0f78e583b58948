"""Build the megatron ``GPTModel`` of a :class:`ModelConfig` for this rank."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_bar import platform
from megatron_bar.model.config import ModelConfig, to_transformer_config
from megatron_bar.model.loss import token_cross_entropy
from megatron_bar.model.spec import backend_for, olmo2_block_spec


def transformer_config_for_this_rank(
    cfg: ModelConfig,
    params_dtype: torch.dtype | None = None,
    use_transformer_engine: bool | None = None,
    **overrides,
):
    """The TransformerConfig of ``cfg`` at the parallel layout megatron was initialised with."""
    if use_transformer_engine is None:
        use_transformer_engine = platform.has_transformer_engine()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    overrides.setdefault("sequence_parallel", tp > 1)
    return to_transformer_config(
        cfg,
        tp=tp,
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        ep=parallel_state.get_expert_model_parallel_world_size(),
        params_dtype=params_dtype or platform.default_train_dtype(),
        use_transformer_engine=use_transformer_engine,
        use_cpu_initialization=not platform.has_gpu(),
        fused_swiglu=platform.fused_swiglu(),
        **overrides,
    )


def build_model(
    cfg: ModelConfig,
    params_dtype: torch.dtype | None = None,
    use_transformer_engine: bool | None = None,
    device: torch.device | None = None,
    **config_overrides,
) -> GPTModel:
    """This rank's part of the model (its pipeline stage, TP and EP shards), on its device.

    ``device="meta"`` builds the structure without storage (its sharded state dict
    describes a checkpoint without holding one). Requires
    :func:`megatron_bar.platform.initialize` to have set up the parallel groups.
    """
    if use_transformer_engine is None:
        use_transformer_engine = platform.has_transformer_engine()
    config = transformer_config_for_this_rank(
        cfg, params_dtype, use_transformer_engine, **config_overrides
    )
    tp = config.tensor_model_parallel_size
    if cfg.padded_vocab_size % tp:
        raise ValueError(
            f"padded vocabulary {cfg.padded_vocab_size} (vocab_pad_multiple "
            f"{cfg.vocab_pad_multiple}) does not divide by tensor-parallel size {tp}"
        )
    if cfg.num_kv_heads % tp:
        raise ValueError(f"num_kv_heads {cfg.num_kv_heads} does not divide by TP size {tp}")
    ep = config.expert_model_parallel_size
    if cfg.is_moe and cfg.num_experts % ep:
        raise ValueError(f"num_experts {cfg.num_experts} does not divide by EP size {ep}")
    backend = backend_for(use_transformer_engine)
    device = torch.device(device) if device is not None else platform.device()
    if device.type == "meta":
        with device:
            return _gpt_model(cfg, config, backend)
    return _gpt_model(cfg, config, backend).to(device)


class BarGPTModel(GPTModel):
    """megatron's GPTModel whose loss (``forward(..., labels=...)``) is over the true
    vocabulary: megatron's vocab-parallel cross entropy after the padding columns are
    masked (:mod:`megatron_bar.model.loss`). Given labels, the loss is computed on the
    logits as the output layer makes them, [s, b, v/tp], without the [b, s] copy that
    returning logits costs."""

    def __init__(self, *args, true_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.true_vocab_size = true_vocab_size

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-token loss [b, s] of labels [b, s] under this rank's logits [s, b, v/tp]."""
        loss = token_cross_entropy(logits, labels.transpose(0, 1).contiguous(), self.true_vocab_size)
        return loss.transpose(0, 1).contiguous()


def _gpt_model(cfg: ModelConfig, config, backend) -> GPTModel:
    return BarGPTModel(
        true_vocab_size=cfg.vocab_size,
        config=config,
        transformer_layer_spec=olmo2_block_spec(config, backend),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=cfg.rope_theta,
    )
