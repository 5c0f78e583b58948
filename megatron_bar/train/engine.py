"""The pieces of a megatron training step, shared by every stage and by the tests.

``wrap_ddp`` puts a model under megatron's DistributedDataParallel (gradient buffers,
data-parallel reduction, the TP all-reduce of sequence-parallel norm gradients, the
expert-parallel scaling); ``make_optimizer`` builds megatron's optimizer on it (Adam,
gradient clipping, the distributed optimizer on GPU); ``forward_backward`` runs
megatron's pipeline schedule over a list of microbatches and returns the losses and, on
the last pipeline stage, the logits when asked; ``forward_logprobs`` runs it forward only
for the log-probs of the label tokens.

The loss and the log-probs are computed from this rank's vocabulary shard of the logits
by megatron's vocab-parallel cross entropy: no rank ever holds a full row of the
vocabulary, and the shard is turned into the softmax (and then its gradient) in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import (
    OptimizerConfig,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_bar import platform
from megatron_bar.model.loss import token_cross_entropy, token_logprobs  # noqa: F401 (re-exported)


def wrap_ddp(model, use_distributed_optimizer: bool | None = None) -> DistributedDataParallel:
    if use_distributed_optimizer is None:
        use_distributed_optimizer = platform.has_gpu()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    if platform.fused_wgrad_accumulation():
        accumulate_wgrads_in_main_grad(model)
    # The schedule calls these around backward; megatron-LM's training loop sets them too.
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def accumulate_wgrads_in_main_grad(model) -> int:
    """Turn on megatron's ``gradient_accumulation_fusion`` in ``model``'s linear layers, now
    that DDP has given every trainable weight its ``main_grad``: the backward GEMM adds the
    weight gradient into that buffer instead of returning it for DDP's hook to add. Only
    under DDP - without ``main_grad`` megatron's backward would fail - so it is switched on
    here rather than in the config the model is built from (each layer copies the flag at
    construction). Returns the number of layers switched."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    switched = 0
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module.gradient_accumulation_fusion = True
            switched += 1
    model.config.gradient_accumulation_fusion = True
    return switched


def make_optimizer(
    ddp_model, lr: float, min_lr: float = 0.0, weight_decay: float = 0.0, clip_grad: float = 1.0,
    adam_beta1: float = 0.9, adam_beta2: float = 0.95, adam_eps: float = 1e-8,
    lr_scale_of: Callable[[str], float] | None = None,
):
    """Megatron's optimizer over ``ddp_model``.

    ``lr_scale_of(name)`` (a parameter's name in the unwrapped model -> LR multiplier)
    puts the parameters it scales in param groups of their own, through megatron's
    ``config_overrides`` (``max_lr``/``min_lr`` per group, which the LR scheduler reads),
    next to megatron's standard overrides (no weight decay on biases and 1-d parameters).
    """
    config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        clip_grad=clip_grad,
        bf16=ddp_model.config.bf16,
        params_dtype=ddp_model.config.params_dtype,
        use_distributed_optimizer=ddp_model.ddp_config.use_distributed_optimizer,
    )
    overrides = None
    if lr_scale_of is not None:
        overrides = get_standard_config_overrides(config)
        scales = {}
        for name, _ in ddp_model.module.named_parameters():
            scale = float(lr_scale_of(name))
            if scale != 1.0:
                scales[f"module.{name}"] = scale
        for scale in sorted(set(scales.values())):
            key = ParamKey(with_name_predicate=ParamWithNamePredicate(
                name=f"lr_scale_{scale:g}", fn=lambda p, n, scale=scale: scales.get(n) == scale))
            overrides[key] = {"max_lr": lr * scale, "min_lr": min_lr * scale}
    optimizer = get_megatron_optimizer(config, [ddp_model], config_overrides=overrides)
    if platform.fused_adam():
        use_torch_fused_adam(optimizer)
    return optimizer


def use_torch_fused_adam(optimizer) -> int:
    """Switch the torch ``Adam``/``AdamW`` inside megatron's ``optimizer`` to torch's fused
    kernel (its ``fused`` option, set on each param group, which the step reads; megatron
    builds torch's optimizer without it). Same update, one pass over each tensor instead of
    a dozen. Returns the number of param groups switched."""
    chained = getattr(optimizer, "chained_optimizers", None)
    switched = 0
    for megatron_opt in chained if chained is not None else [optimizer]:
        inner = getattr(megatron_opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam):  # AdamW subclasses Adam
            continue
        for group in inner.param_groups:
            group["foreach"] = False
            group["fused"] = True
            switched += 1
    return switched


@dataclass
class Microbatch:
    """One microbatch, [b, s] each; ``attention_mask`` is megatron's [b, 1, s, s] (True = masked)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


@dataclass
class StepOutput:
    """What the last pipeline stage saw. With per-token loss (``calculate_per_token_loss``)
    ``losses`` holds each microbatch's loss *sum* and ``tokens`` its loss-token count."""

    losses: list[torch.Tensor] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # when keep_logits


def forward_backward(
    model,
    microbatches: list[Microbatch],
    vocab_size: int,
    forward_only: bool = False,
    keep_logits: bool = False,
    loss_fn: Callable | None = None,
    before_forward: Callable[[Microbatch], None] | None = None,
) -> StepOutput:
    """Run megatron's schedule (no pipelining, or 1F1B when PP > 1) over ``microbatches``.

    ``loss_fn(logits, mb, out)``, when given, replaces the cross entropy; ``logits`` is this
    rank's vocabulary shard [b, s, v/tp] (see :func:`token_logprobs`).

    With ``config.calculate_per_token_loss`` (the trainer's setting) the loss is the mean
    over every loss token of the step on all data-parallel ranks, whatever the layout:
    each microbatch returns its loss sum and token count, and megatron divides the
    gradients by the total count. Otherwise a microbatch's loss is its token mean, the
    schedule averages microbatches and DDP averages data-parallel ranks.

    ``before_forward(mb)`` runs just before each microbatch's forward pass (RL's routing
    replay sets the experts of that microbatch's tokens there).
    """
    per_token = model.config.calculate_per_token_loss
    out = StepOutput()
    device = platform.device()
    it = iter(microbatches)
    first = microbatches[0]

    def forward_step(data_iterator, gpt):
        mb = next(data_iterator)
        if before_forward is not None:
            before_forward(mb)
        tokens = mb.tokens.to(device)
        position_ids = mb.position_ids
        if position_ids is None:
            position_ids = torch.arange(tokens.size(1), device=device).expand_as(tokens)
        mask = mb.attention_mask.to(device) if mb.attention_mask is not None else None
        labels = mb.labels.to(device)
        # The training loss: the model computes it from its logits shard ([s, b, v/tp], no
        # [b, s] copy). Logits are returned only where asked for (evaluation, custom losses).
        wants_logits = keep_logits or loss_fn is not None
        output = gpt(tokens, position_ids.to(device), mask, labels=None if wants_logits else labels)

        def loss_func(output_tensor):
            if not wants_logits:
                token_loss = output_tensor
            else:
                logits = output_tensor
                if keep_logits:  # evaluation only: the full rows are gathered, off the training path
                    full = gather_from_tensor_model_parallel_region(logits.detach())
                    out.logits.append(full[..., :vocab_size].clone())
                    del full
                if loss_fn is not None:
                    return loss_fn(logits, mb, out)
                token_loss = token_cross_entropy(logits, labels, vocab_size)
            lm = mb.loss_mask.to(device).float()
            loss_sum, count = (token_loss * lm).sum(), lm.sum()
            if per_token:
                out.losses.append(loss_sum.detach())
                out.tokens.append(count.detach())
                return loss_sum, count.to(torch.int), {"loss_sum": loss_sum.detach()}
            loss = loss_sum / count.clamp(min=1)
            out.losses.append(loss.detach())
            return loss, {"loss": loss.detach()}

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=it,
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=first.tokens.size(1),
        micro_batch_size=first.tokens.size(0),
        forward_only=forward_only,
    )
    return out


def forward_logprobs(model, microbatches: list[Microbatch], vocab_size: int,
                     temperature: float = 1.0,
                     before_forward: Callable[[Microbatch], None] | None = None) -> list[torch.Tensor]:
    """The label tokens' log-probs [b, s] of each microbatch, forward only (no gradient);
    an empty list off the last pipeline stage. ``before_forward`` as in :func:`forward_backward`."""
    logprobs: list[torch.Tensor] = []

    def collect(logits, mb, out):
        logprobs.append(token_logprobs(logits, mb.labels.to(logits.device), vocab_size, temperature))
        return logits.new_zeros(()), torch.tensor(1, dtype=torch.int), {}

    with torch.no_grad():
        forward_backward(model, microbatches, vocab_size, forward_only=True, loss_fn=collect,
                         before_forward=before_forward)
    return logprobs


def is_last_stage() -> bool:
    return parallel_state.is_pipeline_last_stage()
