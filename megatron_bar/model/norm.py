"""The norms of Olmo 2, as megatron modules.

``RMSNorm`` is the layer norm of every Olmo 2 block (post-attention, post-feedforward and
final). It computes in fp32 and multiplies by the weight before casting back, exactly as
transformers' ``Olmo2RMSNorm`` does, and marks its weight ``sequence_parallel`` so that
megatron all-reduces its gradient across the tensor-parallel group when activations are
split along the sequence (megatron's ``WrappedTorchNorm`` refuses sequence parallelism).

``FullWidthQKNorm`` is Olmo 2's QK norm: one RMSNorm over the *whole* q (or k) projection,
heads*head_dim wide, not per head. Under tensor parallelism each rank holds only its heads,
so the mean square is summed across the tensor-parallel group before normalising; the
result is the same at every TP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Olmo 2's RMSNorm: fp32 statistics, weight applied in fp32, cast back at the end."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * x32).to(x.dtype)


class RMSNorm(MegatronModule):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # With sequence parallelism each TP rank normalises a different slice of the
        # sequence, so the weight's gradient is partial and must be summed over TP.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is also an all-reduce.

    Every rank's output depends on every rank's input, and each rank's downstream
    gradient is different (it normalises different heads), so the gradient of the sum
    must be summed too - unlike megatron's ``reduce_from_tensor_model_parallel_region``,
    whose identity backward assumes identical downstream gradients.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class FullWidthQKNorm(MegatronModule):
    """RMSNorm over all heads of the q or k projection, correct under tensor parallelism.

    Built by megatron's ``SelfAttention`` in the place of its per-head ``q_layernorm`` /
    ``k_layernorm``; receives ``[s, b, heads_per_rank, head_dim]`` and returns the same.
    The weight is split across TP along its only axis, like the projection it follows.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,  # per-head size, as megatron passes it; the width comes from config
        eps: float = 1e-6,
        projection: str = "query",
    ):
        super().__init__(config=config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        heads = config.num_attention_heads if projection == "query" else config.num_query_groups
        if heads % tp:
            raise ValueError(
                f"{projection} heads ({heads}) must divide by the tensor-parallel size ({tp}) "
                "for the full-width QK norm"
            )
        self.eps = eps
        self.head_dim = hidden_size
        self.full_width = heads * hidden_size
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
        self.weight = torch.nn.Parameter(
            torch.ones(self.full_width // tp, dtype=config.params_dtype)
        )
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x32 = x.reshape(*shape[:-2], -1).float()
        sum_sq = x32.pow(2).sum(-1, keepdim=True)
        if self.tp_group is not None:
            sum_sq = _SumOverGroup.apply(sum_sq, self.tp_group)
        x32 = x32 * torch.rsqrt(sum_sq / self.full_width + self.eps)
        return (self.weight * x32).to(x.dtype).reshape(shape)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"weight": 0}, sharded_offsets
        )
