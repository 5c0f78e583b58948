"""One RLVR step's sample collection on rank 0, with a scripted fleet and verifier: dynamic
sampling refills, overlong handling, advantages per estimator, and the metrics logged -
all against values worked out by hand. Plus the microbatches a pipeline needs."""

import math

import pytest
import torch

from megatron_bar.rl.trainer import RLConfig, Rollout, collect_rollouts, to_microbatches

EOS = 2


def _scripted(rounds):
    """``rounds[i]``: list of (reward, n_tokens, ends_with_eos) per sample, groups contiguous."""
    calls = []

    def generate(seed):
        i = len(calls)
        calls.append(seed)
        raw = [{"prompt_index": j // 2, "tokens": [5] * (n - 1) + [EOS if eos else 5],
                "logprobs": [0.0] * n, "entropy_sum": 0.5 * n, "truncated": not eos}
               for j, (_, n, eos) in enumerate(rounds[i])]
        return raw, [i] * (len(raw) // 2)

    def score(raw, prompts):
        i = prompts[0]
        return [Rollout([1], x["tokens"], x["logprobs"], rounds[i][j][0], truncated=x["truncated"])
                for j, x in enumerate(raw)], 0

    return generate, score, calls


def _cfg(**kw):
    return RLConfig(samples_per_prompt=2, prompts_per_rollout=2, max_response_tokens=4, **kw)


def test_without_dynamic_sampling_the_batch_shrinks():
    gen, score, calls = _scripted([[(1, 2, True), (1, 2, True), (1, 2, True), (0, 3, True)]])
    rollouts, stats = collect_rollouts(gen, score, _cfg(), seed=7)
    assert calls == [7] and len(rollouts) == 2
    assert stats["groups_dropped_share"] == 0.5 and stats["dynamic_sampling_refills"] == 0
    # grpo: group (1, 0): mean 0.5, unbiased std sqrt(0.5)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert [r.advantage for r in rollouts] == pytest.approx([a, -a])
    assert stats["reward_mean"] == pytest.approx(0.75)
    assert stats["entropy"] == pytest.approx(0.5)
    assert stats["response_length"] == pytest.approx(9 / 4)


def test_dynamic_sampling_refills_with_new_prompts():
    gen, score, calls = _scripted([
        [(1, 2, True), (1, 2, True), (1, 2, True), (0, 3, True)],
        [(0, 2, True), (0, 2, True), (0, 2, True), (1, 2, True)],
    ])
    rollouts, stats = collect_rollouts(gen, score, _cfg(dynamic_sampling=True, advantage="rloo"), seed=7)
    assert len(calls) == 2 and calls[0] == 7 and calls[1] != 7  # a new seed: new prompts
    assert len(rollouts) == 4
    assert (stats["dynamic_sampling_rounds"], stats["dynamic_sampling_refills"]) == (2, 1)
    assert stats["groups_dropped_share"] == 0.5 and stats["groups_trained"] == 2
    # rloo, group of 2: r_i - r_other
    assert [r.advantage for r in rollouts] == [1.0, -1.0, -1.0, 1.0]
    assert stats["reward_mean"] == pytest.approx(4 / 8)


def test_overlong_mask_takes_cut_responses_out_and_logs_their_share():
    # the second sample of group 1 ran to 4 tokens without EOS
    gen, score, _ = _scripted([[(1, 2, True), (0, 4, False), (1, 3, True), (0, 2, True)]])
    rollouts, stats = collect_rollouts(gen, score, _cfg(overlong="mask"), seed=0)
    assert stats["overlong_share"] == 0.25
    assert len(rollouts) == 3 and all(not r.truncated for r in rollouts)
    # the masked one still counted in its group's baseline: its partner's advantage is not 0
    assert rollouts[0].advantage > 0


def test_overlong_penalty_shapes_the_rewards_behind_the_advantages():
    # max 4 tokens, buffer 2: a 4-token answer loses 1, a 3-token one 0.5
    gen, score, _ = _scripted([[(1, 4, False), (1, 3, True), (1, 2, True), (1, 2, True)]])
    rollouts, stats = collect_rollouts(gen, score, _cfg(overlong="penalty", overlong_buffer=2,
                                                        advantage="drgrpo"), seed=0)
    # shaped rewards 0 and 0.5: Dr. GRPO advantages -0.25, +0.25; the second group is uniform
    assert [r.advantage for r in rollouts] == pytest.approx([-0.25, 0.25])
    assert stats["reward_mean"] == 1.0  # the verifier's reward is what is logged


def test_full_microbatches_pad_with_rows_that_carry_no_loss():
    rollouts = [Rollout([1, 4], [5, 6, EOS], [-0.1, -0.2, -0.3], 1.0, advantage=0.5,
                        routing=torch.ones(2, 4, 1, dtype=torch.int16)) for _ in range(3)]
    mbs = to_microbatches(rollouts, 6, 2, pad_id=3, full=True, top_k=1)
    assert [mb.tokens.size(0) for mb in mbs] == [2, 2]
    last = mbs[1]
    assert last.loss_mask[1].sum() == 0 and last.advantages[1] == 0.0
    assert last.loss_mask[0].tolist() == [0, 1, 1, 1, 0, 0]
    assert last.routing.shape == (2, 6, 2, 1)
    assert last.routing[:, :4, 0].eq(1).all()
    assert [len(mb.tokens) for mb in to_microbatches(rollouts, 6, 2, pad_id=3)] == [2, 1]


def test_vllm_engine_not_installed_says_how(monkeypatch):
    import importlib.util

    from megatron_bar.rl.engines import check_engine
    from megatron_bar.train.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"rl.engine 'vllm' is not installed \(pip install vllm\)"):
        check_engine("vllm")


@pytest.mark.parametrize("key, value, message", [
    ("advantage", "ppo", "rl.advantage"),
    ("clip_ratio_c", 1.0, "rl.clip_ratio_c"),
    ("overlong", "drop", "rl.overlong"),
    ("overlong_buffer", 5, "rl.overlong_buffer"),
    ("dynamic_sampling_max_rounds", 0, "rl.dynamic_sampling_max_rounds"),
    ("eval_interval", 2, "rl.eval_datasets is empty"),
    ("eval_samples", 0, "rl.eval_samples"),
    ("async_steps", 2, "rl.async_steps"),
    ("sync_bucket_mb", 0, "rl.sync_bucket_mb"),
    ("sync_backend", "mpi", "rl.sync_backend must be auto, nccl or gloo"),
    ("sync_backend", "nccl", r"rl.sync_backend must be auto or gloo while rl.gpus_per_worker is 0"),
    ("sync_port", 70000, "rl.sync_port"),
    ("engine", "sglang", "rl.engine 'sglang': one of megatron, transformers"),
])
def test_bad_keys_are_clear_errors(key, value, message):
    from megatron_bar.train.config import ConfigError
    from megatron_bar.rl.trainer import RLDatasetConfig, RLTrainConfig

    cfg = RLTrainConfig()
    cfg.model.load = "ckpt"
    cfg.train.steps = 1
    cfg.rl = _cfg(datasets=[RLDatasetConfig("p.jsonl")])
    cfg.validate()
    setattr(cfg.rl, key, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_engine_megatron_is_accepted_without_routing_replay():
    from megatron_bar.rl.trainer import RLDatasetConfig, RLTrainConfig
    from megatron_bar.train.config import ConfigError

    cfg = RLTrainConfig()
    cfg.model.load = "ckpt"
    cfg.train.steps = 1
    cfg.rl = _cfg(datasets=[RLDatasetConfig("p.jsonl")], engine="megatron")
    cfg.validate()
    cfg.rl.routing_replay = True
    with pytest.raises(ConfigError, match="rl.routing_replay .* transformers engine only; rl.engine is 'megatron'"):
        cfg.validate()


def test_megatron_engine_not_installed_says_how(monkeypatch):
    import importlib.util

    from megatron_bar.rl.engines import check_engine
    from megatron_bar.train.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("megatron.core.inference") else real(name, *a))
    with pytest.raises(ConfigError, match=r"rl.engine 'megatron' is not installed: .* \(pip install megatron-core\)"):
        check_engine("megatron")


def test_evaluate_greedy_and_pass_at_k():
    from megatron_bar.rl.trainer import Prompt, evaluate

    # prompt 0: greedy scores 1, samples (1, 0); prompt 1: greedy 0.5, samples (0, 0)
    scripted = {0.0: [[1.0], [0.5]], 1.0: [[1.0, 0.0], [0.0, 0.0]]}

    class Fleet:
        calls = []

        def generate(self, tokens, k, temperature, *args):
            self.calls.append((k, temperature))
            return [{"prompt_index": i, "tokens": [5], "logprobs": [0.0], "reward": r}
                    for i, rs in enumerate(scripted[temperature]) for r in rs]

    def score(raw, prompts):
        return [Rollout([1], x["tokens"], x["logprobs"], x["reward"]) for x in raw], 0

    pool = [Prompt({}, [1], "x"), Prompt({}, [1], "x")]
    out = evaluate(Fleet(), {"held": pool}, score, _cfg(eval_samples=2, temperature=1.0), 2, 3, seed=0)
    assert Fleet.calls == [(1, 0.0), (2, 1.0)]  # greedy, then k samples at rl.temperature
    assert out == {"eval/held/greedy": 0.75, "eval/held/greedy_acc": 0.5, "eval/held/pass@2": 0.5}
