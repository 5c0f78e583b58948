"""``megatron_bar.load_model``: a checkpoint as a module that maps tokens to logits."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_bar import platform
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import load_weights
from megatron_bar.model.config import ModelConfig


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
    params_dtype: torch.dtype | None = None,
    eval_mode: bool = True,
) -> CausalLM:
    """Load a megatron_bar checkpoint into this process.

    Starts a one-rank process group (gloo on CPU) when none exists; under torchrun it
    uses the parallel layout already initialised. ``moe_topk`` chooses how many experts
    each token uses (1..num_experts), overriding the checkpoint's value.
    """
    if not platform.is_initialized():
        platform.initialize()
    cfg = ModelConfig.load(path)
    if moe_topk is not None:
        cfg = cfg.with_(moe_topk=moe_topk)
    gpt = build_model(cfg, params_dtype=params_dtype)
    load_weights(gpt, cfg, path)
    model = CausalLM(gpt, cfg)
    return model.eval() if eval_mode else model
