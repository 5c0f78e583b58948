"""Routing replay (R3, "rollout routing replay"): the trainer's MoE layers route each token
to the experts the rollout engine chose for it.

The rollout model and the trainer compute the router's logits with different kernels.
Where two experts score nearly alike, the two can pick different experts for a token;
the trainer's log-prob of that token then belongs to another network than the one that
sampled it, and the importance ratios of RL stop meaning what they should (MoE RL runs
without replay collapsed in Megatron-LM #4168; verl #3762 and NeMo-RL #1253 ask for it).
With replay, the trainer's top-k *selection* is the rollout's; the routing *weights*
still come from the trainer's router, so the router keeps its gradient.

megatron-core 0.16.1 provides the mechanism (``moe_enable_routing_replay`` gives every
``TopKRouter`` a ``RouterReplay``, whose ``REPLAY_FORWARD`` action takes the target top-k
indices instead of computing them). This module feeds it: the rollout worker records the
indices (:class:`megatron_bar.rl.rollout._RoutingRecorder`), and :class:`RoutingReplay`
hands each microbatch's indices to this rank's routers before its forward pass.

We set each router's targets directly instead of through ``RouterReplay``'s global
instance list: that list also holds the routers of any other model built in the process
(the KL reference, a test's second model).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.router_replay import RouterReplayAction


def stack_routing(routings: list[torch.Tensor], length: int, top_k: int) -> torch.Tensor:
    """Per-sample rollout routing ``[layers, positions_i, k]`` -> one microbatch's
    ``[layers, length, batch, k]`` (megatron's sequence-first token order), cut or padded to
    ``length`` positions. Padding positions get experts ``0..k-1``: they carry no loss, and
    the causal mask keeps them from the positions before them."""
    layers = routings[0].size(0)
    out = torch.arange(top_k, dtype=torch.long).expand(layers, length, len(routings), top_k).clone()
    for b, r in enumerate(routings):
        if r.size(0) != layers or r.size(2) != top_k:
            raise ValueError(f"sample {b}: routing {tuple(r.shape)} is not [{layers}, positions, {top_k}]")
        n = min(r.size(1), length)
        out[:, :n, b] = r[:, :n].long()
    return out


class RoutingReplay:
    """This rank's routers of ``model`` (its pipeline stage), set to replay given experts."""

    def __init__(self, model):
        self.routers: dict[int, object] = {}  # global layer index (0-based) -> TopKRouter
        for module in model.modules():
            router = getattr(getattr(module, "mlp", None), "router", None)
            if router is not None and getattr(router, "router_replay", None) is not None:
                self.routers[module.layer_number - 1] = router
        if not self.routers:
            raise ValueError("routing replay: the model has no router built with "
                             "moe_enable_routing_replay=True")
        self.sequence_parallel = next(iter(self.routers.values())).config.sequence_parallel

    def set(self, routing: torch.Tensor) -> None:
        """Replay ``routing`` ``[layers, seq, batch, k]`` (all layers of the model) in the
        next forward pass."""
        if self.sequence_parallel:
            # Under sequence parallelism the router sees this TP rank's slice of the sequence.
            tp = parallel_state.get_tensor_model_parallel_world_size()
            rank = parallel_state.get_tensor_model_parallel_rank()
            chunk = routing.size(1) // tp
            routing = routing[:, rank * chunk : (rank + 1) * chunk]
        for layer, router in self.routers.items():
            if layer >= routing.size(0):
                raise ValueError(f"routing has {routing.size(0)} layers, the model's layer {layer + 1} "
                                 "has a router")
            replay = router.router_replay
            replay.clear_indices()  # no REPLAY_BACKWARD list to grow: nothing reruns routing
            replay.set_target_indices(routing[layer].reshape(-1, routing.size(-1)))
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def clear(self) -> None:
        """Back to the routers' own top-k."""
        for router in self.routers.values():
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()
