"""The trainer's weights in the HF layout, for the rollout workers.

Every rank calls :func:`gather_hf_state_dict`; TP shards are gathered along their
partition axis, experts across the expert-parallel group, pipeline stages (each holding
its own layers, numbered locally) onto the first stage under their global layer numbers,
and the result goes through
the same key map as ``tools/convert_mcore_to_hf.py`` - so a rollout worker runs exactly
the model a conversion would export. Rank 0 receives the dict, the others ``None``.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bar.convert import keymap
from megatron_bar.model.config import ModelConfig

_LOCAL_EXPERT = re.compile(r"(.*\.experts\.local_experts\.)(\d+)(\..*)")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _gather(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _full_tensor(name: str, param: torch.Tensor) -> torch.Tensor:
    t = param.detach()
    if not getattr(param, "tensor_model_parallel", False):
        return t
    is_expert = ".experts." in name
    group = (parallel_state.get_expert_tensor_parallel_group() if is_expert
             else parallel_state.get_tensor_model_parallel_group())
    if name.endswith("linear_fc1.weight"):
        # SwiGLU: each rank holds [gate_r; up_r]; the full weight is [gate; up].
        gate, up = torch.chunk(t, 2, dim=0)
        return torch.cat([_gather(gate, 0, group), _gather(up, 0, group)], dim=0)
    return _gather(t, param.partition_dim, group)


@torch.no_grad()
def gather_mcore_state_dict(model, cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The TP=EP=PP=1 ``state_dict`` of ``model`` on rank 0 (``None`` elsewhere)."""
    full = {}
    ep = parallel_state.get_expert_model_parallel_world_size()
    per_rank = cfg.num_experts // ep if cfg.is_moe else 0
    local_experts: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        tensor = _full_tensor(name, param)
        m = _LOCAL_EXPERT.match(name)
        if m:
            local_experts[name] = tensor
        else:
            full[name] = tensor
    # Experts: every EP rank holds a different slice; gather them all, rename globally.
    for name in sorted(local_experts):
        m = _LOCAL_EXPERT.match(name)
        gathered = [torch.empty_like(local_experts[name]) for _ in range(ep)]
        if ep > 1:
            dist.all_gather(gathered, local_experts[name].contiguous(),
                            group=parallel_state.get_expert_model_parallel_group())
        else:
            gathered = [local_experts[name]]
        for r, t in enumerate(gathered):
            full[f"{m.group(1)}{r * per_rank + int(m.group(2))}{m.group(3)}"] = t
    return _gather_pipeline_stages(model, full)


def _global_layer_names(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``decoder.layers.{local}`` -> ``decoder.layers.{global}``: a stage numbers its own
    layers from 0; each TransformerLayer knows its global (1-based) ``layer_number``."""
    numbers = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    return {_LAYER.sub(lambda m: f"decoder.layers.{numbers[int(m.group(1))]}.", k): v
            for k, v in state.items()}


def _gather_pipeline_stages(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Every stage's (already TP/EP-gathered) tensors onto global rank 0, the first stage."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return state if dist.get_rank() == 0 else None
    state = _global_layer_names(model, state)
    group = parallel_state.get_pipeline_model_parallel_group()
    # Only the pipeline group of global rank 0 carries the result; the other groups (other
    # TP/DP/EP coordinates hold the same tensors) send nothing.
    first = dist.get_global_rank(group, 0)
    mine = state if first == 0 else None
    stages = [None] * pp if dist.get_rank() == first else None
    dist.gather_object({k: v.cpu() for k, v in mine.items()} if mine is not None else None,
                       stages, dst=first, group=group)
    if dist.get_rank() != 0:
        return None
    full: dict[str, torch.Tensor] = {}
    for stage in stages:
        overlap = set(full) & set(stage)
        if overlap:
            raise RuntimeError(f"pipeline stages both hold {sorted(overlap)[0]!r}")
        full.update(stage)
    return full


def gather_hf_state_dict(model, cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    state = gather_mcore_state_dict(model, cfg)
    if state is None:
        return None
    hf = {}
    for m in keymap.tensor_maps(cfg):
        for key, tensor in zip(m.hf, keymap.to_hf(m, state[m.mcore], cfg)):
            hf[key] = tensor.contiguous()
    return hf
