"""BAR's progressive unfreezing, exactly: each stage moves what it trains and leaves every
frozen parameter bit-identical; and the BFCL ablation at toy scale - a new special token
is learnt in SFT (embeddings unfrozen) and not when the embeddings are frozen."""

import json
from pathlib import Path

import pytest
import torch

import megatron_bar
from megatron_bar.bar.freeze import FREEZE_POLICIES, param_group
from megatron_bar.data import ChatTemplate, load_tokenizer, parse_chat_record
from megatron_bar.demo.toy_data import TOOL_CALL_TOKENS
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import load_weights
from megatron_bar.model.config import ModelConfig
from megatron_bar.train.checkpoint import latest_checkpoint
from megatron_bar.train.config import load_config
from megatron_bar.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "tiny" / "sft_tool_use.yaml"


@pytest.fixture(scope="module")
def tiny(tiny_base, toy_data):
    return {**tiny_base, **toy_data}


def run_stage(tiny, out: Path, stage: str, steps: int, extra=(), load=None):
    datasets = json.dumps([
        {"path": str(tiny["tool_use"]), "kind": "chat", "weight": 0.5, "domain": "tool_use"},
        {"path": str(tiny["general"]), "kind": "chat", "weight": 0.5, "domain": "general"},
    ])
    cfg = load_config(CONFIG, [
        f"model.load={load or tiny['bar2']}", f"data.datasets={datasets}", f"train.stage={stage}",
        f"train.steps={steps}", f"train.output_dir={out}", "checkpoint.interval=1000",
        "optim.lr=1e-2", "train.log_interval=1000", *extra,
    ])
    return train(cfg)


def state_of(path) -> dict[str, torch.Tensor]:
    cfg = ModelConfig.load(path)
    model = build_model(cfg, perform_initialization=False)
    load_weights(model, cfg, path)
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def check_freezing(before, after, stage, old_vocab, num_experts=2):
    """``old_vocab``: true vocabulary of ``before``; rows beyond it may be new tokens."""
    policy = FREEZE_POLICIES[stage]
    for name, old in before.items():
        new = after[name]
        group = param_group(name, num_experts)
        if name.endswith("mlp.router.weight"):
            assert torch.equal(new[0], old[0]) != policy.anchor_router_row_trainable, name
            assert not torch.equal(new[1:], old[1:]), f"{stage}: {name} rows 1.. did not move"
            continue
        if group in ("embedding", "lm_head"):  # the vocabulary may have grown
            old, new = old[:old_vocab], new[:old_vocab]
        if group in policy.trainable:
            assert not torch.equal(new, old), f"{stage}: trainable {name} ({group}) did not move"
        else:
            assert torch.equal(new, old), f"{stage}: frozen {name} ({group}) changed"


def vocab(tiny) -> int:
    return ModelConfig.load(tiny["bar2"]).vocab_size


def emits_tool_call(checkpoint, records) -> float:
    tokenizer = load_tokenizer(Path(checkpoint) / "tokenizer")
    template, model = ChatTemplate(tokenizer), megatron_bar.load_model(checkpoint)
    hits = 0
    for record in records:
        doc = template.encode(parse_chat_record(record))
        prompt = torch.tensor([doc.tokens[: doc.loss_mask.index(1)]])
        with torch.no_grad():
            hits += model(prompt)[0, -1].argmax().item() == tokenizer.token_to_id(TOOL_CALL_TOKENS[0])
    return hits / len(records)


@pytest.fixture(scope="module")
def sft_and_frozen(tiny, tmp_path_factory):
    """SFT with the new tool-call tokens, and the same run with embeddings frozen."""
    out = tmp_path_factory.mktemp("runs")
    sft = run_stage(tiny, out / "sft", "sft", 100)
    frozen = run_stage(tiny, out / "frozen", "midtrain", 100,
                       [f'data.add_special_tokens={json.dumps(list(TOOL_CALL_TOKENS))}'])
    return sft, frozen


def test_sft_freezes_exactly_and_loss_falls(tiny, sft_and_frozen):
    sft, _ = sft_and_frozen
    check_freezing(state_of(tiny["bar2"]), state_of(sft.final_checkpoint), "sft", vocab(tiny))
    assert sft.losses[-1] < sft.losses[0] - 2.0, (sft.losses[0], sft.losses[-1])
    # metrics: one JSON line per step, TensorBoard events, the loss plot
    rows = [json.loads(line) for line in (sft.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 101))
    assert [r["loss"] for r in rows] == pytest.approx(sft.losses)
    assert list((sft.output_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (sft.output_dir / "loss.png").stat().st_size > 1000


def test_midtrain_freezes_exactly(tiny, sft_and_frozen):
    _, frozen = sft_and_frozen
    check_freezing(state_of(tiny["bar2"]), state_of(frozen.final_checkpoint), "midtrain", vocab(tiny))


def test_new_token_is_learnt_only_with_unfrozen_embeddings(tiny, sft_and_frozen):
    sft, frozen = sft_and_frozen
    records = [json.loads(line) for line in Path(tiny["tool_use"]).read_text().splitlines()[:20]]
    before = state_of(tiny["bar2"])
    old_vocab = before["embedding.word_embeddings.weight"].size(0)
    grown_sft, grown_frozen = state_of(sft.final_checkpoint), state_of(frozen.final_checkpoint)
    tool_id = load_tokenizer(Path(sft.final_checkpoint) / "tokenizer").token_to_id(TOOL_CALL_TOKENS[0])
    assert ModelConfig.load(tiny["bar2"]).vocab_size <= tool_id < old_vocab  # a padded row
    mean_row = before["embedding.word_embeddings.weight"][: ModelConfig.load(tiny["bar2"]).vocab_size].mean(0)
    # Frozen: the new row is still its initialisation (the mean of the old rows).
    assert torch.allclose(grown_frozen["embedding.word_embeddings.weight"][tool_id], mean_row, atol=1e-6)
    # Unfrozen: the row moved away from it.
    assert not torch.allclose(grown_sft["embedding.word_embeddings.weight"][tool_id], mean_row, atol=1e-3)
    assert emits_tool_call(sft.final_checkpoint, records) >= 0.9
    assert emits_tool_call(frozen.final_checkpoint, records) <= 0.1


def test_grown_vocabulary_reaches_hf(sft_and_frozen, tmp_path):
    from megatron_bar.convert import mcore_to_hf

    sft, _ = sft_and_frozen
    cfg = ModelConfig.load(sft.final_checkpoint)
    mcore_to_hf(sft.final_checkpoint, tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["vocab_size"] == cfg.vocab_size
    tokenizer = load_tokenizer(tmp_path / "hf")
    assert tokenizer.vocab_size == cfg.vocab_size
    assert tokenizer.token_to_id(TOOL_CALL_TOKENS[1]) == cfg.vocab_size - 1


@pytest.mark.parametrize("stage", ["rlvr", "router"])
def test_other_stages_freeze_exactly(tiny, sft_and_frozen, tmp_path, stage):
    # From the SFT expert: its experts differ, so the router has something to learn
    # (in a fresh upcycle both experts are the same FFN and routing changes nothing).
    start = sft_and_frozen[0].final_checkpoint
    result = run_stage(tiny, tmp_path / stage, stage, 4, load=start)
    check_freezing(state_of(start), state_of(result.final_checkpoint), stage, vocab(tiny))


def test_shared_lr_scale_slows_only_the_shared_parameters(tiny, tmp_path):
    """optim.shared_lr_scale (and its per-group override for the embeddings): Adam's first
    step moves each trained element by the LR of its group (|m/sqrt(v)| = 1), so the
    largest change of every shared tensor the SFT stage trains is its scale x lr (LM head:
    shared_lr_scale, embeddings: their override), and of every expert tensor lr."""
    lr, scale, embedding_scale = 1e-2, 0.1, 0.03
    before = state_of(tiny["bar2"])
    result = run_stage(tiny, tmp_path / "s", "sft", 1, extra=[
        "optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0.0",
        f"optim.shared_lr_scale={scale}",
        f"optim.shared_lr_scale_by_group={{embedding: {embedding_scale}}}"])
    after = state_of(result.final_checkpoint)
    seen = set()
    for name, old in before.items():
        group = param_group(name, 2)
        if group not in ("embedding", "lm_head", "experts"):
            continue
        new = after[name]
        if group in ("embedding", "lm_head"):
            old, new = old[:vocab(tiny)], new[:vocab(tiny)]
        step = float((new.double() - old.double()).abs().max())
        want = lr * {"experts": 1.0, "lm_head": scale, "embedding": embedding_scale}[group]
        assert step == pytest.approx(want, rel=2e-2), (name, group, step, want)
        seen.add(group)
    assert seen == {"embedding", "lm_head", "experts"}


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_only_added_vocab_rows_train(tiny, tmp_path, tp):
    """optim.train_only_added_vocab_rows: SFT that adds the tool-call tokens moves their
    embedding and LM head rows and keeps every other row bit-identical (at TP=2 too, where
    each rank holds half the rows), while the rest of the SFT policy trains as usual."""
    overrides = [f'data.add_special_tokens={json.dumps(list(TOOL_CALL_TOKENS))}',
                 "optim.train_only_added_vocab_rows=true"]
    if tp == 1:
        result_dir = run_stage(tiny, tmp_path / "s", "sft", 6, extra=overrides).final_checkpoint
    else:
        from helpers import torchrun

        datasets = json.dumps([
            {"path": str(tiny["tool_use"]), "kind": "chat", "weight": 0.5, "domain": "tool_use"},
            {"path": str(tiny["general"]), "kind": "chat", "weight": 0.5, "domain": "general"},
        ])
        torchrun(2, REPO / "megatron_bar" / "train" / "__main__.py", str(CONFIG), f"model.load={tiny['bar2']}",
                 f"data.datasets={datasets}", "train.steps=6", "checkpoint.interval=1000", "optim.lr=1e-2",
                 "train.log_interval=1000", f"train.output_dir={tmp_path / 's'}", "parallel.tp=2", *overrides,
                 timeout=600)
        result_dir = latest_checkpoint(tmp_path / "s" / "checkpoints")
    before, after = state_of(tiny["bar2"]), state_of(result_dir)
    tokenizer = load_tokenizer(Path(result_dir) / "tokenizer")
    added = [tokenizer.token_to_id(t) for t in TOOL_CALL_TOKENS]
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        old, new = before[name], after[name]
        for row in added:
            assert not torch.equal(new[row], after[name][: vocab(tiny)].mean(0)), (name, row, "did not train")
        kept = [r for r in range(old.size(0)) if r not in added]
        assert torch.equal(new[kept], old[kept]), f"{name}: a row of a token the stage did not add moved"
    policy_trained = {n for n in before if param_group(n, 2) in ("experts", "router")}
    assert all(not torch.equal(before[n], after[n]) for n in policy_trained)
    for name in before:
        if param_group(name, 2) in ("attention", "norms", "anchor_expert"):
            assert torch.equal(before[name], after[name]), name
