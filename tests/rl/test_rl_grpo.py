"""GRPO core: every expected value is derived by hand in the test, not by the code under test."""

import math

import pytest
import torch

from megatron_bar.rl.grpo import (
    drop_uniform_groups,
    dynamic_sampling,
    group_advantages,
    k3_kl,
    masked_mean,
    overlong_rewards,
    pass_at_k,
    policy_loss,
    sequence_logprobs,
    token_entropy,
)

LN = math.log


def _leaf(values):
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def _loss(logprobs, old, adv, mask=None, **kw):
    """policy_loss on python lists; returns (loss, metrics, grad wrt logprobs)."""
    lp = _leaf(logprobs)
    old = torch.tensor(old, dtype=torch.float32)
    mask = torch.ones_like(old, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool)
    loss, metrics = policy_loss(lp, old, torch.tensor(adv, dtype=torch.float32), mask, **kw)
    loss.backward()
    return loss.item(), metrics, lp.grad


# ----------------------------------------------------------------- advantages


def test_group_advantages_group_scale_uses_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    s1 = 0.5 + 1e-6
    # group 2: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    s2 = math.sqrt(1 / 3) + 1e-6
    expected = [0.75 / s1, -0.25 / s1, -0.25 / s1, -0.25 / s1, 0.5 / s2, 0.5 / s2, -0.5 / s2, -0.5 / s2]
    torch.testing.assert_close(group_advantages(rewards, 4, "grpo"), torch.tensor(expected))


def test_group_advantages_none_scale_only_centres():
    rewards = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 10.0])
    expected = torch.tensor([1.0, -1.0, 0.0, -2.0, -4.0, 6.0])  # means 2 and 4
    torch.testing.assert_close(group_advantages(rewards, 3, "drgrpo"), expected)


def test_group_advantages_uniform_group_is_zero_not_nan():
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2, "grpo")
    assert adv[:2].tolist() == [0.0, 0.0]
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize("n, group_size", [(7, 4), (5, 2)])
def test_group_advantages_rejects_ragged_groups(n, group_size):
    with pytest.raises(ValueError, match="groups of"):
        group_advantages(torch.zeros(n), group_size)


def test_group_advantages_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.zeros(4), 2, "batch")


def test_grpo_epsilon_is_verls_1e6_not_trls_1e4():
    # a group with a tiny spread: std (unbiased) = 1e-5 / sqrt(2); the epsilon decides the scale
    rewards = torch.tensor([0.0, 1e-5], dtype=torch.float64)
    std = 1e-5 / math.sqrt(2)
    adv = group_advantages(rewards, 2, "grpo")
    torch.testing.assert_close(adv, torch.tensor([-5e-6, 5e-6], dtype=torch.float64) / (std + 1e-6))
    assert adv[1].item() == pytest.approx(0.6197, abs=1e-3)  # with 1e-4 it would be 0.0467


def test_rloo_is_leave_one_out_baseline():
    # r_i minus the mean of the other three, by hand
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5])
    expected = [1 - 0.5 / 3, 0 - 1.5 / 3, 0 - 1.5 / 3, 0.5 - 1 / 3]
    torch.testing.assert_close(group_advantages(rewards, 4, "rloo"), torch.tensor(expected))


def test_drop_uniform_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    keep, dropped = drop_uniform_groups(rewards, 3)
    assert keep.tolist() == [False] * 3 + [True] * 3 + [False] * 3
    assert dropped == 2


def test_drop_uniform_groups_keeps_everything_informative():
    keep, dropped = drop_uniform_groups(torch.tensor([0.0, 1.0, 0.5, 0.25]), 2)
    assert keep.all() and dropped == 0


# --------------------------------------------------------------- policy loss


def test_unclipped_tokens():
    # r = 1.1, A = +1 -> -1.1 ; r = 1.5, A = -1 -> -min(-1.5, -1.28) = 1.5 (no clip for A < 0, r > 1)
    loss, metrics, grad = _loss([[LN(1.1)], [LN(1.5)]], [[0.0], [0.0]], [1.0, -1.0])
    assert loss == pytest.approx((-1.1 + 1.5) / 2)
    # d(-r*A)/dlogp = -A*r, divided by the 2 tokens of the token-mean
    torch.testing.assert_close(grad, torch.tensor([[-1.1 / 2], [1.5 / 2]]))
    assert metrics["clip_frac"] == 0.0
    assert metrics["ratio_min"] == pytest.approx(1.1)
    assert metrics["ratio_max"] == pytest.approx(1.5)
    assert metrics["ratio_mean"] == pytest.approx(1.3)


def test_clip_high_binds():
    # r = 1.5 > 1 + 0.28, A = 2 -> -min(3.0, 1.28 * 2) = -2.56, and no gradient
    loss, metrics, grad = _loss([[LN(1.5)]], [[0.0]], [2.0], clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(-2.56)
    assert grad.tolist() == [[0.0]]
    assert metrics["clip_frac_high"] == 1.0
    assert metrics["clip_frac_low"] == 0.0
    assert metrics["clip_frac"] == 1.0


def test_clip_high_is_decoupled_from_clip_low():
    # r = 1.25 lies inside the DAPO range [0.8, 1.28] but outside symmetric [0.8, 1.2].
    loss, metrics, _ = _loss([[LN(1.25)]], [[0.0]], [1.0], clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(-1.25) and metrics["clip_frac"] == 0.0
    loss, metrics, _ = _loss([[LN(1.25)]], [[0.0]], [1.0], clip_low=0.2, clip_high=0.2)
    assert loss == pytest.approx(-1.2) and metrics["clip_frac_high"] == 1.0


def test_clip_low_binds():
    # r = 0.5 < 1 - 0.2, A = -2 -> -min(-1.0, 0.8 * -2) = 1.6, and no gradient
    loss, metrics, grad = _loss([[LN(0.5)]], [[0.0]], [-2.0], clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(1.6)
    assert grad.tolist() == [[0.0]]
    assert metrics["clip_frac_low"] == 1.0
    assert metrics["clip_frac_high"] == 0.0


def test_masked_tokens_change_nothing():
    real_lp, real_old = LN(1.1), LN(0.9)
    loss_ref, metrics_ref, grad_ref = _loss([[real_lp]], [[real_old]], [1.0])
    # Same real token, plus padding holding garbage that would overflow or poison.
    inf, nan = float("inf"), float("nan")
    loss, metrics, grad = _loss(
        [[real_lp, 1e4, -inf, nan]],
        [[real_old, -1e4, 3.0, nan]],
        [1.0],
        mask=[[True, False, False, False]],
    )
    assert loss == pytest.approx(loss_ref)
    assert metrics == pytest.approx(metrics_ref)
    assert grad[0, 0].item() == pytest.approx(grad_ref[0, 0].item())
    assert grad[0, 1:].tolist() == [0.0, 0.0, 0.0]


def test_aggregations_differ_on_ragged_masks():
    # seq 0: 3 tokens, A = +1, r = (1, 1.1, 0.9) -> losses (-1, -1.1, -0.9): sum -3.0, mean -1.0
    # seq 1: 1 token,  A = -3, r = 1.2 -> -min(-3.6, -3.6) = 3.6
    logprobs = [[0.0, LN(1.1), LN(0.9)], [LN(1.2), 0.0, 0.0]]
    old = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    mask = [[True, True, True], [True, False, False]]
    token_mean, _, _ = _loss(logprobs, old, [1.0, -3.0], mask, loss_agg="token-mean")
    seq_mean, _, _ = _loss(logprobs, old, [1.0, -3.0], mask, loss_agg="seq-mean-token-mean")
    assert token_mean == pytest.approx((-3.0 + 3.6) / 4)
    assert seq_mean == pytest.approx((-1.0 + 3.6) / 2)


def test_seq_mean_ignores_sequences_without_tokens():
    loss, _, _ = _loss([[LN(1.1)], [5.0]], [[0.0], [0.0]], [1.0, 1.0], [[True], [False]], loss_agg="seq-mean-token-mean")
    assert loss == pytest.approx(-1.1)


def test_tis_weight_is_capped_and_detached():
    # ratio 1, A = 1. old - rollout = (ln 1.5, ln 3) -> weights (1.5, min(3, 2) = 2).
    lp = _leaf([[0.0, 0.0]])
    old = torch.zeros(1, 2)
    rollout = torch.tensor([[-LN(1.5), -LN(3.0)]], requires_grad=True)
    loss, metrics = policy_loss(
        lp, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), rollout_logprobs=rollout, tis_cap=2.0
    )
    loss.backward()
    assert loss.item() == pytest.approx(-(1.5 + 2.0) / 2)
    assert metrics["tis_weight_mean"] == pytest.approx(1.75)
    # d/dlogp of -w * r * A = -w (at r = 1), over 2 tokens
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.75, -1.0]]))
    assert rollout.grad is None or torch.all(rollout.grad == 0)


def test_k3_kl_value_and_beta():
    # A = 0, so only the KL term remains. d = ref - logp = (0.5, -1.0):
    # k3 = e^d - d - 1 = (e^0.5 - 1.5, e^-1)
    logprobs = [[0.0, 0.0]]
    ref = torch.tensor([[0.5, -1.0]])
    k3 = [math.exp(0.5) - 1.5, math.exp(-1.0)]
    lp = _leaf(logprobs)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = policy_loss(lp, torch.zeros(1, 2), torch.tensor([0.0]), mask, ref_logprobs=ref, kl_beta=0.1)
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2)
    assert metrics["kl_mean"] == pytest.approx(sum(k3) / 2)
    # kl_beta = 0 (default): reported, not added
    loss0, metrics0 = policy_loss(lp, torch.zeros(1, 2), torch.tensor([0.0]), mask, ref_logprobs=ref)
    assert loss0.item() == 0.0
    assert metrics0["kl_mean"] == pytest.approx(sum(k3) / 2)


def test_kl_beta_without_reference_is_an_error():
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), kl_beta=0.1)


def test_zero_advantage_gives_exactly_zero_gradient():
    torch.manual_seed(0)
    lp = torch.randn(3, 5, requires_grad=True)
    old = lp.detach() + 0.3 * torch.randn(3, 5)
    mask = torch.rand(3, 5) > 0.3
    loss, _ = policy_loss(lp, old, torch.zeros(3), mask, rollout_logprobs=old - 0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros_like(lp))


def test_metrics_are_floats_and_optional_keys_absent():
    _, metrics, _ = _loss([[0.1]], [[0.0]], [1.0])
    assert all(type(v) is float for v in metrics.values())
    assert "kl_mean" not in metrics and "tis_weight_mean" not in metrics


# ----------------------------------------------------------------- log-probs


def test_sequence_logprobs_matches_hand_log_softmax():
    row = [1.0, 2.0, 3.0]
    lse = math.log(sum(math.exp(x) for x in row))
    logits = torch.tensor([[row, row[::-1]]])  # [1, 2, 3]
    tokens = torch.tensor([[2, 0]])
    expected = torch.tensor([[3.0 - lse, 3.0 - lse]])
    torch.testing.assert_close(sequence_logprobs(logits, tokens), expected)


def test_sequence_logprobs_computes_in_fp32():
    logits = torch.randn(2, 3, 7).to(torch.bfloat16)
    out = sequence_logprobs(logits, torch.zeros(2, 3, dtype=torch.long))
    assert out.dtype == torch.float32


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 4) / 3)
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([1.5, 4.0]))
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


# ------------------------------------------------------------------- dual-clip


def test_dual_clip_bounds_negative_advantage_loss():
    # r = 5, A = -1: PPO-clip gives -min(-5, -1.28) = 5; dual-clip caps at 3 * 1 = 3, no gradient
    loss, metrics, grad = _loss([[LN(5.0)]], [[0.0]], [-1.0], clip_ratio_c=3.0)
    assert loss == pytest.approx(3.0)
    assert grad.tolist() == [[0.0]]
    assert metrics["clip_frac_dual"] == 1.0
    # r = 2 < 3: untouched, gradient -A * r = 2
    loss, metrics, grad = _loss([[LN(2.0)]], [[0.0]], [-1.0], clip_ratio_c=3.0)
    assert loss == pytest.approx(2.0)
    torch.testing.assert_close(grad, torch.tensor([[2.0]]))
    assert metrics["clip_frac_dual"] == 0.0


def test_dual_clip_leaves_positive_advantages():
    # r = 5, A = +1: the clip-high branch (-1.28), dual-clip does not apply
    loss, metrics, _ = _loss([[LN(5.0)]], [[0.0]], [1.0], clip_ratio_c=3.0)
    assert loss == pytest.approx(-1.28)
    assert metrics["clip_frac_dual"] == 0.0


def test_dual_clip_needs_c_above_one():
    with pytest.raises(ValueError, match="clip_ratio_c"):
        _loss([[0.0]], [[0.0]], [1.0], clip_ratio_c=1.0)


# ------------------------------------------------------------------- k3 clamp


def test_k3_kl_is_clamped_to_10():
    logp = _leaf([0.0, 0.0, 0.0])
    ref = torch.tensor([15.0, -15.0, 1.0])
    kl = k3_kl(logp, ref)
    # exp(15) - 16 and exp(-15) + 14 both exceed 10; exp(1) - 2 does not
    torch.testing.assert_close(kl, torch.tensor([10.0, 10.0, math.e - 2]))
    kl.sum().backward()
    # clamped tokens pass no gradient; d/dlogp of exp(ref-logp) - (ref-logp) - 1 is 1 - exp(ref-logp)
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, 1 - math.e]))


def test_kl_metric_uses_the_clamp():
    _, metrics, _ = _loss([[0.0]], [[0.0]], [1.0], ref_logprobs=torch.tensor([[15.0]]), kl_beta=0.1)
    assert metrics["kl_mean"] == pytest.approx(10.0)


# --------------------------------------------------------------- overlong


def test_overlong_modes():
    rewards = torch.tensor([1.0, 1.0, 0.5, 0.0])
    lengths = torch.tensor([4, 6, 8, 10])
    truncated = torch.tensor([False, False, False, True])
    r, keep = overlong_rewards(rewards, lengths, truncated, "none", 10, 4)
    assert r.tolist() == rewards.tolist() and keep.all()
    r, keep = overlong_rewards(rewards, lengths, truncated, "mask", 10, 4)
    assert r.tolist() == rewards.tolist() and keep.tolist() == [True, True, True, False]
    # soft punishment, max 10, buffer 4: 0 up to 6 tokens, then -1/4 per token: 8 -> -0.5, 10 -> -1
    r, keep = overlong_rewards(rewards, lengths, truncated, "penalty", 10, 4, penalty_factor=1.0)
    assert r.tolist() == [1.0, 1.0, 0.0, -1.0] and keep.all()
    r, _ = overlong_rewards(rewards, lengths, truncated, "penalty", 10, 4, penalty_factor=0.5)
    assert r.tolist() == [1.0, 1.0, 0.25, -0.5]
    with pytest.raises(ValueError, match="buffer"):
        overlong_rewards(rewards, lengths, truncated, "penalty", 10, 0)


# --------------------------------------------------------- dynamic sampling


def _rounds(*reward_rounds):
    """generate_round over fixed rounds; a sample is (round, index)."""
    def generate(i):
        rewards = torch.tensor(reward_rounds[i])
        return [(i, j) for j in range(len(rewards))], rewards
    return generate


def test_dynamic_sampling_refills_until_full():
    # groups of 2; round 0 has one informative group (the second), round 1 two
    gen = _rounds([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    out = dynamic_sampling(gen, target_groups=2, group_size=2, max_rounds=5)
    assert out.samples == [(0, 2), (0, 3), (1, 0), (1, 1)]  # the excess of round 1 is cut
    assert (out.rounds, out.generated_groups, out.kept_groups) == (2, 6, 2)
    assert out.rewards.numel() == 12


def test_dynamic_sampling_cap_trains_short():
    gen = _rounds([1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0])
    out = dynamic_sampling(gen, target_groups=3, group_size=2, max_rounds=2)
    assert out.samples == [(0, 2), (0, 3)]
    assert (out.rounds, out.kept_groups) == (2, 1)


def test_one_round_is_plain_filtering():
    gen = _rounds([1.0, 1.0, 0.0, 1.0])
    out = dynamic_sampling(gen, target_groups=2, group_size=2, max_rounds=1)
    assert out.samples == [(0, 2), (0, 3)] and out.rounds == 1


# ------------------------------------------------------------- evaluation


@pytest.mark.parametrize("n, c, k", [(4, 1, 2), (5, 2, 3), (6, 0, 2), (3, 3, 1), (8, 3, 1)])
def test_pass_at_k_matches_enumeration(n, c, k):
    import itertools

    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_token_entropy():
    assert token_entropy(torch.zeros(7)).item() == pytest.approx(math.log(7))
    p = torch.tensor([0.5, 0.25, 0.25])
    assert token_entropy(p.log()).item() == pytest.approx(-(p * p.log()).sum().item())
