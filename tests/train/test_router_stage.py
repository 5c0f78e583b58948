"""Stage 3 on a real merge: two domain experts trained apart, merged, then the router
stage with router rows initialised from domain means - only the router changes, and the
routing statistics show each domain's tokens leaning to its own expert."""

import json
from pathlib import Path

import pytest
import torch

from megatron_bar.bar.merge import merge_experts
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import load_weights
from megatron_bar.model.config import ModelConfig
from megatron_bar.train.config import load_config
from megatron_bar.train.trainer import train

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny" / "sft_tool_use.yaml"


def _datasets(*pairs):
    return json.dumps([{"path": str(p), "kind": "chat", "domain": d} for d, p in pairs])


def _state(path):
    cfg = ModelConfig.load(path)
    model = build_model(cfg, perform_initialization=False)
    load_weights(model, cfg, path)
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_router_stage_on_merged_experts(tiny_base, toy_data, tmp_path):
    experts = []
    for domain in ("tool_use", "general"):
        result = train(load_config(CONFIG, [
            f"model.load={tiny_base['bar2']}", f"data.datasets={_datasets((domain, toy_data[domain]))}",
            "train.steps=25", "optim.lr=1e-2", f"train.output_dir={tmp_path / domain}",
            "checkpoint.interval=1000", "router.stats=false", "data.add_special_tokens=[]",
        ]))
        experts.append((domain, result.final_checkpoint))
    merged = tmp_path / "merged"
    merge_experts(experts, merged, print_fn=lambda *a: None)

    out = tmp_path / "router"
    result = train(load_config(CONFIG, [
        f"model.load={merged}",
        f"data.datasets={_datasets(('tool_use', toy_data['tool_use']), ('general', toy_data['general']))}",
        "train.stage=router", "train.steps=6", "data.sample_fraction=0.25", "router.init=domain_means",
        "optim.lr=1e-3", f"train.output_dir={out}", "checkpoint.interval=1000", "data.add_special_tokens=[]",
    ]))

    # only the router moved
    before, after = _state(merged), _state(result.final_checkpoint)
    for key, value in before.items():
        if key.endswith("mlp.router.weight"):
            assert not torch.equal(value, after[key]), key
        else:
            assert torch.equal(value, after[key]), f"router stage changed {key}"

    # the merged model's manifest goes on with it: the router-trained model can be upgraded
    from megatron_bar.bar.merge import read_manifest, upgrade

    manifest = read_manifest(result.final_checkpoint)
    assert [e["name"] for e in manifest["experts"]] == ["tool_use", "general"]
    assert manifest["history"][-1]["op"] == "router"
    upgraded = upgrade(result.final_checkpoint, tmp_path / "upgraded", replace=[experts[0]],
                       print_fn=lambda *a: None)
    assert upgraded.written is not None and (tmp_path / "upgraded" / "bar_manifest.json").is_file()

    start = json.loads((out / "router_stats_start.json").read_text())
    end = json.loads((out / "router_stats.json").read_text())
    assert start["experts"] == ["anchor", "tool_use", "general"]
    assert (out / "router_stats.png").stat().st_size > 1000
    for stats in (start, end):
        for d in stats["domains"].values():
            for layer in d["per_layer"] + d["weight_per_layer"]:
                assert abs(sum(layer) - 1.0) < 1e-6
    # rows initialised from domain means: each domain leans to its own expert, in the
    # selections and in the routing weights
    for key in ("mean", "weight_mean"):
        share = {d: start["domains"][d][key] for d in ("tool_use", "general")}
        assert share["tool_use"][1] > share["general"][1], key
        assert share["general"][2] > share["tool_use"][2], key


def test_routing_weight_share_tells_experts_apart_at_full_topk(mcore_moe_dir):
    """With every expert active each is selected for every token (selection shares 1/N);
    the weight share is the mean of the router's softmax, computed here independently."""
    from megatron_bar.bar.router_stats import routing_shares
    from megatron_bar.model.load import load_model

    cfg_e = json.loads((mcore_moe_dir / "model_config.json").read_text())["num_experts"]
    model = load_model(mcore_moe_dir, moe_topk=cfg_e)
    gpt = model.gpt
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).expand(2, 12)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, m in gpt.named_modules() if n.endswith("mlp.router")]
    shares = routing_shares(gpt, {"d": [(tokens, positions, None)]})
    for h in hooks:
        h.remove()
    d = shares["domains"]["d"]
    for layer in d["per_layer"]:
        assert all(abs(x - 1 / cfg_e) < 1e-9 for x in layer)
    routers = [m for n, m in gpt.named_modules() if n.endswith("mlp.router")]
    names = [n for n, m in gpt.named_modules() if n.endswith("mlp.router")]
    for layer_share, name, router in zip(d["weight_per_layer"], names, routers):
        x = inputs[name].reshape(-1, inputs[name].size(-1)).float()
        probs = torch.softmax(x @ router.weight.float().t(), dim=-1).mean(0)
        assert torch.allclose(torch.tensor(layer_share, dtype=torch.float64), probs.double() / probs.sum(), atol=1e-5)
    assert max(max(layer) - min(layer) for layer in d["weight_per_layer"]) > 1e-3


def _moe_and_three_domains(mcore_moe_dir, seed):
    """The MoE fixture with every expert active, and one batch of each of three synthetic
    domains (general, a, b: tokens from disjoint id ranges)."""
    from megatron_bar.model.load import load_model

    num_experts = json.loads((mcore_moe_dir / "model_config.json").read_text())["num_experts"]
    gpt = load_model(mcore_moe_dir, moe_topk=num_experts).gpt
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(16).expand(4, 16)
    ranges = {"general": (0, 30), "a": (30, 60), "b": (60, 90)}
    batches = {d: [(torch.randint(lo, hi, (4, 16), generator=g), positions, None)] for d, (lo, hi) in ranges.items()}
    return gpt, num_experts, ranges, batches


def test_domain_probe_init_routes_each_domain_to_its_expert(mcore_moe_dir):
    """The classifier init on three synthetic domains (tokens from disjoint id ranges):
    afterwards the routing weights, measured by a forward pass of the model, put each
    domain's tokens on its own expert (general's on the anchor), in every layer; the
    random router before it does not."""
    from megatron_bar.bar.router_stats import domain_probe_router_init, routing_shares

    gpt, num_experts, ranges, batches = _moe_and_three_domains(mcore_moe_dir, seed=0)
    expert_domains = [None, "a", "b"] + [f"unused{e}" for e in range(3, num_experts)]
    with pytest.raises(ValueError, match="unused3"):
        domain_probe_router_init(gpt, batches, expert_domains)
    expert_domains = expert_domains[:3] + ["b"] * (num_experts - 3)
    own = {"general": 0, "a": 1, "b": 2}

    def top_expert_per_layer():
        shares = routing_shares(gpt, batches)["domains"]
        return {d: [max(range(num_experts), key=layer.__getitem__) for layer in shares[d]["weight_per_layer"]]
                for d in ranges}

    before = top_expert_per_layer()
    assert any(e != own[d] for d, tops in before.items() for e in tops)
    accuracy = domain_probe_router_init(gpt, batches, expert_domains)
    assert len(accuracy) > 1 and min(accuracy.values()) > 0.9
    assert top_expert_per_layer() == {d: [own[d]] * len(before[d]) for d in ranges}


def test_domain_routing_init_keeps_each_experts_own_split_with_the_anchor(mcore_moe_dir):
    """own_routing: a domain's tokens split between the anchor and their expert as that
    expert's rows split them before (computed here from the rows and the layer's inputs),
    and the other experts get (almost) nothing."""
    from megatron_bar.bar.router_stats import _RouterTap, domain_probe_router_init

    gpt, num_experts, ranges, batches = _moe_and_three_domains(mcore_moe_dir, seed=1)
    expert_domains = [None, "a"] + ["b"] * (num_experts - 2)
    router0 = next(m for n, m in gpt.named_modules() if n.endswith("layers.0.mlp.router"))

    def layer0(domain):
        tap = _RouterTap(gpt, keep_inputs=True)
        with torch.no_grad():
            gpt(*batches[domain][0][:2], None)
        tap.close()
        x = tap.inputs[0][0]
        return x, torch.softmax(x @ router0.weight.float().t(), dim=-1)

    x, _ = layer0("a")
    expected = torch.softmax(x @ router0.weight.float()[[0, 1]].t(), dim=-1)
    domain_probe_router_init(gpt, batches, expert_domains, own_routing=True, steps=600, lr=3e-2, weight_decay=0.0)
    _, probs = layer0("a")
    assert probs[:, 2:].sum(-1).mean() < 0.05
    split = probs[:, 1] / probs[:, :2].sum(-1)
    # the split follows the token (one linear map also keeps the other experts off, so it
    # is a fit, not an identity): much closer than the best constant split
    error = (split - expected[:, 1]).abs().mean()
    constant = (expected[:, 1].median() - expected[:, 1]).abs().mean()
    corr = torch.corrcoef(torch.stack([split, expected[:, 1]]))[0, 1]
    assert error < 0.8 * constant and corr > 0.7, (error, constant, corr)
