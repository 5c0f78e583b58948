"""BAR's progressive unfreezing, as declared data.

Every parameter belongs to one group, decided by its name (and, for experts, its global
expert index, so the rule is the same at every TP / PP / EP layout). A stage's policy is
the set of groups it trains:

| stage    | trains                                                                   |
|----------|--------------------------------------------------------------------------|
| midtrain | domain experts, router (not the anchor's row)                            |
| sft      | + embeddings and LM head (new special tokens need them)                  |
| rlvr     | + attention and norms (every shared parameter)                           |
| router   | the router only, every row (stage 3: all experts and shared weights frozen) |
| full     | everything, the anchor too (dense baselines)                              |

The anchor expert (expert 0, the dense model's FFN) is frozen in every BAR stage, and so
is its router row: a row of a weight cannot be frozen with ``requires_grad``, so
:class:`FrozenRows` zeroes that row's gradient before each step and restores its bits
after, which keeps it bit-identical whatever the optimizer does. The same holds the
vocabulary rows of the tokens a stage did not add (``optim.train_only_added_vocab_rows``):
then a stage that adds special tokens trains their embedding and LM head rows and leaves
every other row as the anchor has it, so the merge's average of those rows loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bar import platform
from megatron_bar.bar.roles import ANCHOR_EXPERT, SHARED_GROUPS, role_of  # noqa: F401 - SHARED_GROUPS: the trainer's

EXPERT_STAGES = ("midtrain", "sft", "rlvr")  # BAR stage 1: the anchor is frozen

GROUPS = ("embedding", "lm_head", "attention", "norms", "router", "anchor_expert", "experts",
          "dense_mlp")


@dataclass(frozen=True)
class FreezePolicy:
    name: str
    trainable: frozenset[str]
    anchor_router_row_trainable: bool = False


def _policy(name, *groups, anchor_row=False):
    unknown = set(groups) - set(GROUPS)
    assert not unknown, unknown
    return FreezePolicy(name, frozenset(groups), anchor_row)


_STAGE1_MIDTRAIN = ("experts", "router")
FREEZE_POLICIES: dict[str, FreezePolicy] = {
    "midtrain": _policy("midtrain", *_STAGE1_MIDTRAIN),
    "sft": _policy("sft", *_STAGE1_MIDTRAIN, "embedding", "lm_head"),
    "rlvr": _policy("rlvr", *_STAGE1_MIDTRAIN, "embedding", "lm_head", "attention", "norms"),
    "router": _policy("router", "router", anchor_row=True),
    "full": _policy("full", *GROUPS, anchor_row=True),
}


def local_expert_offset(num_experts: int) -> int:
    """Global index of this rank's first expert under expert parallelism."""
    ep = parallel_state.get_expert_model_parallel_world_size()
    return parallel_state.get_expert_model_parallel_rank() * (num_experts // ep)


def param_group(name: str, num_experts: int = 0) -> str:
    """The freeze group of a parameter of this rank's model, by name (its role, the anchor
    told apart from the other experts)."""
    role = role_of(name)
    if role.group == "router":
        return "router"
    if role.group == "expert":
        if role.expert is None:
            raise ValueError(f"parameter {name!r}: expert parameter without an expert index")
        global_index = local_expert_offset(num_experts) + role.expert
        return "anchor_expert" if global_index == ANCHOR_EXPERT else "experts"
    return role.group


def apply_freeze_policy(model, policy: FreezePolicy, num_experts: int) -> dict[str, str]:
    """Set ``requires_grad`` from the policy (before DDP wraps the model); returns name->group."""
    groups = {}
    for name, param in model.named_parameters():
        group = param_group(name, num_experts)
        groups[name] = group
        param.requires_grad_(group in policy.trainable)
    if not any(p.requires_grad for p in model.parameters()) and _is_whole_model_here():
        raise ValueError(f"stage {policy.name!r} leaves nothing to train in this model")
    return groups


def _is_whole_model_here() -> bool:
    return parallel_state.get_pipeline_model_parallel_world_size() == 1


def freeze_counts(model, groups: dict[str, str]) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameter counts per group, of the whole model (all ranks)."""
    # Count each tensor's full (unsharded) size once: scale TP-split tensors by their TP
    # size on one TP rank, sum stages over PP, sum distinct experts over EP.
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    # on the collective backend's device (NCCL reduces GPU tensors only)
    dense = torch.zeros(len(GROUPS), 2, dtype=torch.float64, device=platform.device())
    expert = torch.zeros(len(GROUPS), 2, dtype=torch.float64, device=platform.device())
    for name, param in model.named_parameters():
        group = groups[name]
        is_expert = group in ("experts", "anchor_expert")
        if (etp_rank if is_expert else tp_rank) != 0:
            continue
        size = param.numel()
        if getattr(param, "tensor_model_parallel", False):
            size *= (parallel_state.get_expert_tensor_parallel_world_size() if is_expert
                     else parallel_state.get_tensor_model_parallel_world_size())
        target = expert if is_expert else dense
        target[GROUPS.index(group), 0 if param.requires_grad else 1] += size
    if dist.is_initialized():
        dist.all_reduce(dense, group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(expert, group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(expert, group=parallel_state.get_expert_model_parallel_group())
    total = (dense + expert).cpu()
    return {
        g: {"trainable": int(total[i, 0]), "frozen": int(total[i, 1])}
        for i, g in enumerate(GROUPS)
        if total[i].sum() > 0
    }


def format_freeze_table(policy: FreezePolicy, counts: dict[str, dict[str, int]]) -> str:
    lines = [f"freeze policy '{policy.name}':", f"  {'group':<14}{'trainable':>14}{'frozen':>14}"]
    for group, c in counts.items():
        lines.append(f"  {group:<14}{c['trainable']:>14,}{c['frozen']:>14,}")
    t = sum(c["trainable"] for c in counts.values())
    f = sum(c["frozen"] for c in counts.values())
    lines.append(f"  {'total':<14}{t:>14,}{f:>14,}")
    if "router" in policy.trainable:
        row = "trainable" if policy.anchor_router_row_trainable else "frozen"
        lines.append(f"  router row {ANCHOR_EXPERT} (the anchor's): {row}")
    return "\n".join(lines)


class FrozenRows:
    """Rows of trainable weights that keep their bits: their gradient is zeroed after
    backward (so they take no share of the clipped norm and Adam never moves them) and
    their bits are put back after the step (weight decay, Adam's eps)."""

    def __init__(self, rows: list[tuple[torch.nn.Parameter, torch.Tensor]]):
        self.rows = [(p, index) for p, index in rows if bool(index.any())]
        self.saved = [p.detach()[index].clone() for p, index in self.rows]

    @classmethod
    def of_stage(cls, model, policy: FreezePolicy, trained_vocab_rows: range | None = None) -> "FrozenRows":
        """The anchor's router row where the policy trains the router, and - when
        ``trained_vocab_rows`` is given - every embedding / LM head row outside it."""
        rows = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            group = role_of(name).group
            if group == "router" and not policy.anchor_router_row_trainable:
                index = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
                index[ANCHOR_EXPERT] = True
                rows.append((p, index))
            elif group in ("embedding", "lm_head") and trained_vocab_rows is not None:
                # Both shard the vocabulary evenly over TP ranks, in rank order.
                first = parallel_state.get_tensor_model_parallel_rank() * p.shape[0]
                ids = torch.arange(first, first + p.shape[0], device=p.device)
                trained = (ids >= trained_vocab_rows.start) & (ids < trained_vocab_rows.stop)
                rows.append((p, ~trained))
        return cls(rows)

    def mask_gradients(self) -> None:
        """After backward, before the optimizer."""
        for p, index in self.rows:
            for grad in (getattr(p, "main_grad", None), p.grad):
                if grad is not None:
                    grad[index] = 0

    @torch.no_grad()
    def restore(self) -> None:
        """After the optimizer step."""
        for (p, index), saved in zip(self.rows, self.saved):
            p[index] = saved
