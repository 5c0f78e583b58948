"""The architecture of an Olmo 2 (dense) or BAR / FlexOlmo (MoE) model.

``ModelConfig`` is what a checkpoint records about the model (``model_config.json`` next
to the megatron dist checkpoint): enough to rebuild it at any parallel layout and to write
an HF ``config.json``. It knows nothing about parallelism or devices; those are applied
when it becomes a megatron ``TransformerConfig`` (:func:`to_transformer_config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODEL_CONFIG_FILE = "model_config.json"


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rope_theta: float = 500000.0
    norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    init_std: float = 0.02
    # MoE (FlexOlmo / BAR). num_experts == 0 is the dense Olmo 2.
    num_experts: int = 0
    moe_topk: int = 1
    norm_topk_prob: bool = False
    # The vocabulary rows are padded to a multiple of this so that every TP size that
    # divides it splits the embedding evenly (Megatron-LM's make-vocab-size-divisible-by).
    vocab_pad_multiple: int = 128
    # HF fields carried through conversion untouched (token ids, etc.).
    hf_extra: dict = field(default_factory=dict)
    # dtype of the HF checkpoint the model was converted from ("bfloat16", ...): the
    # export's default, whatever precision training kept the weights in.
    source_dtype: str | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers",
                     "num_attention_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.num_experts and not 1 <= self.moe_topk <= self.num_experts:
            raise ConfigError(f"moe_topk {self.moe_topk} must be in 1..{self.num_experts}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return int(math.ceil(self.vocab_size / m) * m)

    def with_(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # -- files ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; valid keys: {sorted(names)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / MODEL_CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "ModelConfig":
        path = Path(directory) / MODEL_CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"{path}: not found - is {directory} a megatron_bar checkpoint?")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))


def to_transformer_config(
    cfg: ModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    use_transformer_engine: bool = False,
    use_cpu_initialization: bool = True,
    moe_aux_loss_coeff: float = 0.0,
    recompute: bool = False,
    fused_swiglu: bool = False,
    **overrides,
):
    """The megatron ``TransformerConfig`` of ``cfg`` at one parallel layout.

    Settings chosen for exactness against transformers' Olmo 2 / FlexOlmo: no biases,
    SwiGLU, RMSNorm, no dropout, fp32 router softmax, FlexOlmo's top-k semantics (softmax
    over all experts, then top-k, then optional renormalisation). ``fused_swiglu``:
    megatron's ``torch.compile``d SwiGLU (:func:`megatron_bar.platform.fused_swiglu`).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_kv_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        # The spec builds Olmo 2's full-width QK norm itself. megatron's flag means per-head
        # norms replicated across TP, whose gradients finalize_model_grads sums over TP;
        # ours are TP-split like the projection, so the flag must stay off.
        qk_layernorm=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=use_cpu_initialization,
        # megatron's SwiGLU fusion is torch.compile (its jit_fuser); the other fused kernels
        # exist only with Transformer Engine / apex on GPU.
        bias_activation_fusion=fused_swiglu,
        bias_dropout_fusion=use_transformer_engine,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        pipeline_dtype=params_dtype,
        autocast_dtype=params_dtype,
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    if cfg.is_moe:
        kwargs.update(
            num_moe_experts=cfg.num_experts,
            moe_ffn_hidden_size=cfg.ffn_hidden_size,
            moe_router_topk=cfg.moe_topk,
            moe_router_score_function="softmax",
            # FlexOlmo: softmax over all experts then top-k (pre-softmax) when the top-k
            # weights are not renormalised; top-k then softmax over the k equals the
            # renormalised version.
            moe_router_pre_softmax=not cfg.norm_topk_prob,
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="aux_loss" if moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=moe_aux_loss_coeff,
            moe_token_dispatcher_type="alltoall" if use_transformer_engine else "allgather",
            moe_grouped_gemm=use_transformer_engine,
            moe_permute_fusion=False,
        )
    # megatron-core 0.16's default ("full") is deprecated in favour of the empty list, which
    # means the same (the whole layer) without a warning on every model built.
    kwargs["cuda_graph_scope"] = []
    kwargs.update(overrides)
    renormalised_top1 = cfg.is_moe and cfg.moe_topk == 1 and cfg.norm_topk_prob
    if renormalised_top1:
        # megatron refuses top-1 without pre-softmax at validation, yet its top-k-then-
        # softmax path is exactly FlexOlmo's renormalised top-1 (weight 1.0); validate the
        # accepted form, then select the path the model needs.
        kwargs["moe_router_pre_softmax"] = True
    config = TransformerConfig(**kwargs)
    if renormalised_top1:
        config.moe_router_pre_softmax = False
    return config
