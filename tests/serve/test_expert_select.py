"""Expert selection at load time: dropping experts and a top-k per layer.

References are the undropped model's own routing and outputs: a causal model's token t
depends only on positions <= t, so a token none of whose prefix was routed to the
dropped expert (in any layer) must come out exactly as before.
"""

import pytest
import torch

import megatron_bar
from megatron_bar.model.config import ConfigError


def routed(model, tokens):
    """Logits, and per layer the routing map [b, s, E] and probs [b, s, E]."""
    maps, probs, handles = [], [], []
    s, b = tokens.size(1), tokens.size(0)

    def hook(module, args, out):
        p, m = out
        maps.append(m.view(s, b, -1).transpose(0, 1).clone())
        probs.append(p.view(s, b, -1).transpose(0, 1).clone())

    for layer in model.gpt.decoder.layers:
        handles.append(layer.mlp.router.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(tokens)
    finally:
        for h in handles:
            h.remove()
    return logits, maps, probs


def tokens_for(vocab, n=64, seq=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


def test_dropping_an_expert_changes_only_its_tokens(bar_merged):
    full = megatron_bar.load_model(bar_merged)
    assert full.config.norm_topk_prob and full.config.moe_topk == 2
    dropped = megatron_bar.load_model(bar_merged, drop_experts=["general"])
    d = 2  # the manifest's second domain expert
    assert dropped.expert_selection.dropped == (d,)
    tokens = tokens_for(full.config.vocab_size)
    ref, ref_maps, _ = routed(full, tokens)
    got, maps, probs = routed(dropped, tokens)

    # the dropped expert gets nothing; each token still has top-2 weights summing to 1
    for m, p in zip(maps, probs):
        assert not m[..., d].any()
        assert (m.sum(-1) == 2).all()
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    # tokens whose prefix never touched expert d, in any layer, are unchanged
    touched = torch.stack([m[..., d] for m in ref_maps]).any(0).cummax(dim=1).values  # [b, s]
    clean = ~touched
    assert 10 < clean.sum() < clean.numel() - 10, "the test needs both kinds of tokens"
    diff = (got - ref).abs().amax(-1)
    assert diff[clean].max() <= 1e-5, f"untouched tokens moved by {diff[clean].max():.3g}"
    assert diff[touched].max() > 1e-2, "dropping the expert changed nothing"
    # by index it is the same selection
    again = megatron_bar.load_model(bar_merged, drop_experts=[2])
    with torch.no_grad():
        assert torch.equal(again(tokens), got)


def test_dropping_renormalises_flexolmo_softmax(mcore_moe_dir):
    """FlexOlmo's softmax over all experts (norm_topk_prob False): a token that kept its
    experts has each weight divided by 1 - p(dropped)."""
    full = megatron_bar.load_model(mcore_moe_dir)
    assert not full.config.norm_topk_prob
    dropped = megatron_bar.load_model(mcore_moe_dir, drop_experts=[1])
    tokens = tokens_for(full.config.vocab_size, n=8, seq=8)
    # router inputs of the first layer are the same in both models
    x = {}

    def keep_input(module, args, out):
        x.setdefault("in", args[0])

    h = full.gpt.decoder.layers[0].mlp.router.register_forward_hook(keep_input)
    with torch.no_grad():
        full(tokens)
    h.remove()
    r_full, r_drop = full.gpt.decoder.layers[0].mlp.router, dropped.gpt.decoder.layers[0].mlp.router
    with torch.no_grad():
        p_all = torch.softmax(r_full.gating(x["in"]).view(-1, 4).float(), -1)
        probs_f, map_f = r_full(x["in"])
        probs_d, map_d = r_drop(x["in"])
    kept = ~map_f[:, 1]
    assert kept.sum() > 4 and (~kept).sum() > 4
    assert torch.equal(map_d[kept], map_f[kept])
    want = probs_f[kept] / (1 - p_all[kept, 1:2])
    torch.testing.assert_close(probs_d[kept], want * map_f[kept], rtol=1e-5, atol=1e-6)
    assert not map_d[:, 1].any()


def test_layer_topk(bar_merged):
    tokens = tokens_for(400, n=4, seq=8)
    base1 = megatron_bar.load_model(bar_merged, moe_topk=1)
    same = megatron_bar.load_model(bar_merged, layer_topk=[1, 1])
    mixed = megatron_bar.load_model(bar_merged, layer_topk={0: 1})
    with torch.no_grad():
        assert torch.equal(same(tokens), base1(tokens))
    _, maps, _ = routed(mixed, tokens)
    assert (maps[0].sum(-1) == 1).all() and (maps[1].sum(-1) == 2).all()
    # the checkpoint's k shrinks to what dropping leaves; an explicit k may not exceed it
    two_left = megatron_bar.load_model(bar_merged, drop_experts=["anchor", "general"])
    assert two_left.expert_selection.layer_topk == (1, 1)


@pytest.mark.parametrize("kw, match", [
    ({"drop_experts": ["safety"]}, r"no expert named 'safety'; experts are \['anchor', 'tool_use', 'general'\]"),
    ({"drop_experts": [7]}, r"expert index 7 is not in 0..2"),
    ({"drop_experts": [0, 1, 2]}, r"leaves none"),
    ({"drop_experts": ["general"], "layer_topk": [3, 1]}, r"layer 0 top-k 3 must be in 1..2"),
    ({"layer_topk": [1]}, r"layer_topk has 1 entries for 2 layers"),
])
def test_bad_selection(bar_merged, kw, match):
    with pytest.raises(ConfigError, match=match):
        megatron_bar.load_model(bar_merged, **kw)


def test_dense_model_has_no_router(mcore_dense_dir):
    with pytest.raises(ConfigError, match="dense model without a router"):
        megatron_bar.load_model(mcore_dense_dir, drop_experts=["anchor"])
