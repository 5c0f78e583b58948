"""Which experts serve: dropping named experts and a top-k per layer, at load time.

A BAR model pays for every expert it carries; serving it without one (to measure what
the safety expert adds, say) or with fewer active experts in some layers is a routing
decision, not a new checkpoint. Both act on megatron's ``TopKRouter`` of each MoE layer:

* **dropping** masks the dropped experts' router logits to ``-inf`` before the score
  function, so the router is renormalised over what remains: with FlexOlmo's softmax
  over all experts (``norm_topk_prob=False``) the softmax runs over the remaining
  experts, i.e. every remaining weight is divided by ``1 - p(dropped)``; with the
  renormalised top-k the weights are the softmax over the chosen k, as before. A token
  whose top-k did not contain a dropped expert keeps its experts - and, with the
  renormalised top-k (the merged BAR default), its exact output.
* **per-layer top-k** gives each layer's router (and its token dispatcher) its own k.

The weights are untouched (the state dict is the checkpoint's); dropped experts stay in
memory but receive no token.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_bar.bar.manifest import ANCHOR_NAME as ANCHOR  # noqa: F401 - the name of expert 0
from megatron_bar.bar.manifest import expert_names  # noqa: F401 - model.load's, from the manifest
from megatron_bar.model.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class ExpertSelection:
    """Resolved selection: expert indices dropped and the top-k of each layer."""

    dropped: tuple[int, ...]
    layer_topk: tuple[int, ...]
    names: tuple[str, ...]

    def active(self) -> list[int]:
        return [e for e in range(len(self.names)) if e not in self.dropped]

    def describe(self) -> str:
        dropped = ", ".join(self.names[e] for e in self.dropped) or "none"
        return f"dropped: {dropped}; top-k per layer: {list(self.layer_topk)}"


def resolve_selection(
    cfg: ModelConfig,
    names: Sequence[str],
    drop_experts: Sequence[str | int] | None = None,
    layer_topk: Sequence[int] | dict[int, int] | None = None,
    where: str = "model",
) -> ExpertSelection:
    """Check the options against the model and turn names into indices."""
    if not cfg.is_moe:
        raise ConfigError(
            f"{where} is a dense model without a router: drop_experts / layer_topk need a "
            "MoE (BAR / FlexOlmo) checkpoint"
        )
    dropped = []
    for item in drop_experts or ():
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            e = int(item)
            if not 0 <= e < cfg.num_experts:
                raise ConfigError(f"{where}: expert index {e} is not in 0..{cfg.num_experts - 1}")
        elif item in names:
            e = list(names).index(item)
        else:
            raise ConfigError(f"{where}: no expert named {item!r}; experts are {list(names)}")
        if e not in dropped:
            dropped.append(e)
    remaining = cfg.num_experts - len(dropped)
    if remaining < 1:
        raise ConfigError(f"{where}: dropping {len(dropped)} of {cfg.num_experts} experts leaves none")

    if layer_topk is None:
        per_layer = [cfg.moe_topk] * cfg.num_layers
    elif isinstance(layer_topk, dict):
        bad = sorted(set(layer_topk) - set(range(cfg.num_layers)))
        if bad:
            raise ConfigError(f"{where}: layer_topk names layers {bad}; layers are 0..{cfg.num_layers - 1}")
        per_layer = [int(layer_topk.get(i, cfg.moe_topk)) for i in range(cfg.num_layers)]
    else:
        per_layer = [int(k) for k in layer_topk]
        if len(per_layer) != cfg.num_layers:
            raise ConfigError(
                f"{where}: layer_topk has {len(per_layer)} entries for {cfg.num_layers} layers"
            )
    # Without an explicit per-layer k, a top-k above what remains shrinks to what remains.
    if layer_topk is None:
        per_layer = [min(k, remaining) for k in per_layer]
    for i, k in enumerate(per_layer):
        if not 1 <= k <= remaining:
            raise ConfigError(
                f"{where}: layer {i} top-k {k} must be in 1..{remaining} (experts left after dropping)"
            )
    return ExpertSelection(tuple(sorted(dropped)), tuple(per_layer), tuple(names))


class SelectiveTopKRouter(TopKRouter):
    """megatron's TopKRouter whose logits of dropped experts are ``-inf``.

    Installed on an existing router by :func:`apply_selection` (its class is swapped, so
    its parameters, hooks and state dict stay as they are).
    """

    dropped_mask: torch.Tensor | None = None

    def gating(self, input: torch.Tensor):
        logits = super().gating(input)
        if self.dropped_mask is not None:
            logits = logits.masked_fill(self.dropped_mask.to(logits.device), float("-inf"))
        return logits


def _moe_layers(gpt) -> list[tuple[int, torch.nn.Module]]:
    out = []
    for layer in gpt.decoder.layers:
        mlp = layer.mlp
        if hasattr(mlp, "router"):
            out.append((layer.layer_number - 1, mlp))  # megatron numbers layers from 1
    return out


def apply_selection(gpt, selection: ExpertSelection) -> None:
    """Install ``selection`` on this rank's MoE layers."""
    num_experts = len(selection.names)
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[list(selection.dropped)] = True
    for index, mlp in _moe_layers(gpt):
        router = mlp.router
        if type(router) not in (TopKRouter, SelectiveTopKRouter):
            raise ConfigError(f"layer {index}: router {type(router).__name__} is not megatron's TopKRouter")
        router.__class__ = SelectiveTopKRouter
        router.dropped_mask = mask if selection.dropped else None
        k = selection.layer_topk[index]
        if k != router.config.moe_router_topk:
            # The config object is shared by every layer; this layer's router and token
            # dispatcher read their k from their own copy (the alltoall dispatcher sizes
            # its buffers from config.moe_router_topk).
            layer_config = copy.copy(router.config)
            layer_config.moe_router_topk = k
            router.config = layer_config
            if hasattr(mlp, "token_dispatcher"):
                mlp.token_dispatcher.config = layer_config
                if hasattr(mlp.token_dispatcher, "router_topk"):
                    mlp.token_dispatcher.router_topk = k
        router.topk = k
