"""BAR stage 2: merging domain experts, upgrading a merged model, the merge tool.

Synthetic domain experts start from the tiny dense model upcycled to 2 experts; each then
gets its own expert 1, router rows and (for some) shared parameters. References are
computed from the checkpoints as megatron loads them (``load_model``), not through the
merge's own reader.
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

import megatron_bar
from helpers import batch, run_tool, torchrun
from megatron_bar import platform
from megatron_bar.bar.merge import MANIFEST_FILE, MergeError, merge_experts, upgrade
from megatron_bar.bar.merge_io import CheckpointReader, local_slices, write_checkpoint
from megatron_bar.bar.upcycle import upcycle
from megatron_bar.model.checkpoint import save_model
from megatron_bar.model.config import ModelConfig
from megatron_bar.utils.fs import atomic_output_dir, incomplete_path

EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
QUIET = dict(print_fn=lambda *a: None)


# -- helpers ------------------------------------------------------------------------------


def state(path, **kw):
    """The model in ``path`` as megatron loads it: local keys, one tensor per layer / expert."""
    return {k: v for k, v in megatron_bar.load_model(path, **kw).gpt.state_dict().items()
            if not k.endswith("_extra_state")}


def read_global(path):
    """Every stored tensor of ``path`` at its global shape (dist-checkpoint keys), loaded
    by torch's own dist-checkpoint load (as Megatron-LM's checkpoint tools do)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
               if isinstance(m, TensorStorageMetadata)}
    dcp.load(tensors, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return ModelConfig.load(path), tensors


def write_global(cfg, tensors, path, tokenizer=None):
    """A checkpoint of ``cfg`` from global tensors (megatron's layout, written lazily)."""
    dtype = tensors[VOCAB_KEYS[0]].dtype
    with atomic_output_dir(path) as tmp:
        write_checkpoint(cfg, dtype, tmp,
                         lambda k, o, s: tensors[k][local_slices((0,) * len(o), o, s)].clone())
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
    return path


def perturb(tensors, seed, experts=0.05, keys=(), shared=0.01, router=0.1):
    """A domain's stage 1 in miniature: its own expert 1 and router, some shared params."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in tensors.items()}
    for k, v in out.items():
        if ".mlp.experts." in k:
            v[:, 1] += torch.randn(v[:, 1].shape, generator=g) * experts
        elif k.endswith("router.weight"):
            v += torch.randn(v.shape, generator=g) * router
        elif any(s in k for s in keys):
            v += torch.randn(v.shape, generator=g) * shared
    return out


def mean(xs, weights):
    """The reference merge of one shared tensor: copy if all agree, else the fp32 mean."""
    if all(torch.equal(xs[0], x) for x in xs[1:]):
        return xs[0]
    total = sum(weights)
    acc = None
    for x, w in zip(xs, weights):
        term = x.float() * (w / total)
        acc = term if acc is None else acc + term
    return acc.to(xs[0].dtype)


def reference_merge(inputs, weights, merged_keys):
    """Expected local state of the merged model from the inputs' local states."""
    ref = {}
    for k in merged_keys:
        m = EXPERT.match(k)
        if m:
            e = int(m.group(2))
            src = inputs[0] if e == 0 else inputs[e - 1]
            ref[k] = src[f"{m.group(1)}{0 if e == 0 else 1}{m.group(3)}"]
        elif k.endswith("router.weight"):
            rows = [mean([x[k][0] for x in inputs], weights)] + [x[k][1] for x in inputs]
            ref[k] = torch.stack(rows)
        else:
            ref[k] = mean([x[k] for x in inputs], weights)
    return ref


def reference_divergence(inputs, names, weights, vocab_size):
    """The divergence report computed directly: per group of shared parameters, each
    input's relative L2 distance from the fp32 mean and its largest absolute distance
    (embedding and LM head: the rows of real tokens, not the padding)."""
    from megatron_bar.bar.divergence import report_group  # (the report's grouping of keys, not its arithmetic)

    total = sum(weights)
    sq_dist, sq_norm, max_abs = {}, {}, {}
    for k in inputs[0]:
        if EXPERT.match(k):
            continue
        xs = [x[k][0] if k.endswith("router.weight") else x[k] for x in inputs]  # router: anchor row
        if k in VOCAB_KEYS:
            xs = [x[:vocab_size] for x in xs]
        m = sum(x.double() * (w / total) for x, w in zip(xs, weights))
        g = report_group(k)
        for name, x in zip(names, xs):
            diff = x.double() - m
            sq_dist[g, name] = sq_dist.get((g, name), 0.0) + float(diff.square().sum())
            sq_norm[g, name] = sq_norm.get((g, name), 0.0) + float(m.square().sum())
            max_abs[g, name] = max(max_abs.get((g, name), 0.0), float(diff.abs().max()))
    return {g: {"rel_l2_from_merged": {n: (sq_dist[g, n] / sq_norm[g, n]) ** 0.5 for n in names},
                "max_abs_from_merged": {n: max_abs[g, n] for n in names}}
            for g in {g for g, _ in sq_dist}}


def assert_divergence_is(report, reference):
    assert set(report) == set(reference)
    for g, want in reference.items():
        for field in ("rel_l2_from_merged", "max_abs_from_merged"):
            assert report[g][field] == pytest.approx(want[field], rel=1e-4, abs=1e-9), (g, field)


def reference_hash(path):
    """The content hash as the manifest defines it (XXH3-128 over each stored chunk's key,
    box, dtype and bytes), from the global tensors as torch's own load gives them."""
    import xxhash

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    _, tensors = read_global(path)
    h = xxhash.xxh3_128()
    for k in sorted(tensors):
        for c in sorted(meta[k].chunks, key=lambda c: tuple(c.offsets)):
            box = tensors[k][tuple(slice(o, o + n) for o, n in zip(c.offsets, c.sizes))].contiguous()
            h.update(f"{k}|{list(c.offsets)}|{list(c.sizes)}|{box.dtype}|".encode())
            h.update(xxhash.xxh3_128_digest(box.reshape(-1).view(torch.uint8).numpy()))
    return "xxh3-128:" + h.hexdigest()


def assert_nothing_written(out):
    assert not out.exists(), f"{out} was written"
    assert not incomplete_path(out).exists(), "a temporary output was left behind"


# -- fixtures -----------------------------------------------------------------------------

# Which shared parameters each synthetic domain unfroze: math attention and embeddings,
# code the norms and the LM head, tool_use none. linear_proj and the q/k norms stay equal.
DOMAINS = {"math": ("linear_qkv", "word_embeddings"),
           "code": ("post_self_attn_layernorm", "post_mlp_layernorm", "final_layernorm", "output_layer"),
           "tool_use": ()}


@pytest.fixture(scope="module")
def base2(mcore_dense_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bar") / "base2"
    upcycle(mcore_dense_dir, out, num_experts=2)
    return out


@pytest.fixture(scope="module")
def experts(base2, tmp_path_factory):
    """Three domain experts, saved by megatron's own save (save_model)."""
    root = tmp_path_factory.mktemp("experts")
    cfg, base = read_global(base2)
    model = megatron_bar.load_model(base2)
    out = {}
    for seed, (name, keys) in enumerate(DOMAINS.items()):
        tensors = perturb(base, seed, keys=keys)
        path = write_global(cfg, tensors, root / f"{name}-lazy")
        # re-save through megatron: the inputs of the main tests are megatron-written
        model.gpt.load_state_dict(megatron_bar.load_model(path).gpt.state_dict())
        out[name] = save_model(model.gpt, cfg, root / name)
        shutil.rmtree(path)
    return out


@pytest.fixture(scope="module")
def merged(experts, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "bar4"
    merge_experts(list(experts.items()), out, **QUIET)
    return out


# -- the merge ----------------------------------------------------------------------------


def test_merged_tensors_equal_reference(experts, merged, tmp_path):
    cfg = ModelConfig.load(merged)
    assert (cfg.num_experts, cfg.moe_topk, cfg.norm_topk_prob) == (4, 2, True)
    inputs = [state(p) for p in experts.values()]
    got = state(merged)
    ref = reference_merge(inputs, [1, 1, 1], got)
    assert set(ref) == set(got)
    for k in got:
        assert torch.equal(got[k], ref[k]), f"{k}: max diff {(got[k] - ref[k]).abs().max():.3g}"
    # parameters no domain touched are copied bit for bit, touched ones really averaged
    k = "decoder.layers.0.self_attention.linear_proj.weight"
    assert all(torch.equal(got[k], x[k]) for x in inputs)
    k = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert not torch.equal(got[k], inputs[0][k])

    manifest = json.loads((merged / MANIFEST_FILE).read_text())
    assert [e["name"] for e in manifest["experts"]] == list(experts)
    assert [e["source"] for e in manifest["experts"]] == [str(p.resolve()) for p in experts.values()]
    hashes = [e["content_hash"] for e in manifest["experts"]]
    assert len(set(hashes)) == 3 and all(h.startswith("xxh3-128:") for h in hashes)
    assert hashes[0] == reference_hash(experts["math"])  # the hash is of the model's tensors
    assert manifest["averaging"]["method"] == "mean"
    div = manifest["divergence"]
    assert set(div) >= {"embedding", "attention", "norms", "lm_head"}
    # math moved attention, tool_use did not: both are apart from the mean, math further
    rel = div["attention"]["rel_l2_from_merged"]
    assert rel["math"] > rel["tool_use"] > 0
    assert_divergence_is(div, reference_divergence(inputs, list(experts), [1, 1, 1], cfg.vocab_size))
    assert manifest["tensors"]["decoder.layers.self_attention.linear_proj.weight"] == "copied"
    assert manifest["tensors"]["decoder.layers.self_attention.linear_qkv.weight"] == "averaged"

    # The output is exactly what megatron writes for this model: same keys, global shapes,
    # chunks and dtypes - so it loads at any TP / PP / EP like megatron's own checkpoints.
    model = megatron_bar.load_model(merged)
    resaved = save_model(model.gpt, cfg, tmp_path / "resaved")
    ours = FileSystemReader(str(merged)).read_metadata().state_dict_metadata
    theirs = FileSystemReader(str(resaved)).read_metadata().state_dict_metadata
    assert ours == theirs
    assert (merged / "metadata.json").read_text() == (resaved / "metadata.json").read_text()
    assert torch.load(merged / "common.pt") == torch.load(resaved / "common.pt")


def test_weighted_merge(experts, tmp_path):
    out = tmp_path / "weighted"
    pick = [("math", experts["math"]), ("code", experts["code"])]
    merge_experts(pick, out, weights={"math": 3.0, "code": 1.0}, topk=1, **QUIET)
    cfg = ModelConfig.load(out)
    assert (cfg.num_experts, cfg.moe_topk, cfg.norm_topk_prob) == (3, 1, True)
    inputs = [state(p) for _, p in pick]
    got = state(out)
    # the weights normalised as the manifest records them
    ref = reference_merge(inputs, [0.75, 0.25], got)
    for k in got:
        assert torch.equal(got[k], ref[k]), k
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["averaging"]["weights"] == {"math": 0.75, "code": 0.25}
    assert_divergence_is(manifest["divergence"], reference_divergence(inputs, ["math", "code"], [3, 1], cfg.vocab_size))


def test_dry_run_reports_and_writes_nothing(experts, merged, tmp_path):
    out = tmp_path / "never"
    lines = []
    result = merge_experts(list(experts.items()), out, dry_run=True, print_fn=lines.append)
    assert_nothing_written(out)
    text = "\n".join(lines)
    assert "merge plan: 3 domain experts" in text and "dry run: nothing written" in text
    table = result.report.splitlines()
    assert table[1].split()[:4] == ["group", "params", "averaged", "max|x-m|"]
    assert any(line.startswith("attention") for line in table)
    # the same numbers as the real merge recorded (summed in another order)
    recorded = json.loads((merged / MANIFEST_FILE).read_text())["divergence"]
    assert set(result.manifest["divergence"]) == set(recorded)
    for group, d in result.manifest["divergence"].items():
        assert d["params"] == recorded[group]["params"]
        assert d["max_abs_diff"] == recorded[group]["max_abs_diff"]
        assert d["rel_l2_from_merged"] == pytest.approx(recorded[group]["rel_l2_from_merged"], rel=1e-5)


def test_routed_to_one_expert_gives_that_experts_logits(mcore_dense_dir, tmp_path):
    """Identical shared parameters: the merged model, top-1 and routed to expert j, computes
    exactly what domain j's own 2-expert model computes routed to its expert 1."""
    base = upcycle(mcore_dense_dir, tmp_path / "base", num_experts=2, moe_topk=1)
    assert base.norm_topk_prob
    cfg, tensors = read_global(tmp_path / "base")
    # A large constant in hidden coordinate 0 of every residual stream makes a router row
    # along that coordinate win for every token: the router has no bias to do it.
    tensors["embedding.word_embeddings.weight"][:, 0] += 100.0
    router = torch.zeros(cfg.hidden_size)
    router[0] = 1.0
    paths = {}
    for seed, name in enumerate(["math", "code", "safety"]):
        t = perturb(tensors, seed, keys=())
        t["decoder.layers.mlp.router.weight"][:] = 0
        t["decoder.layers.mlp.router.weight"][:, 1] = router
        paths[name] = write_global(cfg, t, tmp_path / name)
    out = tmp_path / "merged"
    merge_experts(list(paths.items()), out, **QUIET)
    assert ModelConfig.load(out).moe_topk == 1

    tokens, _ = batch(2, 16)
    merged_model = megatron_bar.load_model(out)
    outputs = []
    for j, name in enumerate(paths, start=1):
        with torch.no_grad():
            for layer in merged_model.gpt.decoder.layers:
                layer.mlp.router.weight.zero_()
                layer.mlp.router.weight[j] = router
            got = merged_model(tokens)
            want = megatron_bar.load_model(paths[name])(tokens)
        diff = (got - want).abs().max().item()
        assert diff <= 1e-5, f"{name}: merged model routed to expert {j} differs by {diff:.2e}"
        outputs.append(got)
    assert not torch.allclose(outputs[0], outputs[1])  # the experts do differ


def test_hf_export_of_merged_model_matches_megatron(merged, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_bar.convert import mcore_to_hf

    mcore_to_hf(merged, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "FlexOlmoForCausalLM" and hf.config.num_experts == 4
    tokens, _ = batch(3, 20)
    with torch.no_grad():
        diff = (hf(tokens).logits - megatron_bar.load_model(merged)(tokens)).abs().max().item()
    assert diff <= 1e-4, f"HF export of the merged model differs from megatron by {diff:.2e}"


# -- upgrades -----------------------------------------------------------------------------


def test_replace_and_add_keep_other_experts_bit_identical(base2, merged, tmp_path):
    cfg, base = read_global(base2)
    code2 = write_global(cfg, perturb(base, 10, keys=("linear_qkv",)), tmp_path / "code2")
    legal = write_global(cfg, perturb(base, 11, keys=("output_layer",)), tmp_path / "legal")
    out = tmp_path / "upgraded"
    upgrade(merged, out, replace=[("code", code2)], add=[("legal", legal)], **QUIET)
    assert ModelConfig.load(out).num_experts == 5

    before, after = state(merged), state(out)
    new = {"code": state(code2), "legal": state(legal)}
    for k, v in after.items():
        m = EXPERT.match(k)
        if m:
            e = int(m.group(2))
            if e == 2:
                assert torch.equal(v, new["code"][f"{m.group(1)}1{m.group(3)}"]), k
            elif e == 4:
                assert torch.equal(v, new["legal"][f"{m.group(1)}1{m.group(3)}"]), k
            else:  # anchor, math, tool_use
                assert torch.equal(v, before[k]), k
        elif k.endswith("router.weight"):
            assert v.shape[0] == 5
            assert torch.equal(v[[0, 1, 3]], before[k][[0, 1, 3]]), k
            assert torch.equal(v[2], new["code"][k][1]) and torch.equal(v[4], new["legal"][k][1]), k
        else:
            assert torch.equal(v, before[k]), f"shared {k} changed"
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert [e["name"] for e in manifest["experts"]] == ["math", "code", "tool_use", "legal"]
    assert manifest["experts"][1]["source"] == str(code2.resolve())
    old = json.loads((merged / MANIFEST_FILE).read_text())
    assert manifest["experts"][0] == old["experts"][0]  # math: same source, same hash
    assert [h["op"] for h in manifest["history"]] == ["merge", "upgrade"]
    # the report says how far the newcomers' shared parameters are from the base's
    assert manifest["divergence"]["attention"]["rel_l2_from_merged"]["code"] > 0

    with pytest.raises(MergeError, match="already has an expert 'math'"):
        upgrade(merged, tmp_path / "x", add=[("math", legal)], **QUIET)
    with pytest.raises(MergeError, match="no expert 'chat'"):
        upgrade(merged, tmp_path / "x", replace=[("chat", legal)], **QUIET)
    assert_nothing_written(tmp_path / "x")


# -- vocabularies -------------------------------------------------------------------------


def _word_tokenizer(directory, n):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_bar.data.tokenizer import HFTokenizer

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, **{f"w{i}": i for i in range(2, n)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}))
    return HFTokenizer(directory / "tokenizer.json")


def test_grown_vocabularies_merge(base2, tmp_path):
    from megatron_bar.data.tokenizer import load_tokenizer

    cfg, base = read_global(base2)
    _word_tokenizer(tmp_path / "tok", cfg.vocab_size)
    g = torch.Generator().manual_seed(5)

    def domain(name, seed, added):
        tok = load_tokenizer(tmp_path / "tok")
        assert tok.add_special_tokens(added) == list(range(cfg.vocab_size, cfg.vocab_size + len(added)))
        t = perturb(base, seed, keys=VOCAB_KEYS)
        for k in VOCAB_KEYS:  # the new tokens' trained rows
            t[k][cfg.vocab_size:cfg.vocab_size + len(added)] = torch.randn(len(added), cfg.hidden_size, generator=g)
        return write_global(cfg.with_(vocab_size=cfg.vocab_size + len(added)), t, tmp_path / name, tok)

    paths = {"math": domain("math", 1, []),
             "tool_use": domain("tool_use", 2, ["<tool_call>", "</tool_call>"]),
             "agent": domain("agent", 3, ["<tool_call>"])}
    out = tmp_path / "merged"
    result = merge_experts(list(paths.items()), out, **QUIET)
    assert ModelConfig.load(out).vocab_size == cfg.vocab_size + 2
    tok = load_tokenizer(out / "tokenizer")
    assert tok.vocab_size == cfg.vocab_size + 2
    assert (tok.token_to_id("<tool_call>"), tok.token_to_id("</tool_call>")) == (1001, 1002)
    assert {a["id"]: a["from"] for a in result.manifest["vocabulary"]["added"]} == {
        1001: ["tool_use", "agent"], 1002: ["tool_use"]}

    _, got = read_global(out)
    ins = [read_global(p)[1] for p in paths.values()]
    for k in VOCAB_KEYS:
        v = got[k]
        assert torch.equal(v[:1001], mean([x[k][:1001] for x in ins], [1, 1, 1])), k  # common: mean
        assert torch.equal(v[1001], mean([ins[1][k][1001], ins[2][k][1001]], [1, 1])), k  # both added it
        assert torch.equal(v[1002], ins[1][k][1002]), k  # tool_use's own token
        assert torch.equal(v[1003:], mean([x[k][1003:] for x in ins], [1, 1, 1])), k  # padding rows

    # the same id added as different tokens by two experts is an error
    paths["reasoning"] = domain("reasoning", 4, ["<think>"])
    with pytest.raises(MergeError, match="token id 1001 is '<tool_call>' in tool_use but '<think>' in reasoning"):
        merge_experts(list(paths.items()), tmp_path / "clash", **QUIET)
    assert_nothing_written(tmp_path / "clash")


def test_sentencepiece_added_tokens_merge(base2, tmp_path):
    """A SentencePiece vocabulary smaller than the model's: an added token takes a row the
    other experts never use, and that row comes from the expert that added it."""
    import random

    from megatron_bar.data.tokenizer import SIDECAR_FILE, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "tu", "re", "sa", "no", "vi", "pe", "da"]
    corpus = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(12))
              for _ in range(400)]
    spm = train_sentencepiece(corpus, 320, tmp_path / "spm" / "tok.model")
    cfg, base = read_global(base2)

    def domain(name, seed, added):
        tok = SentencePieceTokenizer(spm)
        assert tok.add_special_tokens(added) == list(range(320, 320 + len(added)))
        return write_global(cfg, perturb(base, seed, keys=VOCAB_KEYS), tmp_path / name, tok)

    paths = {"math": domain("math", 1, []), "tool_use": domain("tool_use", 2, ["<tool_call>"])}
    out = tmp_path / "merged"
    merge_experts(list(paths.items()), out, **QUIET)
    assert ModelConfig.load(out).vocab_size == cfg.vocab_size  # the model had room
    sidecar = json.loads((out / "tokenizer" / SIDECAR_FILE).read_text())
    assert sidecar["added_special_tokens"] == [{"content": "<tool_call>", "id": 320}]
    assert load_tokenizer(out / "tokenizer").encode("ka <tool_call>")[-1] == 320

    _, got = read_global(out)
    math, tool = (read_global(p)[1] for p in paths.values())
    for k in VOCAB_KEYS:
        assert torch.equal(got[k][:320], mean([math[k][:320], tool[k][:320]], [1, 1])), k
        assert torch.equal(got[k][320], tool[k][320]), k  # only tool_use has a token there
        assert torch.equal(got[k][321:], mean([math[k][321:], tool[k][321:]], [1, 1])), k  # unused


# -- bad input ----------------------------------------------------------------------------


def test_bad_inputs_are_refused_and_nothing_is_written(experts, mcore_dense_dir, tmp_path):
    out = tmp_path / "out"
    two = [("math", experts["math"]), ("code", experts["code"])]

    # a drifted anchor: one layer's expert 0 trained (or another base)
    cfg, t = read_global(experts["code"])
    t["decoder.layers.mlp.experts.experts.linear_fc2.weight"][1, 0, 3, 5] += 1e-3
    drifted = write_global(cfg, t, tmp_path / "drifted")
    with pytest.raises(MergeError, match=r"anchor expert of drifted .*'decoder\.layers\.mlp\.experts\.experts\."
                                         r"linear_fc2\.weight' \(layer 1, expert 0\) max \|difference\| 0\.001"):
        merge_experts([two[0], ("drifted", drifted)], out, **QUIET)

    # another architecture
    other = tmp_path / "other"
    shutil.copytree(experts["code"], other)
    (other / "model_config.json").write_text(json.dumps(cfg.with_(norm_eps=1e-5).to_dict()))
    with pytest.raises(MergeError, match="another architecture .*norm_eps: 1e-06 vs 1e-05"):
        merge_experts([two[0], ("other", other)], out, **QUIET)

    # a dense model is no domain expert
    with pytest.raises(MergeError, match="no experts"):
        merge_experts([two[0], ("dense", mcore_dense_dir)], out, **QUIET)

    # a truncated checkpoint
    cut = tmp_path / "cut"
    shutil.copytree(experts["code"], cut)
    shard = sorted(cut.glob("*.distcp"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(ValueError, match="truncated"):
        merge_experts([two[0], ("cut", cut)], out, **QUIET)

    # a name given twice, or the same checkpoint twice
    with pytest.raises(MergeError, match="'math' is given twice"):
        merge_experts([two[0], ("math", experts["code"])], out, **QUIET)
    with pytest.raises(MergeError, match="same checkpoint"):
        merge_experts([two[0], ("again", experts["math"])], out, **QUIET)
    assert_nothing_written(out)

    # an existing output is left alone
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        merge_experts(two, out, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["keep"]


def test_corrupt_input_values(experts, tmp_path):
    """A flipped exponent bit: a non-finite value stops the merge (naming the checkpoint
    and the tensor) with nothing written, though found only while the output is being
    written; a finite but huge value is merged and named in the report."""
    cfg, t = read_global(experts["code"])
    key = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
    t[key][1, 1, 3, 5] = float("inf")  # expert 1: read only when its output chunk is written
    broken = write_global(cfg, t, tmp_path / "broken")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"{re.escape(str(broken))}: tensor '{re.escape(key)}' holds a "
                                         r"non-finite value \(inf\)"):
        merge_experts([("math", experts["math"]), ("broken", broken)], out, **QUIET)
    assert_nothing_written(out)

    cfg, t = read_global(experts["code"])
    key = "decoder.layers.self_attention.linear_proj.weight"
    t[key][0, 2, 2] = 3.03e36
    huge = write_global(cfg, t, tmp_path / "huge")
    result = merge_experts([("math", experts["math"]), ("huge", huge)], out, **QUIET)
    outliers = json.loads((out / MANIFEST_FILE).read_text())["outliers"]
    others = float(read_global(experts["math"])[1][key].abs().max())
    assert outliers == [{"tensor": key, "input": "huge", "max_abs": pytest.approx(3.03e36, rel=1e-2),
                         "others_max_abs": others}]
    assert f"outlier: huge's tensor '{key}' reaches |x| = 3.03e+36" in result.report


def test_stale_temporary_output_is_removed_with_a_message(experts, tmp_path):
    out = tmp_path / "out"
    stale = incomplete_path(out)  # what a killed merge leaves
    stale.mkdir()
    (stale / "half.distcp").write_bytes(b"x" * 100)
    lines = []
    merge_experts([("math", experts["math"]), ("code", experts["code"])], out, print_fn=lines.append)
    assert f"removing {stale}, left behind by a merge that did not finish" in lines
    assert out.is_dir() and not stale.exists()


def test_full_disk_names_the_path(experts, merged, tmp_path):
    """A merge onto a small tmpfs - too small for the tensors (refused before writing), or
    for the files that hold them (the disk fills mid-merge): an error naming the output,
    nothing left there."""
    import math
    import subprocess

    from megatron_bar.bar.merge_io import expected_tensors
    from megatron_bar.utils.fs import DiskFullError

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = small / "merged"
        with pytest.raises(DiskFullError, match=rf"{re.escape(str(out))}: not enough disk space"):
            merge_experts(list(experts.items()), out, **QUIET)
        assert_nothing_written(out)
        cfg = ModelConfig.load(merged)
        tensors = sum(math.prod(s) * d.itemsize for s, d in expected_tensors(cfg, torch.float32).values())
        subprocess.run(["mount", "-o", f"remount,size={tensors // 1024 + 8}k", str(small)], check=True)
        with pytest.raises(DiskFullError, match=rf"{re.escape(str(out))}: no space left on device"):
            merge_experts(list(experts.items()), out, **QUIET)
        assert_nothing_written(out)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_tool(experts, tmp_path):
    out = tmp_path / "out"
    proc = run_tool("merge_experts.py", "--experts", f"math={experts['math']}", f"code={experts['code']}",
                    "--weights", "math=0.7,code=0.3", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "merge plan: 2 domain experts" in proc.stdout and "dry run: nothing written" in proc.stdout
    assert re.search(r"^attention\s+\S+\s+\S+\s+\S+\s+\S+\s+\S+$", proc.stdout, re.M), proc.stdout

    proc = run_tool("merge_experts.py", "--experts", f"math={experts['math']}", f"math={experts['code']}",
                    "--save", str(out))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: --experts: expert name 'math' is given twice"
    assert_nothing_written(out)


# -- the reader ---------------------------------------------------------------------------


def test_reader_boxes_equal_torchs_own_load(experts):
    """The merge's reader against torch's own load of the global tensors: a box across
    stored chunks (the two halves of fc1, two layers), and whole tensors that stay apart."""
    _, want = read_global(experts["math"])
    key = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    r = CheckpointReader(experts["math"])
    assert torch.equal(r.read(key, (0, 1, 90, 7), (2, 1, 12, 50)), want[key][0:2, 1:2, 90:102, 7:57])
    got = {k: r.read(k, (0,) * len(r.shape(k)), r.shape(k)) for k in r.keys()}
    assert set(got) == set(want)
    for k in got:
        assert torch.equal(got[k], want[k]), k


# -- other layouts ------------------------------------------------------------------------


def test_merged_checkpoint_loads_at_ep2(merged, tmp_path):
    """The merged checkpoint at EP=2 (two gloo processes) gives the one-process logits."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
    import parallel_worker  # tests/model's worker: load at a layout, forward, backward

    platform.initialize()
    ref_logits, _, _, _ = parallel_worker.forward_backward_of(merged)
    torchrun(2, Path(parallel_worker.__file__), str(merged), str(tmp_path), "1", "1", "2")
    logits = torch.cat([torch.load(p) for p in sorted(tmp_path.glob("logits_dp*.pt"))])
    assert (logits - ref_logits).abs().max().item() <= 1e-5
