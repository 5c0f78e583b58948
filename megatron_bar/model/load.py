"""``megatron_bar.load_model``: a checkpoint as a module that maps tokens to logits."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_bar import platform
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import load_weights
from megatron_bar.model.config import ModelConfig
from megatron_bar.model.expert_select import apply_selection, expert_names, resolve_selection


class CausalLM(torch.nn.Module):
    """A megatron GPTModel with the interface of an HF causal LM's forward.

    ``forward(input_ids [b, s], attention_mask=None)`` returns logits ``[b, s, vocab]``
    over the true vocabulary (the rows megatron pads for TP divisibility are cut off),
    gathered across tensor-parallel ranks. ``attention_mask`` is megatron's boolean
    ``[b, 1, s, s]`` mask (True = masked) for packed documents; None means causal.
    Pipeline-parallel models run through megatron's schedules, not this call.
    """

    def __init__(self, gpt, config: ModelConfig):
        super().__init__()
        self.gpt = gpt
        self.config = config

    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None):
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise RuntimeError("CausalLM.forward runs whole models; use the schedules for PP > 1")
        input_ids = input_ids.to(platform.device())
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(
                input_ids
            )
        logits = self.gpt(input_ids, position_ids, attention_mask)
        logits = gather_from_tensor_model_parallel_region(logits)
        return logits[..., : self.config.vocab_size]


def load_model(
    path: str | Path,
    *,
    moe_topk: int | None = None,
    drop_experts: Sequence[str | int] | None = None,
    layer_topk: Sequence[int] | dict[int, int] | None = None,
    params_dtype: torch.dtype | None = None,
    eval_mode: bool = True,
) -> CausalLM:
    """Load a megatron_bar checkpoint into this process.

    Starts a one-rank process group (gloo on CPU) when none exists; under torchrun it
    uses the parallel layout already initialised. ``moe_topk`` chooses how many experts
    each token uses (1..num_experts), overriding the checkpoint's value.

    Expert selection (MoE checkpoints only; see :mod:`megatron_bar.model.expert_select`):
    ``drop_experts`` lists experts that receive no token, by name (``"anchor"`` and the
    names in the merged checkpoint's ``bar_manifest.json``) or index; ``layer_topk``
    gives each layer its own top-k (a list, one per layer, or ``{layer: k}``). The router
    is renormalised over the experts that remain. A checkpoint written by
    ``tools/quantize.py`` loads with its nvidia-modelopt quantizers (fake quantization).
    """
    if not platform.is_initialized():
        platform.initialize()
    path = Path(path)
    cfg = ModelConfig.load(path)
    if moe_topk is not None:
        cfg = cfg.with_(moe_topk=moe_topk)
    selection = None
    if drop_experts or layer_topk is not None:
        # checked before the model is built: a bad name fails in milliseconds
        selection = resolve_selection(cfg, expert_names(path, cfg.num_experts), drop_experts,
                                      layer_topk, where=str(path))
    gpt = build_model(cfg, params_dtype=params_dtype)
    from megatron_bar.serve.quantize import is_quantized_checkpoint, restore_quantizers

    if is_quantized_checkpoint(path):
        gpt = restore_quantizers(gpt, path)
    load_weights(gpt, cfg, path)
    if selection is not None:
        apply_selection(gpt, selection)
    model = CausalLM(gpt, cfg)
    model.expert_selection = selection
    return model.eval() if eval_mode else model
