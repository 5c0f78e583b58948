"""GRPO's algorithmic core: group-relative advantages and the clipped policy loss.

The conventions follow verl, NeMo-RL, open-instruct and TRL:

* Samples come in groups of ``group_size`` completions of the same prompt,
  stored contiguously: samples ``[g * group_size, (g + 1) * group_size)``
  form group ``g``.
* Each sample has one scalar advantage (outcome reward), and it is
  broadcast over the sample's tokens.
* Token tensors are ``[B, T]`` with a ``mask`` that is True on the response
  tokens that count in the loss (prompt and padding are False).

Everything here is pure torch and works on any device. Nothing here knows
about model parallelism: the losses are means over the local micro-batch, and
the trainer scales them for gradient accumulation and data parallelism.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

__all__ = [
    "PolicyLossConfig",
    "SampledBatch",
    "drop_uniform_groups",
    "dynamic_sampling",
    "group_advantages",
    "k3_kl",
    "masked_mean",
    "overlong_rewards",
    "pass_at_k",
    "policy_loss",
    "sequence_logprobs",
    "token_entropy",
]

AdvantageEstimator = Literal["grpo", "drgrpo", "rloo"]
LossAgg = Literal["token-mean", "seq-mean-token-mean"]
Overlong = Literal["none", "mask", "penalty"]

# Added to the group std so that groups with (nearly) equal rewards do not divide by
# zero: verl's compute_grpo_outcome_advantage (epsilon=1e-6 on the unbiased torch.std),
# which the "grpo" estimator follows. Others differ: TRL adds 1e-4, open-instruct 1e-8
# (on numpy's biased std), NeMo-RL 1e-6 (on a leave-one-out std).
ADVANTAGE_EPS = 1e-6

# exp() of a log-ratio beyond this overflows float32 (or, at padding, turns
# 0 * inf into NaN in the backward pass). verl clamps at the same value.
MAX_LOG_RATIO = 20.0

# verl's kl_penalty_forward("low_var_kl" / "k3") clamps the per-token k3 to [-10, 10]:
# one token whose policy drifted far from the reference cannot dominate the KL term.
MAX_K3_KL = 10.0


# --------------------------------------------------------------------------- #
# Advantages
# --------------------------------------------------------------------------- #


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``rewards [n]`` as ``[n // group_size, group_size]``, checking the shape."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 for a group baseline, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of {group_size}: "
            "every prompt must have exactly group_size samples, stored contiguously"
        )
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, estimator: AdvantageEstimator = "grpo"
) -> torch.Tensor:
    """Group-relative advantages, one per sample.

    Args:
        rewards: ``[n]`` scalar rewards, ``n`` a multiple of ``group_size``.
        group_size: completions per prompt (at least 2).
        estimator:
            ``"grpo"``: ``(r - mean_g) / (std_g + 1e-6)`` with the *unbiased*
            (``n - 1``) group std, as verl's ``compute_grpo_outcome_advantage``.
            ``"drgrpo"`` (Liu et al., 2025): ``r - mean_g`` only, verl's
            ``norm_adv_by_std_in_grpo=False``. Dividing by the std up-weights
            prompts that are nearly always right or nearly always wrong, which
            biases the gradient.
            ``"rloo"`` (Ahmadian et al., 2024): ``r_i - mean_{j != i} r_j``, the
            mean of the *other* samples of the group as the baseline, which is
            ``n / (n - 1) * (r_i - mean_g)``: verl's ``compute_rloo_outcome_advantage``
            and NeMo-RL's ``use_leave_one_out_baseline`` (its default) with
            ``normalize_rewards: false``. No std, so no epsilon.

    Returns:
        ``[n]`` advantages in float32, or in the rewards' dtype if that is a
        wider float.
    """
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    grouped = _grouped(rewards, group_size).to(dtype)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        centred = centred / (grouped.std(dim=1, unbiased=True, keepdim=True) + ADVANTAGE_EPS)
    elif estimator == "rloo":
        centred = centred * (group_size / (group_size - 1))
    elif estimator != "drgrpo":
        raise ValueError(f"advantage estimator must be 'grpo', 'drgrpo' or 'rloo', got {estimator!r}")
    return centred.reshape(-1)


def drop_uniform_groups(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """Mask out groups whose rewards are all equal (DAPO's dynamic sampling filter).

    Such a group has zero advantage for every sample, so it adds no gradient.
    It still dilutes the token-mean loss and costs compute. Equality is exact,
    which is right for the usual 0/1 verifiable rewards.

    Returns:
        ``(keep, n_dropped_groups)``: ``keep`` is a bool ``[n]`` mask over
        samples, False for every sample of a uniform group.
    """
    grouped = _grouped(rewards, group_size)
    uniform = (grouped == grouped[:, :1]).all(dim=1)
    keep = (~uniform).repeat_interleave(group_size)
    return keep, int(uniform.sum().item())


# --------------------------------------------------------------------------- #
# Log-probabilities and masked reductions
# --------------------------------------------------------------------------- #


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token under its logits, computed in float32.

    ``logits[b, t]`` must be the distribution that ``tokens[b, t]`` was
    sampled from. For a causal LM, shift first: pass ``logits[:, :-1]`` with
    ``input_ids[:, 1:]``.

    We compute ``logit[token] - logsumexp(logits)`` instead of
    ``log_softmax(...).gather(...)``. It is the same value, but it never
    materialises a second ``[B, T, V]`` tensor. bf16 logits are upcast, since
    bf16 log-probs are too coarse for importance ratios near 1.

    Args:
        logits: ``[B, T, V]``.
        tokens: ``[B, T]`` integer token ids.

    Returns:
        ``[B, T]`` float32 log-probabilities.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    logits = logits.float()
    picked = logits.gather(dim=-1, index=tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True, over ``dim`` (all elements if None).

    Masked-out entries are selected away with ``where``, not multiplied by 0,
    so NaN or inf there (e.g. log-probs of padding) cannot leak in. A slice
    with no True entries has mean 0.
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=dim)
    count = mask.sum(dim=dim)
    return total / count.clamp(min=1).to(total.dtype)


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: LossAgg) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar.

    ``"token-mean"`` (DAPO, Dr. GRPO): every response token of the batch has
    the same weight, so long responses are not under-weighted.
    ``"seq-mean-token-mean"`` (original GRPO): each sequence's token mean, then
    the mean over sequences that have at least one token.
    """
    if loss_agg == "token-mean":
        return masked_mean(per_token, mask)
    if loss_agg == "seq-mean-token-mean":
        has_tokens = mask.bool().any(dim=1)
        return masked_mean(masked_mean(per_token, mask, dim=1), has_tokens)
    raise ValueError(f"loss_agg must be 'token-mean' or 'seq-mean-token-mean', got {loss_agg!r}")


# --------------------------------------------------------------------------- #
# Policy loss
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """The hyper-parameters of :func:`policy_loss`, as one object for configs.

    Use it as ``policy_loss(..., **dataclasses.asdict(cfg))``.
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    loss_agg: LossAgg = "token-mean"
    tis_cap: float = 2.0
    kl_beta: float = 0.0
    clip_ratio_c: float = 3.0


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman, "Approximating KL divergence").

    ``exp(ref - logp) - (ref - logp) - 1``: unbiased for samples from pi, and
    always >= 0 (unlike k1 = logp - ref). Clamped to ``[-10, 10]`` per token, as
    verl's ``kl_penalty_forward`` does for ``k3`` (the gradient is 0 where it binds).
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-MAX_K3_KL, MAX_K3_KL)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    loss_agg: LossAgg = "token-mean",
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float = 2.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    clip_ratio_c: float = 3.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip loss with decoupled clip range (DAPO), dual-clip, optional TIS and k3 KL.

    Per token, with ratio ``r = exp(logprobs - old_logprobs)``::

        pg  = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)
        pg  = min(pg, -clip_ratio_c * A)                            # if A < 0 (dual-clip)
        pg *= min(exp(old_logprobs - rollout_logprobs), tis_cap)    # if rollout_logprobs
        loss_token = pg + kl_beta * k3(logprobs, ref_logprobs)      # if ref_logprobs

    and the loss is ``loss_token`` aggregated with ``loss_agg``.

    Truncated importance sampling (TIS; Yao et al., 2025). The rollout engine
    (vLLM/SGLang) and the trainer compute slightly different probabilities for
    the same policy (kernels, precision). The samples come from the rollout
    engine, so the per-token weight ``pi_old / pi_rollout`` corrects for that.
    It is capped at ``tis_cap``, which bounds the variance, and detached: it
    only re-weights. It multiplies the policy-gradient term only. The KL term
    is a regulariser on the current policy, not an estimate over rollout
    samples (as in verl).

    Args:
        logprobs: ``[B, T]`` current-policy log-probs (requires grad).
        old_logprobs: ``[B, T]`` log-probs of the policy that generated the
            batch, recomputed by the trainer (no grad).
        advantages: ``[B]`` per-sample advantages, broadcast over tokens.
        mask: ``[B, T]`` True on tokens that count.
        clip_low, clip_high: ratio clip range ``[1 - clip_low, 1 + clip_high]``.
            DAPO's "clip-higher" (0.28 > 0.2) lets low-probability tokens rise
            more, which keeps entropy from collapsing.
        loss_agg: ``"token-mean"`` or ``"seq-mean-token-mean"`` (see
            :func:`_aggregate`).
        rollout_logprobs: ``[B, T]`` log-probs reported by the rollout engine.
            Enables TIS.
        tis_cap: upper bound of the TIS weight.
        ref_logprobs: ``[B, T]`` reference-policy log-probs. Enables the k3
            KL penalty and its metric.
        kl_beta: KL coefficient. 0 (the default) reports the KL but adds
            nothing to the loss.
        clip_ratio_c: dual-clip bound (Ye et al., 2020, arXiv:1912.09729), > 1.
            With A < 0 the unclipped term ``-r * A`` grows with ``r`` without
            bound; a token whose probability rose far above the old policy's
            would dominate the batch. Its loss is capped at ``-clip_ratio_c * A``
            (and its gradient is 0 there), exactly as verl's
            ``compute_policy_loss_vanilla`` (default 3.0 there too).

    Returns:
        ``(loss, metrics)``. ``loss`` is a scalar tensor. ``metrics`` holds
        Python floats over masked tokens: ``pg_loss``, ``clip_frac_low``,
        ``clip_frac_high``, ``clip_frac``, ``clip_frac_dual`` (tokens the dual
        clip bounded, verl's ``pg_clipfrac_lower``), ``ratio_mean``, ``ratio_min``,
        ``ratio_max``. ``kl_mean`` is there only when ``ref_logprobs`` is
        given, and ``tis_weight_mean`` only when ``rollout_logprobs`` is.
    """
    if advantages.dim() != 1 or advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(
            f"advantages must be [B]={logprobs.shape[0]}, got {tuple(advantages.shape)}"
        )
    if kl_beta != 0.0 and ref_logprobs is None:
        raise ValueError("kl_beta != 0 needs ref_logprobs")
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be greater than 1 (dual-clip), got {clip_ratio_c}")
    mask = mask.bool()
    # Padding may hold anything (-inf, NaN). Zero it in every input first:
    # `where` passes no gradient to unselected entries, and every later exp
    # stays finite, so no 0 * inf = NaN can reach the backward pass.
    logprobs, old_logprobs, rollout_logprobs, ref_logprobs = (
        None if x is None else torch.where(mask, x, torch.zeros_like(x))
        for x in (logprobs, old_logprobs, rollout_logprobs, ref_logprobs)
    )
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # [B, 1], broadcasts over tokens

    log_ratio = (logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = -torch.minimum(ratio * adv, clipped_ratio * adv)
    # Dual-clip: applied to negative advantages only (verl: torch.where(advantages < 0, ...)).
    dual_bound = -clip_ratio_c * adv
    dual_clipped = (adv < 0) & (pg > dual_bound)
    pg = torch.where(adv < 0, torch.minimum(pg, dual_bound), pg)

    stats: dict[str, torch.Tensor] = {}
    if rollout_logprobs is not None:
        tis_log = (old_logprobs - rollout_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        tis_weight = torch.exp(tis_log).clamp(max=tis_cap).detach()
        pg = pg * tis_weight
        stats["tis_weight_mean"] = masked_mean(tis_weight, mask)

    pg_loss = _aggregate(pg, mask, loss_agg)
    loss = pg_loss
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        if kl_beta != 0.0:
            loss = loss + kl_beta * _aggregate(kl, mask, loss_agg)
        stats["kl_mean"] = masked_mean(kl.detach(), mask)

    stats["pg_loss"] = pg_loss.detach()
    stats.update(_clip_stats(ratio.detach(), adv, mask, clip_low, clip_high))
    stats["clip_frac_dual"] = masked_mean(dual_clipped.float(), mask)
    return loss, _to_floats(stats)


def _clip_stats(
    ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip_low: float, clip_high: float
) -> dict[str, torch.Tensor]:
    """Fractions of masked tokens whose gradient the clip removed, and ratio stats.

    The clipped branch is taken (and the token gets no gradient) when
    ``A > 0 and r > 1 + clip_high`` ("high"), or ``A < 0 and r < 1 - clip_low``
    ("low"). With no masked token, min and max come out as +-inf, and
    :func:`_to_floats` reports them as 0.
    """
    clipped_high = (adv > 0) & (ratio > 1.0 + clip_high)
    clipped_low = (adv < 0) & (ratio < 1.0 - clip_low)
    inf = torch.full_like(ratio, float("inf"))
    return {
        "clip_frac_low": masked_mean(clipped_low.float(), mask),
        "clip_frac_high": masked_mean(clipped_high.float(), mask),
        "clip_frac": masked_mean((clipped_low | clipped_high).float(), mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_min": torch.where(mask, ratio, inf).min(),
        "ratio_max": torch.where(mask, ratio, -inf).max(),
    }


def _to_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors to Python floats with one device sync (not one per metric)."""
    values = torch.stack([v.float() for v in stats.values()]).tolist()
    return {k: (v if abs(v) != float("inf") else 0.0) for k, v in zip(stats, values)}


# --------------------------------------------------------------------------- #
# Overlong responses
# --------------------------------------------------------------------------- #


def overlong_rewards(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    truncated: torch.Tensor,
    mode: Overlong,
    max_len: int,
    buffer: int,
    penalty_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How responses that ran into ``max_len`` enter the loss (DAPO, Yu et al., 2025).

    * ``"none"``: as any other response.
    * ``"mask"`` (DAPO's overlong filtering; NeMo-RL's ``overlong_filtering``): a
      truncated response keeps its reward (the group's baseline still sees it) but none
      of its tokens count in the loss: it was cut, not judged.
    * ``"penalty"`` (DAPO's soft overlong punishment, verl's ``DAPORewardManager``):
      ``r + min(-(L - (max_len - buffer)) / buffer * penalty_factor, 0)``: 0 up to
      ``max_len - buffer`` tokens, then falling linearly to ``-penalty_factor`` at
      ``max_len``. It applies by length, cut or not.

    Args:
        rewards: ``[n]`` verifier rewards.
        lengths: ``[n]`` response lengths in tokens.
        truncated: ``[n]`` bool, True where generation stopped at ``max_len`` without EOS.

    Returns:
        ``(rewards, in_loss)``: the rewards to build advantages from, and a bool ``[n]``,
        False for the responses whose tokens leave the loss.
    """
    in_loss = torch.ones_like(truncated, dtype=torch.bool)
    if mode == "none":
        return rewards, in_loss
    if mode == "mask":
        return rewards, ~truncated.bool()
    if mode == "penalty":
        if not 0 < buffer <= max_len:
            raise ValueError(f"overlong buffer must be in (0, {max_len}], got {buffer}")
        exceed = lengths.to(rewards.dtype) - (max_len - buffer)
        return rewards + (-exceed / buffer * penalty_factor).clamp(max=0.0), in_loss
    raise ValueError(f"overlong must be 'none', 'mask' or 'penalty', got {mode!r}")


# --------------------------------------------------------------------------- #
# Dynamic sampling
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class SampledBatch:
    """What :func:`dynamic_sampling` collected.

    ``samples`` are the kept samples (whole groups, in order); ``rewards`` every reward
    generated over all rounds (for the reward metrics); ``rounds`` generation rounds
    run (1 + refills); ``generated_groups`` and ``kept_groups`` count groups.
    """

    samples: list
    rewards: torch.Tensor
    rounds: int
    generated_groups: int
    kept_groups: int


def dynamic_sampling(generate_round, target_groups: int, group_size: int, max_rounds: int) -> SampledBatch:
    """Fill a batch with informative groups (DAPO's dynamic sampling).

    ``generate_round(i)`` returns ``(samples, rewards)`` for round ``i``: whole groups
    of ``group_size`` samples, stored contiguously, and their ``[n]`` rewards. Groups
    whose rewards are all equal (no gradient) are dropped, and new rounds run until
    ``target_groups`` informative groups are in hand (the excess of the last round is
    cut, as in verl's DAPO recipe) or ``max_rounds`` rounds have run; then the batch
    trains short rather than stopping the run (verl and NeMo-RL raise there).
    ``max_rounds=1`` is plain filtering: the batch shrinks as the groups saturate.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be at least 1, got {max_rounds}")
    kept: list = []
    all_rewards: list[torch.Tensor] = []
    generated = rounds = 0
    while rounds < max_rounds and len(kept) < target_groups * group_size:
        samples, rewards = generate_round(rounds)
        rounds += 1
        if len(samples) != rewards.numel():
            raise ValueError(f"round {rounds}: {len(samples)} samples but {rewards.numel()} rewards")
        keep, _ = drop_uniform_groups(rewards, group_size)
        kept.extend(s for s, k in zip(samples, keep.tolist()) if k)
        all_rewards.append(rewards)
        generated += rewards.numel() // group_size
    kept = kept[: target_groups * group_size]
    return SampledBatch(kept, torch.cat(all_rewards), rounds, generated, len(kept) // group_size)


# --------------------------------------------------------------------------- #
# Evaluation metrics
# --------------------------------------------------------------------------- #


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``correct`` are right (Chen et al.,
    2021, "Evaluating Large Language Models Trained on Code"): ``1 - C(n-c, k) / C(n, k)``."""
    if not 0 < k <= n or not 0 <= correct <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= correct <= n, got n={n} c={correct} k={k}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim, in float32 (nats): ``[..., V] -> [...]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)
