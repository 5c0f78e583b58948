"""Where the router sends each domain's tokens, and router initialisation from domains.

``routing_shares`` runs sequences of each domain through the model and measures, per MoE
layer, two things per expert: the share of (token, top-k slot) assignments it got, and
its share of the routing weight (the mean of the weights the router gives it - with every
expert active, top-k = N, each is selected for every token and only the weights tell the
experts apart); written as JSON and drawn as a domain x expert heatmap of the weights. ``domain_mean_router_init`` sets each
expert's router row to the mean hidden state its domain's tokens bring to that layer
(FlexOlmo initialises router embeddings from domain data): a token then scores highest
on the expert whose domain it resembles.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bar import platform


def _routers(model) -> list[tuple[int, torch.nn.Module]]:
    out = []
    for name, module in model.named_modules():
        if name.endswith("mlp.router"):
            out.append((int(name.split("layers.")[1].split(".")[0]), module))
    return out


class _RouterTap:
    """Forward hooks that record each router's input hidden states and routing map."""

    def __init__(self, model, keep_inputs: bool = False):
        self.maps: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.weights: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.inputs: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.handles = []
        for layer, router in _routers(model):
            self.handles.append(router.register_forward_hook(self._hook(layer, keep_inputs)))

    def _hook(self, layer, keep_inputs):
        def hook(module, args, output):
            probs, routing_map = output  # probs: each expert's weight, 0 where not selected
            self.maps[layer].append(routing_map.detach().reshape(-1, routing_map.size(-1)))
            self.weights[layer].append(probs.detach().float().reshape(-1, probs.size(-1)))
            if keep_inputs:
                x = args[0]
                self.inputs[layer].append(x.detach().reshape(-1, x.size(-1)).float())

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _run(model, batches):
    device = platform.device()
    with torch.no_grad():
        for tokens, position_ids, attention_mask in batches:
            model(tokens.to(device), position_ids.to(device),
                  None if attention_mask is None else attention_mask.to(device))


def routing_shares(model, domain_batches: dict[str, list], expert_names: list[str] | None = None):
    """{"experts": names, "domains": {domain: {"per_layer": [[share per expert]...],
    "mean": [share per expert]}}} over the tokens of each domain's batches.

    ``domain_batches[d]`` is a list of (tokens [b, s], position_ids, attention_mask | None).
    Padding tokens are counted too (they are a small share in packed data).
    """
    was_training = model.training
    model.eval()
    result = {"domains": {}}
    num_experts = None
    for domain, batches in domain_batches.items():
        tap = _RouterTap(model)
        try:
            _run(model, batches)
        finally:
            tap.close()
        per_layer, weight_per_layer = [], []
        for layer in sorted(tap.maps):
            counts = torch.cat(tap.maps[layer]).sum(0).double()
            num_experts = counts.numel()
            per_layer.append((counts / counts.sum().clamp(min=1)).tolist())
            weights = torch.cat(tap.weights[layer]).sum(0).double()
            weight_per_layer.append((weights / weights.sum().clamp(min=1e-12)).tolist())
        mean = torch.tensor(per_layer).mean(0).tolist() if per_layer else []
        weight_mean = torch.tensor(weight_per_layer).mean(0).tolist() if weight_per_layer else []
        result["domains"][domain] = {"per_layer": per_layer, "mean": mean,
                                     "weight_per_layer": weight_per_layer, "weight_mean": weight_mean}
    result["experts"] = expert_names or [f"expert{e}" for e in range(num_experts or 0)]
    model.train(was_training)
    return result


def write_routing_report(shares: dict, out_dir: str | Path, stem: str = "router_stats") -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(shares, indent=2) + "\n")
    domains = list(shares["domains"])
    # the weights: with every expert active the selection shares are all 1/N
    matrix = [shares["domains"][d].get("weight_mean", shares["domains"][d]["mean"]) for d in domains]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(shares["experts"]), 1.0 + 0.5 * len(domains)), dpi=120)
    im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(shares["experts"])), shares["experts"], rotation=30, ha="right")
    ax.set_yticks(range(len(domains)), domains)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    ax.set_title("share of the routing weight per expert (mean over layers)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    png_path = out_dir / f"{stem}.png"
    fig.savefig(png_path)
    plt.close(fig)
    return json_path, png_path


@torch.no_grad()
def domain_mean_router_init(model, domain_batches: dict[str, list], expert_domains: list[str | None]):
    """Set router row e of every layer to the mean router input over ``expert_domains[e]``'s
    tokens (rows whose domain is None - the anchor - get the mean over all domains).

    Rows are scaled to the mean norm of the existing non-zero rows (or 1 when all are zero)
    so that the router's logit scale stays where training left it.
    """
    tap = _RouterTap(model, keep_inputs=True)
    means: dict[str, dict[int, torch.Tensor]] = {}
    try:
        for domain, batches in domain_batches.items():
            for lst in tap.inputs.values():
                lst.clear()
            _run(model, batches)
            means[domain] = {layer: torch.cat(xs).mean(0) for layer, xs in tap.inputs.items()}
    finally:
        tap.close()
    _check_domains_have_data(domain_batches, expert_domains)
    for layer, router in _routers(model):
        weight = router.weight
        overall = torch.stack([means[d][layer] for d in means]).mean(0)
        norms = weight.norm(dim=1)
        scale = norms[norms > 0].mean().item() if (norms > 0).any() else 1.0
        for e, domain in enumerate(expert_domains):
            row = means[domain][layer] if domain is not None else overall
            weight[e].copy_((row / row.norm().clamp(min=1e-12) * scale).to(weight.dtype))
    for _, router in _routers(model):
        _broadcast_from_first_data_parallel_rank(router)


def _check_domains_have_data(domain_batches: dict[str, list], expert_domains: list[str | None]) -> None:
    missing = {d for d in expert_domains if d is not None} - set(domain_batches)
    if missing:
        raise ValueError(f"router init: no data for expert domain(s) {sorted(missing)}")


def _broadcast_from_first_data_parallel_rank(router) -> None:
    """Every data-parallel rank keeps the first one's rows (each fitted on its own batches)."""
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.broadcast(router.weight.data, src=parallel_state.get_data_parallel_global_ranks()[0],
                       group=parallel_state.get_data_parallel_group())


@torch.no_grad()
def domain_probe_router_init(model, domain_batches: dict[str, list], expert_domains: list[str | None],
                             own_routing: bool = False, steps: int = 300, lr: float = 1e-2,
                             weight_decay: float = 1e-2) -> dict[int, float]:
    """Fit every layer's router, a bias-free linear map of its input, to the domains of the
    tokens (every token of each domain's batches), layer by layer, first to last, each on
    the inputs the layers before it produce once routed so. A domain no expert has (general
    chat) goes to the expert whose domain is None (the anchor).

    The target of a token of an expert's domain: that expert (``own_routing=False``: a
    classifier of the domains), or the split between the anchor and that expert which the
    router's current rows give it (``own_routing=True``: each expert's own rows, trained
    with the anchor in its stages, decide as they did there, and every other expert gets
    nothing) - the routing under which each expert was trained.

    FlexOlmo seeds the router from domain embeddings; at toy scale (width 128) the mean
    hidden states of the domains are nearly parallel, so such rows route almost uniformly,
    while a linear map of the same inputs separates the domains. Returns each layer's
    share of tokens whose largest weight is on their target's largest."""
    anchor = expert_domains.index(None) if None in expert_domains else None
    label: dict[str, int] = {}  # domain -> its (first) expert, else the anchor
    for d in domain_batches:
        label[d] = expert_domains.index(d) if d in expert_domains else anchor
        if label[d] is None:
            raise ValueError(f"router init: domain {d!r} has no expert and there is no anchor")
    _check_domains_have_data(domain_batches, expert_domains)
    accuracy = {}
    for layer, router in _routers(model):
        tap = _RouterTap(model, keep_inputs=True)
        xs, targets = [], []
        try:
            for domain, batches in domain_batches.items():
                for lst in tap.inputs.values():
                    lst.clear()
                _run(model, batches)
                x = torch.cat(tap.inputs[layer])
                target = torch.zeros(len(x), router.weight.size(0), device=x.device)
                expert = label[domain]
                if own_routing and anchor is not None and expert != anchor:
                    pair = [anchor, expert]
                    target[:, pair] = torch.softmax(x @ router.weight.float()[pair].t(), dim=-1)
                else:
                    target[:, expert] = 1.0
                xs.append(x)
                targets.append(target)
        finally:
            tap.close()
        x, target = torch.cat(xs), torch.cat(targets)
        start = router.weight.float() if own_routing else torch.zeros_like(router.weight, dtype=torch.float32)
        weight = start.detach().clone().requires_grad_()
        opt = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(x @ weight.t(), target).backward()
                opt.step()
        accuracy[layer] = ((x @ weight.t()).argmax(-1) == target.argmax(-1)).float().mean().item()
        router.weight.copy_(weight.detach().to(router.weight.dtype))
        _broadcast_from_first_data_parallel_rank(router)  # before the next layer's inputs
    return accuracy
