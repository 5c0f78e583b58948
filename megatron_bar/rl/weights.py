"""The trainer's weights in the HF layout, for the rollout workers.

Every rank calls :func:`gather_hf_state_dict`; TP shards are gathered along their
partition axis, experts across the expert-parallel group, and the result goes through
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
    """The TP=EP=1 ``state_dict`` of ``model`` on rank 0 (``None`` elsewhere)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("weight sync from pipeline-parallel trainers is not supported yet")
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
    return full if dist.get_rank() == 0 else None


def gather_hf_state_dict(model, cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    state = gather_mcore_state_dict(model, cfg)
    if state is None:
        return None
    hf = {}
    for m in keymap.tensor_maps(cfg):
        for key, tensor in zip(m.hf, keymap.to_hf(m, state[m.mcore], cfg)):
            hf[key] = tensor.contiguous()
    return hf
