"""What a parameter is to BAR, by its name in any of the three naming schemes:

* HF (Olmo 2 / FlexOlmo): ``model.embed_tokens.weight``, ``model.layers.3.self_attn.q_proj.weight``,
  ``model.layers.3.mlp.gate.weight`` (the router), ``model.layers.3.mlp.experts.1.up_proj.weight``;
* megatron module (``model.named_parameters()``): ``embedding.word_embeddings.weight``,
  ``decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight`` or ``...experts.linear_fc1.weight1``;
* megatron checkpoint key (layers and experts stacked): ``decoder.layers.mlp.experts.experts.linear_fc1.weight``.

The groups are the names the freeze policies and ``optim.shared_lr_scale_by_group`` use.
An attention block's own norms (the QK norms) belong to ``attention``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GROUPS = ("embedding", "lm_head", "attention", "norms", "router", "expert", "dense_mlp")
SHARED_GROUPS = ("embedding", "lm_head", "attention", "norms")  # what the merge averages
ANCHOR_EXPERT = 0

_EXPERT_INDEX = re.compile(r"\.experts\.(?:local_experts\.)?(\d+)\.|\.experts\.linear_fc[12]\.weight(\d+)$")


@dataclass(frozen=True)
class Role:
    group: str  # one of GROUPS
    expert: int | None = None  # the expert's index in the name (a module's: local to its rank)


def role_of(name: str) -> Role:
    """The role of parameter / tensor ``name`` (a ValueError if it has none)."""
    if name.startswith(("embedding.", "model.embed_tokens.")):
        return Role("embedding")
    if name.startswith(("output_layer.", "lm_head.")):
        return Role("lm_head")
    if ".self_attention." in name or ".self_attn." in name:
        return Role("attention")
    if "norm" in name:
        return Role("norms")
    if name.endswith(("mlp.router.weight", "mlp.gate.weight")):
        return Role("router")
    if ".mlp.experts." in name:
        m = _EXPERT_INDEX.search(name)
        return Role("expert", int(m.group(1) or m.group(2)) if m else None)
    if ".mlp." in name:
        return Role("dense_mlp")
    raise ValueError(f"parameter {name!r} has no BAR role (embedding, attention, norm, router, expert, ...)")


def is_shared(name: str) -> bool:
    """Averaged by the merge, trained or frozen as a group in the expert stages."""
    return role_of(name).group in SHARED_GROUPS
