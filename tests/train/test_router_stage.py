"""Stage 3 on a real merge: two domain experts trained apart, merged, then the router
stage with router rows initialised from domain means - only the router changes, and the
routing statistics show each domain's tokens leaning to its own expert."""

import json
from pathlib import Path

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

    start = json.loads((out / "router_stats_start.json").read_text())
    end = json.loads((out / "router_stats.json").read_text())
    assert start["experts"] == ["anchor", "tool_use", "general"]
    assert (out / "router_stats.png").stat().st_size > 1000
    for stats in (start, end):
        for d in stats["domains"].values():
            for layer in d["per_layer"]:
                assert abs(sum(layer) - 1.0) < 1e-6
    # rows initialised from domain means: each domain leans to its own expert
    share = {d: start["domains"][d]["mean"] for d in ("tool_use", "general")}
    assert share["tool_use"][1] > share["general"][1]
    assert share["general"][2] > share["tool_use"][2]
