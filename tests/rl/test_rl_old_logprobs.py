"""The trainer's separate old-log-prob pass is skipped when the update is on-policy with one
minibatch (rl.minibatches 1, rl.async_steps 0), and the update is then the same as with the
pass: the same loss, the same weights after the optimizer step. With rl.async_steps 1 the
pass runs (the rollout came from older weights)."""

import random
from pathlib import Path

import pytest
import torch

from megatron_bar import platform
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import load_weights
from megatron_bar.model.config import ModelConfig
from megatron_bar.rl import trainer as rl_trainer
from megatron_bar.rl.trainer import RLTrainConfig, Rollout, _update
from megatron_bar.train.config import load_config
from megatron_bar.train.trainer import setup_training

REAL_FORWARD_BACKWARD = rl_trainer.forward_backward
REAL_FORWARD_LOGPROBS = rl_trainer.forward_logprobs
CONFIG = Path(__file__).resolve().parents[2] / "examples/configs/tiny/rlvr_digits.yaml"


def _rollouts(vocab):
    rng = random.Random(0)
    out = []
    for i in range(6):
        completion = [rng.randrange(4, vocab) for _ in range(3 + i % 3)]
        out.append(Rollout([1, 5 + i, 6], completion, [-3.0 + 0.1 * j for j in range(len(completion))],
                           reward=float(i % 2), advantage=(1.0 if i % 2 else -1.0) * (0.5 + 0.1 * i)))
    return out


def _one_update(tiny_base, tmp_path, monkeypatch, async_steps):
    cfg = load_config(CONFIG, [f"model.load={tiny_base['bar2']}", f"train.output_dir={tmp_path}",
                               f"rl.async_steps={async_steps}", "train.micro_batch_size=4"], cls=RLTrainConfig)
    model_cfg = ModelConfig.load(cfg.model.load)
    model = build_model(model_cfg, calculate_per_token_loss=True)
    load_weights(model, model_cfg, cfg.model.load)
    run = setup_training(cfg, model, model_cfg, 1, None)
    passes = []  # True: a forward-only pass over the rollout; False: a training pass

    def counting(*args, **kwargs):
        passes.append(kwargs.get("forward_only", False))
        return REAL_FORWARD_BACKWARD(*args, **kwargs)

    def counting_logprobs(*args, **kwargs):
        passes.append(True)
        return REAL_FORWARD_LOGPROBS(*args, **kwargs)

    monkeypatch.setattr(rl_trainer, "forward_backward", counting)
    monkeypatch.setattr(rl_trainer, "forward_logprobs", counting_logprobs)
    result = _update(run.ddp, model, run.optimizer, run.frozen_rows, None, _rollouts(model_cfg.vocab_size),
                     model_cfg, cfg.rl, 16, cfg.train.micro_batch_size, 0, 1, 3)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    return result, weights, passes


def test_on_policy_update_skips_the_old_pass_and_is_unchanged(tiny_base, tmp_path, monkeypatch):
    if not platform.is_initialized():
        platform.initialize()
    skipped, w_skipped, passes_skipped = _one_update(tiny_base, tmp_path / "a", monkeypatch, 0)
    full, w_full, passes_full = _one_update(tiny_base, tmp_path / "b", monkeypatch, 1)
    assert passes_skipped == [False]  # one training pass, no forward-only pass
    assert passes_full == [True, False]
    assert skipped["loss"] == pytest.approx(full["loss"], rel=1e-6, abs=1e-7)
    assert skipped["loss"] != 0.0
    assert skipped["rollout_logprob_gap"] == pytest.approx(full["rollout_logprob_gap"], rel=1e-6)
    for name, w in w_skipped.items():
        assert torch.allclose(w, w_full[name], rtol=0, atol=1e-7), name
    start = build_model(ModelConfig.load(tiny_base["bar2"]), perform_initialization=False)
    load_weights(start, ModelConfig.load(tiny_base["bar2"]), tiny_base["bar2"])
    changed = [k for k, v in start.named_parameters() if not torch.equal(v, w_skipped[k])]
    assert changed  # the update did move the policy
