"""RLVR with GRPO: megatron-core trains, a Ray fleet of rollout workers generates.

    python -m megatron_bar.rl CONFIG.yaml [key=value ...]                  # one process
    torchrun --nproc-per-node 8 -m megatron_bar.rl CONFIG.yaml rl.ray_address=HEAD:6379

Each step: rank 0 samples ``rl.prompts_per_rollout`` prompts, the fleet answers each
``rl.samples_per_prompt`` times, the verifiers score the answers, responses cut at the
length limit are kept, masked or penalised (``rl.overlong``), the scores become
group-relative advantages (``rl.advantage``; groups whose rewards are all equal carry no
signal and are dropped, or replaced by groups of new prompts with ``rl.dynamic_sampling``),
the training ranks compute their own log-probs of the rollouts (routing each token to the
rollout's experts with ``rl.routing_replay``) and take
``rl.minibatches`` optimizer steps (one by default) on the clipped policy loss (with
truncated importance sampling against the rollout engine's log-probs), and the new
weights go back to every worker. Every ``rl.eval_interval`` steps the policy answers
``rl.eval_datasets`` (greedy and pass@k). The ``rlvr`` freeze policy applies: every
shared parameter trains, the anchor expert stays.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bar import platform
from megatron_bar.bar.freeze import FREEZE_POLICIES
from megatron_bar.data import ChatTemplate, Message
from megatron_bar.data.chat import DataError, ROLES
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import check_same_architecture, load_weights
from megatron_bar.model.config import ModelConfig
from megatron_bar.rl.engines import check_engine
from megatron_bar.rl.grpo import (
    drop_uniform_groups,
    dynamic_sampling,
    group_advantages,
    overlong_rewards,
    pass_at_k,
    policy_loss,
)
from megatron_bar.rl.routing import RoutingReplay, stack_routing
from megatron_bar.rl.sandbox import SandboxConfig
from megatron_bar.train import checkpoint as ckpt
from megatron_bar.train.config import ConfigError, TrainConfig, config_to_dict
from megatron_bar.train.engine import Microbatch, forward_backward, forward_logprobs, token_logprobs
from megatron_bar.train.metrics import MetricsLogger, read_metrics
from megatron_bar.train.preempt import Preemption
from megatron_bar.train.trainer import setup_training
from megatron_bar.train.vocab_fit import stage_tokenizer

log = logging.getLogger(__name__)


@dataclass
class RLDatasetConfig:
    path: str
    reward: str = "math"  # math | code | tool_use | safety | package.module:function
    weight: float = 1.0


@dataclass
class RLConfig:
    datasets: list[RLDatasetConfig] = field(default_factory=list)
    samples_per_prompt: int = 8
    prompts_per_rollout: int = 64
    temperature: float = 1.0
    max_response_tokens: int = 256
    advantage: str = "grpo"  # grpo: (r - mean) / (std + 1e-6) | drgrpo: r - mean | rloo: leave-one-out
    clip_low: float = 0.2
    clip_high: float = 0.272
    clip_ratio_c: float = 3.0  # dual-clip: the loss of a token with A < 0 is at most -c * A (verl's 3)
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean
    kl_beta: float = 0.0  # k3 KL to the starting policy; 0 = off (the recipe)
    tis_cap: float = 2.0  # truncated importance sampling: rollout vs trainer log-probs
    minibatches: int = 1  # optimizer steps per rollout (open-instruct num_mini_batches; 1 = on-policy)
    # 1: the next rollout is generated (by the weights before this step's update) while the
    # trainer trains on the last one (open-instruct's --async_steps 1); 0: synchronous
    async_steps: int = 0
    # responses cut at max_response_tokens: none (kept) | mask (out of the loss) | penalty (DAPO soft)
    overlong: str = "none"
    overlong_buffer: int | None = None  # penalty: over the last N tokens (None: max_response_tokens // 4)
    overlong_penalty: float = 1.0  # penalty: the reward lost at max_response_tokens
    dynamic_sampling: bool = False  # DAPO: refill all-equal groups with new prompts
    dynamic_sampling_max_rounds: int = 10  # generation rounds per step at most (then train short)
    eval_interval: int = 0  # evaluate every N steps (and at the start and end); 0 = never
    eval_datasets: list[RLDatasetConfig] = field(default_factory=list)  # held-out, as rl.datasets
    eval_samples: int = 4  # pass@k: k samples per prompt at rl.temperature
    routing_replay: bool = False  # MoE: the trainer routes each token to the rollout's experts (R3)
    engine: str = "transformers"  # the rollout workers' generation engine: transformers | megatron
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    ray_address: str | None = None
    timeout_s: float = 600.0
    reward_workers: int = 2  # processes scoring rollouts (code rewards' programs run side by side)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    sync_bucket_mb: float = 256.0  # weight sync: changed tensors go to the workers in buckets of this size
    # the weight-sync group (rank 0 + the workers, its own process group): auto = NCCL when
    # the trainer and the workers have GPUs, gloo otherwise | nccl | gloo
    sync_backend: str = "auto"
    sync_port: int = 0  # its TCPStore's port on rank 0's node; 0: any free port


@dataclass
class RLTrainConfig(TrainConfig):
    rl: RLConfig = field(default_factory=RLConfig)

    def validate(self) -> "RLTrainConfig":
        if not self.model.load:
            raise ConfigError("model.load is required")
        if not self.rl.datasets:
            raise ConfigError("rl.datasets is empty")
        if self.rl.samples_per_prompt < 2:
            raise ConfigError("rl.samples_per_prompt must be at least 2 (GRPO compares a group)")
        if self.rl.reward_workers < 0:
            raise ConfigError(f"rl.reward_workers must be >= 0, got {self.rl.reward_workers}")
        if self.rl.minibatches < 1:
            raise ConfigError(f"rl.minibatches must be at least 1, got {self.rl.minibatches}")
        check_engine(self.rl.engine)
        if self.rl.routing_replay and self.rl.engine != "transformers":
            raise ConfigError(f"rl.routing_replay records the rollout's experts in the transformers "
                              f"engine only; rl.engine is {self.rl.engine!r}")
        if self.rl.async_steps not in (0, 1):
            raise ConfigError(f"rl.async_steps must be 0 or 1, got {self.rl.async_steps}")
        if not self.rl.sync_bucket_mb > 0:
            raise ConfigError(f"rl.sync_bucket_mb must be positive, got {self.rl.sync_bucket_mb}")
        if self.rl.loss_agg not in ("token-mean", "seq-mean-token-mean"):
            raise ConfigError(f"rl.loss_agg {self.rl.loss_agg!r}: token-mean or seq-mean-token-mean")
        if self.rl.advantage not in ("grpo", "drgrpo", "rloo"):
            raise ConfigError(f"rl.advantage {self.rl.advantage!r}: grpo, drgrpo or rloo")
        if not self.rl.clip_ratio_c > 1.0:
            raise ConfigError(f"rl.clip_ratio_c must be greater than 1 (dual-clip), got {self.rl.clip_ratio_c}")
        if self.rl.overlong not in ("none", "mask", "penalty"):
            raise ConfigError(f"rl.overlong {self.rl.overlong!r}: none, mask or penalty")
        buffer = self.rl.overlong_buffer
        if buffer is not None and not 0 < buffer <= self.rl.max_response_tokens:
            raise ConfigError(f"rl.overlong_buffer {buffer} must be in "
                              f"(0, rl.max_response_tokens={self.rl.max_response_tokens}]")
        if self.rl.dynamic_sampling_max_rounds < 1:
            raise ConfigError(f"rl.dynamic_sampling_max_rounds must be at least 1, "
                              f"got {self.rl.dynamic_sampling_max_rounds}")
        if self.rl.eval_interval < 0:
            raise ConfigError(f"rl.eval_interval must be >= 0, got {self.rl.eval_interval}")
        if self.rl.eval_interval and not self.rl.eval_datasets:
            raise ConfigError("rl.eval_interval is set but rl.eval_datasets is empty")
        if self.rl.eval_samples < 1:
            raise ConfigError(f"rl.eval_samples must be at least 1, got {self.rl.eval_samples}")
        if self.rl.routing_replay and self.model.recompute and self.parallel.pp > 1:
            # recomputation reruns a router in the backward pass, when under 1F1B another
            # microbatch's experts are set: megatron's REPLAY_BACKWARD bookkeeping is not wired in
            raise ConfigError("rl.routing_replay with model.recompute needs parallel.pp=1")
        if self.train.stage not in FREEZE_POLICIES:
            raise ConfigError(f"train.stage {self.train.stage!r} is not one of {sorted(FREEZE_POLICIES)}")
        if self.train.steps is None:
            raise ConfigError("train.steps is required for RLVR (one step = one rollout + update)")
        validate_rl_settings(self.rl)
        return self


def validate_rl_settings(rl: RLConfig) -> None:
    """Every ``rl.*`` value in its range and every reward resolvable, so a bad setting is an
    error naming its key before the model is built or Ray starts (issue 27)."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"rl.{key} must be {what}, got {getattr(rl, key)!r}")

    need(rl.prompts_per_rollout >= 1, "prompts_per_rollout", "at least 1")
    need(rl.temperature > 0, "temperature", "> 0 (the rollouts sample)")
    need(rl.max_response_tokens >= 1, "max_response_tokens", "at least 1")
    need(0 <= rl.clip_low < 1, "clip_low", "in [0, 1)")
    need(rl.clip_high >= 0, "clip_high", ">= 0")
    need(rl.kl_beta >= 0, "kl_beta", ">= 0")
    need(rl.tis_cap > 0, "tis_cap", "> 0")
    need(rl.num_workers >= 1, "num_workers", "at least 1 (the rollout workers)")
    need(rl.cpus_per_worker > 0, "cpus_per_worker", "> 0")
    need(rl.gpus_per_worker >= 0, "gpus_per_worker", ">= 0")
    need(rl.threads_per_worker >= 1, "threads_per_worker", "at least 1")
    need(rl.timeout_s > 0, "timeout_s", "> 0 (seconds)")
    need(rl.sync_backend in ("auto", "nccl", "gloo"), "sync_backend", "auto, nccl or gloo")
    need(rl.sync_backend != "nccl" or rl.gpus_per_worker > 0, "sync_backend",
         "auto or gloo while rl.gpus_per_worker is 0 (NCCL needs the workers on GPUs)")
    need(rl.sync_backend != "nccl" or platform.has_gpu(), "sync_backend",
         "auto or gloo on a trainer without a GPU (NCCL needs one)")
    need(0 <= rl.sync_port <= 65535, "sync_port", "a port number, or 0 for any free one")
    from megatron_bar.rl.rewards import get_reward_fn

    for i, d in enumerate(rl.datasets):
        if not d.weight >= 0:
            raise ConfigError(f"rl.datasets[{i}].weight must be >= 0, got {d.weight!r}")
        try:
            get_reward_fn(d.reward)
        except ValueError as e:
            raise ConfigError(f"rl.datasets[{i}].reward: {e}") from None
    if sum(d.weight for d in rl.datasets) <= 0:
        raise ConfigError("rl.datasets: the weights must have a positive sum")


# -- prompts ------------------------------------------------------------------------------


@dataclass
class Prompt:
    record: dict
    tokens: list[int]
    reward: str


def read_prompts(path: str | Path, reward: str, template: ChatTemplate, max_bad_lines: int) -> list[Prompt]:
    """RL prompts: JSONL with ``messages`` (ending with a user turn) or ``prompt`` (text)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: RL prompt file not found")
    prompts, bad = [], 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "messages" in record:
                messages = [Message(m["role"], m["content"]) for m in record["messages"]]
            else:
                messages = [Message("user", record["prompt"])]
            if any(m.role not in ROLES for m in messages):
                raise ValueError("unknown role")
            prompts.append(Prompt(record, template.encode_prompt(messages), reward))
        except (ValueError, KeyError, TypeError) as e:
            bad += 1
            log.warning("%s:%d: skipped malformed prompt (%s)", path, n, e)
            if bad > max_bad_lines:
                raise DataError(f"{path}:{n}: malformed prompt ({e}); more than "
                                f"data.max_bad_lines={max_bad_lines} bad lines") from None
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def sample_prompts(pools: list[list[Prompt]], weights: list[float], count: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    total = sum(weights)
    return [rng.choice(pools[_pick(rng, weights, total)]) for _ in range(count)]


def _pick(rng, weights, total):
    x, acc = rng.random() * total, 0.0
    for i, w in enumerate(weights):
        acc += w
        if x < acc:
            return i
    return len(weights) - 1


# -- rollouts -> training samples ---------------------------------------------------------


@dataclass
class Rollout:
    prompt: list[int]
    completion: list[int]
    rollout_logprobs: list[float]
    reward: float
    advantage: float = 0.0
    truncated: bool = False  # stopped at max_response_tokens without EOS
    in_loss: bool = True  # False: rl.overlong=mask took it out
    routing: torch.Tensor | None = None  # the rollout's experts [layers, positions, k] (routing replay)


def score(rollouts_raw: list[dict], prompts: list[Prompt], tokenizer, reward_fns,
          pool=None) -> tuple[list[Rollout], int]:
    """Rewards of the rollouts, in ``pool`` (a :class:`~megatron_bar.rl.rewards.RewardPool`;
    None: in this process), and how many raised."""
    from megatron_bar.rl.rewards import RewardPool

    jobs = []
    for r in rollouts_raw:
        p = prompts[r["prompt_index"]]
        # A padded vocabulary's unused rows can be sampled too; like a serving detokenizer,
        # they read as no text.
        text = tokenizer.decode([t for t in r["tokens"] if t != tokenizer.eos_id and t < tokenizer.vocab_size],
                                skip_special_tokens=False)
        jobs.append((reward_fns[p.reward], p.record, text))
    scored = (pool or RewardPool(0)).score(jobs)
    rollouts = [Rollout(prompts[r["prompt_index"]].tokens, r["tokens"], r["logprobs"], value,
                        truncated=r.get("truncated", False), routing=r.get("routing"))
                for r, (value, _) in zip(rollouts_raw, scored)]
    return rollouts, sum(error is not None for _, error in scored)


def to_microbatches(rollouts: list[Rollout], length: int, micro_batch_size: int, pad_id: int,
                    full: bool = False, top_k: int = 1) -> list[Microbatch]:
    """prompt + completion, right-padded to ``length``; loss on the completion's tokens.

    Extra fields ride along on each Microbatch: ``advantages`` [b], ``rollout_logprobs``
    [b, length] aligned with the label positions, and ``routing`` [layers, length, b, k]
    when the rollouts carry the experts they were generated with.

    ``full``: a short last microbatch is filled up to ``micro_batch_size`` with rows
    that carry no loss. Under pipeline parallelism megatron sends activations of one fixed
    shape between stages, so every microbatch must have the same size.
    """
    out = []
    for i in range(0, len(rollouts), micro_batch_size):
        chunk = rollouts[i : i + micro_batch_size]
        if full and len(chunk) < micro_batch_size:
            filler = dataclasses.replace(chunk[0], completion=[], rollout_logprobs=[], advantage=0.0,
                                         routing=None if chunk[0].routing is None else chunk[0].routing[:, :0])
            chunk = chunk + [filler] * (micro_batch_size - len(chunk))
        tokens = torch.full((len(chunk), length + 1), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), length)
        rollout_lp = torch.zeros(len(chunk), length)
        for b, r in enumerate(chunk):
            seq = (r.prompt + r.completion)[: length + 1]
            tokens[b, : len(seq)] = torch.tensor(seq)
            start = len(r.prompt) - 1  # label position of the first completion token
            end = min(start + len(r.completion), length)
            mask[b, start:end] = 1.0
            rollout_lp[b, start:end] = torch.tensor(r.rollout_logprobs[: end - start])
        mb = Microbatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask)
        mb.advantages = torch.tensor([r.advantage for r in chunk])
        mb.rollout_logprobs = rollout_lp
        if chunk[0].routing is not None:
            mb.routing = stack_routing([r.routing for r in chunk], length, top_k)
        out.append(mb)
    return out


def collect_rollouts(generate, score_fn, rl: "RLConfig", seed: int) -> tuple[list[Rollout], dict]:
    """One step's training samples and their metrics (rank 0).

    ``generate(seed)`` samples prompts and runs one round of the fleet with that seed and
    returns ``(raw, prompts)``; ``score_fn(raw, prompts)`` turns it into ``(rollouts, errors)``.
    Each round: overlong handling (``rl.overlong``), advantages (``rl.advantage``), then
    :func:`dynamic_sampling` keeps the groups that carry signal - refilling with new prompts
    up to ``rl.dynamic_sampling_max_rounds`` rounds when ``rl.dynamic_sampling`` is on.
    """
    group = rl.samples_per_prompt
    buffer = rl.overlong_buffer or max(1, rl.max_response_tokens // 4)
    seen: dict[str, list] = {"reward": [], "length": [], "truncated": [], "entropy": []}
    totals = {"errors": 0, "t_gen": 0.0, "t_score": 0.0}

    def one_round(i: int):
        # round 0 uses the step's seed, so that without refills a run is what it always was
        round_seed = seed + 1_000_003 * i
        t0 = time.perf_counter()
        raw, prompts = generate(round_seed)
        t1 = time.perf_counter()
        rollouts, errors = score_fn(raw, prompts)
        totals["t_gen"] += t1 - t0
        totals["t_score"] += time.perf_counter() - t1
        totals["errors"] += errors
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float)
        lengths = torch.tensor([len(r.completion) for r in rollouts])
        truncated = torch.tensor([r.truncated for r in rollouts], dtype=torch.bool)
        shaped, in_loss = overlong_rewards(rewards, lengths, truncated, rl.overlong,
                                           rl.max_response_tokens, buffer, rl.overlong_penalty)
        advantages = group_advantages(shaped, group, rl.advantage)
        for r, a, k in zip(rollouts, advantages.tolist(), in_loss.tolist()):
            r.advantage, r.in_loss = a, k
        seen["reward"] += rewards.tolist()
        seen["length"] += lengths.tolist()
        seen["truncated"] += truncated.tolist()
        seen["entropy"] += [(x.get("entropy_sum", 0.0), len(x["tokens"])) for x in raw]
        return rollouts, shaped

    rounds = rl.dynamic_sampling_max_rounds if rl.dynamic_sampling else 1
    batch = dynamic_sampling(one_round, rl.prompts_per_rollout, group, rounds)
    rewards = torch.tensor(seen["reward"])
    _, uniform = drop_uniform_groups(batch.rewards, group)
    entropy_tokens = sum(n for _, n in seen["entropy"])
    stats = {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "reward_p10": rewards.quantile(0.1).item(),
        "reward_p50": rewards.quantile(0.5).item(),
        "reward_p90": rewards.quantile(0.9).item(),
        "reward_errors": totals["errors"],
        "response_length": sum(seen["length"]) / len(seen["length"]),
        "overlong_share": sum(seen["truncated"]) / len(seen["truncated"]),
        "entropy": sum(e for e, _ in seen["entropy"]) / max(entropy_tokens, 1),
        "groups_dropped_share": uniform / batch.generated_groups,
        "groups_trained": batch.kept_groups,
        "dynamic_sampling_rounds": batch.rounds,
        "dynamic_sampling_refills": batch.rounds - 1,
        "time_generation_s": totals["t_gen"],
        "time_reward_s": totals["t_score"],
    }
    return [r for r in batch.samples if r.in_loss], stats


def evaluate(fleet, pools: dict[str, list[Prompt]], score_fn, rl: "RLConfig", eos_id: int, pad_id: int,
             seed: int) -> dict[str, float]:
    """Held-out accuracy of the current policy (rank 0), per eval dataset: the mean reward
    of greedy answers (``greedy``), the share of them scoring full marks (``greedy_acc``),
    and pass@k with ``k = rl.eval_samples`` answers at ``rl.temperature`` (an answer passes
    with reward >= 1)."""
    out = {}
    for name, pool in pools.items():
        tokens = [p.tokens for p in pool]
        greedy, _ = score_fn(fleet.generate(tokens, 1, 0.0, rl.max_response_tokens, eos_id, pad_id, seed), pool)
        rewards = [r.reward for r in greedy]
        out[f"eval/{name}/greedy"] = sum(rewards) / len(rewards)
        out[f"eval/{name}/greedy_acc"] = sum(r >= 1.0 for r in rewards) / len(rewards)
        k = rl.eval_samples
        raw = fleet.generate(tokens, k, rl.temperature, rl.max_response_tokens, eos_id, pad_id, seed + 1)
        sampled, _ = score_fn(raw, pool)
        correct = [0] * len(pool)
        for x, r in zip(raw, sampled):
            correct[x["prompt_index"]] += r.reward >= 1.0
        out[f"eval/{name}/pass@{k}"] = sum(pass_at_k(k, c, k) for c in correct) / len(correct)
    return out


def _eval_names(datasets: list[RLDatasetConfig]) -> list[str]:
    names = []
    for d in datasets:
        name, n = Path(d.path).stem, 2
        while name in names:
            name, n = f"{Path(d.path).stem}_{n}", n + 1
        names.append(name)
    return names


# -- the loop -----------------------------------------------------------------------------


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_rl(cfg: RLTrainConfig) -> dict:
    # Installed before startup: SIGTERM / SIGUSR1 (Slurm's warning, preemption) become a
    # checkpoint after the current step and exit code 75, which the Slurm script requeues.
    with Preemption() as preempt:
        return _train_rl(cfg, preempt)


def _train_rl(cfg: RLTrainConfig, preempt: Preemption) -> dict:
    from megatron_bar.rl.rewards import get_reward_fn

    cfg.validate()
    rl = cfg.rl
    if any(d.reward == "code" for d in rl.datasets):
        from megatron_bar.rl.sandbox import probe_isolation

        # a machine that cannot isolate code fails here, before any work
        log.info("code sandbox: %s", probe_isolation(rl.sandbox).describe())
    platform.initialize(platform.ParallelLayout(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep),
                        seed=cfg.train.seed)
    rank0 = dist.get_rank() == 0
    out_dir = Path(cfg.train.output_dir)
    resume_from = ckpt.latest_checkpoint(cfg.checkpoint_dir)

    model_cfg = ModelConfig.load(cfg.model.load)
    if cfg.model.moe_topk is not None:
        model_cfg = model_cfg.with_(moe_topk=cfg.model.moe_topk)
    # A tokenizer that does not fit the model's rows is refused before any prompt is read.
    tokenizer = stage_tokenizer(cfg.model.load, model_cfg.vocab_size, cfg.data.tokenizer).tokenizer
    template = ChatTemplate(tokenizer)
    pools = [read_prompts(d.path, d.reward, template, cfg.data.max_bad_lines) for d in rl.datasets]
    eval_pools = [read_prompts(d.path, d.reward, template, cfg.data.max_bad_lines) for d in rl.eval_datasets]
    reward_fns = {d.reward: get_reward_fn(d.reward) for d in rl.datasets + rl.eval_datasets}
    max_prompt = max(len(p.tokens) for pool in pools for p in pool)
    tp = cfg.parallel.tp
    length = int(math.ceil((max_prompt + rl.max_response_tokens) / tp) * tp)

    if rl.routing_replay and not model_cfg.is_moe:
        raise ConfigError(f"rl.routing_replay: {cfg.model.load} is a dense model, without a router")
    model = build_model(model_cfg, calculate_per_token_loss=True, recompute=cfg.model.recompute,
                        moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff,
                        **({"moe_enable_routing_replay": True} if rl.routing_replay else {}))
    if resume_from is not None:
        check_same_architecture(model_cfg, ModelConfig.load(resume_from), str(resume_from))
    else:
        load_weights(model, model_cfg, cfg.model.load)
    total_steps = cfg.train.steps
    run = setup_training(cfg, model, model_cfg, total_steps, resume_from)
    ddp, optimizer, scheduler, frozen_rows, step = (
        run.ddp, run.optimizer, run.scheduler, run.frozen_rows, run.step)
    ref_model = None
    if rl.kl_beta > 0:
        ref_model = build_model(model_cfg, perform_initialization=False)
        load_weights(ref_model, model_cfg, cfg.model.load)
        ref_model.eval()

    fleet = reward_pool = None
    engine = check_engine(rl.engine)
    if rank0:
        from megatron_bar.rl.fleet import FleetConfig, RolloutFleet
        from megatron_bar.rl.rewards import RewardPool

        reward_pool = RewardPool(rl.reward_workers, rl.sandbox)

        fleet = RolloutFleet(
            engine.worker_config(model_cfg),
            FleetConfig(engine=rl.engine, num_workers=rl.num_workers, cpus_per_worker=rl.cpus_per_worker,
                        gpus_per_worker=rl.gpus_per_worker, threads_per_worker=rl.threads_per_worker,
                        ray_address=rl.ray_address, timeout_s=rl.timeout_s,
                        sync_bucket_mb=rl.sync_bucket_mb, sync_backend=rl.sync_backend,
                        sync_port=rl.sync_port),
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        # which process is which rollout worker, for an operator (Ray restarts change it)
        (out_dir / "rollout_workers.json").write_text(json.dumps({"pids": fleet.worker_pids()}))
    gather_weights = engine.gather_weights()  # in the layout the engine loads

    def push(version) -> tuple[float, int]:
        """Seconds the sync took and bytes it sent (rank 0; 0 elsewhere)."""
        t0 = time.perf_counter()
        state = gather_weights(model, model_cfg)
        if rank0:
            fleet.push_weights(state, version)
        return time.perf_counter() - t0, fleet.last_sync["bytes"] if rank0 else 0

    push(step)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mbs = cfg.train.micro_batch_size
    replay = RoutingReplay(model) if rl.routing_replay else None

    def generate_round(seed):
        prompts = sample_prompts(pools, [d.weight for d in rl.datasets], rl.prompts_per_rollout, seed=seed)
        raw = fleet.generate([p.tokens for p in prompts], rl.samples_per_prompt, rl.temperature,
                             rl.max_response_tokens, tokenizer.eos_id, tokenizer.pad_id, seed=seed,
                             record_routing=rl.routing_replay)
        return raw, prompts

    def score_fn(raw, prompts):
        return score(raw, prompts, tokenizer, reward_fns, reward_pool)

    def run_eval(at_step):  # on rank 0 only: the fleet is there
        if not rank0:
            return {}
        return evaluate(fleet, dict(zip(_eval_names(rl.eval_datasets), eval_pools)), score_fn, rl,
                        tokenizer.eos_id, tokenizer.pad_id, seed=cfg.train.seed * 100003 + 7 * at_step + 5)

    def collect(at_step):  # rank 0; the prompts and seeds depend on the step alone
        rollouts, stats = collect_rollouts(generate_round, score_fn, rl, seed=cfg.train.seed * 100003 + at_step)
        stats["worker_restarts"] = fleet.restarts_seen
        stats["rollout_policy_version"] = fleet.version
        return rollouts, stats

    # rl.async_steps 1: a thread on rank 0 collects step s+1's rollouts (generation on the
    # fleet, scoring here) while the ranks train on step s's. The weights of s+1 are pushed
    # once that collection is done, so a step's rollout comes from one policy: the one
    # before the previous update. After a resume the first step is collected on-policy.
    ahead = ThreadPoolExecutor(1, thread_name_prefix="rollout-ahead") if rank0 and rl.async_steps else None
    pending: Future | None = None
    metrics = MetricsLogger(out_dir, total_steps, start_step=step, enabled=rank0)
    try:
        if rl.eval_interval and step == 0:  # the starting policy, the curve's first point
            metrics.log(0, run_eval(0), tokens=0, print_line=False)
        while step < total_steps:
            t_step = time.perf_counter()
            rollouts, stats = None, {}
            if rank0:
                rollouts, stats = collect(step) if pending is None else pending.result()
                pending = ahead.submit(collect, step + 1) if ahead and step + 1 < total_steps else None
            rollouts, stats = _broadcast((rollouts, stats))

            t1 = time.perf_counter()
            update = {}
            if rollouts:
                update = _update(ddp, model, optimizer, frozen_rows, ref_model, rollouts, model_cfg, rl,
                                 length, mbs, dp_rank, dp_size, tokenizer.pad_id, replay)
            scheduler.step(increment=1)
            t_train = time.perf_counter() - t1
            step += 1
            if pending is not None:  # the next rollout is generated by the weights it started with
                wait([pending])
            t_sync, sync_bytes = push(step)
            if rl.eval_interval and (step % rl.eval_interval == 0 or step == total_steps):
                stats.update(run_eval(step))
            n_tokens = sum(len(r.prompt) + len(r.completion) for r in rollouts)
            metrics.log(step, {**stats, **update, "loss": update.get("loss", 0.0),
                               "lr": optimizer.param_groups[0]["lr"] if optimizer.param_groups else 0.0,
                               "time_training_s": t_train, "time_weight_sync_s": t_sync,
                               "weight_sync_bytes": sync_bytes, "time_step_s": time.perf_counter() - t_step,
                               "rollout_policy_lag": step - 1 - stats["rollout_policy_version"],
                               "samples_trained": len(rollouts)},
                        tokens=n_tokens, print_line=False)
            if rank0 and (step % cfg.train.log_interval == 0 or step == total_steps):
                print(f"step {step}/{total_steps} | reward {stats['reward_mean']:.3f} | "
                      f"len {stats['response_length']:.1f} | dropped {stats['groups_dropped_share']:.2f} | "
                      f"rounds {stats['dynamic_sampling_rounds']} | overlong {stats['overlong_share']:.2f} | "
                      f"entropy {stats['entropy']:.2f} | "
                      f"clip {update.get('clip_frac', 0):.3f} | gen {stats['time_generation_s']:.1f}s "
                      f"score {stats['time_reward_s']:.1f}s "
                      f"train {t_train:.1f}s sync {t_sync:.1f}s", flush=True)

            def save(s):
                return ckpt.save_checkpoint(cfg.checkpoint_dir, s, model, optimizer,
                                            {"step": s, "scheduler": scheduler.state_dict(), "stage": "rlvr"},
                                            model_cfg, tokenizer if rank0 else None, cfg.checkpoint.keep_last)

            # saves at the interval and the end; after a preemption signal, saves and
            # raises Preempted (exit 75): the finally below still shuts the fleet down
            preempt.end_of_step(step, total_steps, cfg.checkpoint.interval, save)
    finally:
        if ahead is not None:
            ahead.shutdown(wait=True, cancel_futures=True)
        metrics.close()
        if reward_pool is not None:
            reward_pool.close()
        if fleet is not None:
            fleet.shutdown()
    if rank0:
        plot_reward_curve(out_dir / "metrics.jsonl", out_dir / "reward.png")
    dist.barrier()
    return {"steps": step, "output_dir": out_dir}


def _rank_share(rollouts: list[Rollout], dp_rank: int, dp_size: int) -> list[Rollout]:
    share = rollouts[dp_rank::dp_size]
    if not share:  # fewer samples than ranks: a zero-weight sample keeps the collectives in step
        share = [dataclasses.replace(rollouts[0], advantage=0.0, completion=rollouts[0].completion[:1],
                                     rollout_logprobs=rollouts[0].rollout_logprobs[:1])]
    return share


def _update(ddp, model, optimizer, frozen_rows, ref_model, rollouts, model_cfg, rl, length, mbs,
            dp_rank, dp_size, pad_id, replay: RoutingReplay | None = None) -> dict:
    """``rl.minibatches`` optimizer steps on the rollouts, each on this rank's share of one
    minibatch. The old policy (the ratio's denominator) is the trainer's policy before the
    first of them, as in PPO: later minibatches see ratios away from 1, and clip.

    With ``replay`` every forward pass of the policy (old log-probs and updates) routes each
    token to the experts the rollout chose; the KL reference routes by its own router."""
    n_mb = min(rl.minibatches, len(rollouts))
    bounds = [round(i * len(rollouts) / n_mb) for i in range(n_mb + 1)]
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    minibatches = [to_microbatches(_rank_share(rollouts[a:b], dp_rank, dp_size), length, mbs, pad_id,
                                   full=pipelined, top_k=model_cfg.moe_topk if model_cfg.is_moe else 1)
                   for a, b in zip(bounds, bounds[1:])]
    vocab = model_cfg.vocab_size
    before_forward = None if replay is None else (lambda mb: replay.set(mb.routing))

    every = [mb for group in minibatches for mb in group]
    # The old policy (the ratio's denominator) is the trainer's own log-probs before the
    # update. On-policy with one update (the rollout came from these very weights, and no
    # earlier minibatch moved them) they are the update's own log-probs, detached: the
    # separate forward pass over the whole rollout is skipped and the loss takes them
    # from its own forward (ratio 1, the same loss and gradient).
    on_policy = n_mb == 1 and rl.async_steps == 0
    if not on_policy:
        # (vocab-parallel: from each rank's shard of the logits, never a full vocabulary row)
        for mb, logprobs in zip(every, forward_logprobs(ddp, every, vocab, rl.temperature,
                                                        before_forward=before_forward)):
            mb.old_logprobs = logprobs
    if ref_model is not None:
        for mb, logprobs in zip(every, forward_logprobs(ref_model, every, vocab, rl.temperature)):
            mb.ref_logprobs = logprobs

    collected: list[dict] = []

    def loss_fn(logits, mb, out):
        device = logits.device
        logprobs = token_logprobs(logits, mb.labels.to(device), vocab, rl.temperature)
        if on_policy:
            mb.old_logprobs = logprobs.detach()
        mask = mb.loss_mask.to(device)
        loss, m = policy_loss(
            logprobs, mb.old_logprobs.to(device), mb.advantages.to(device), mask,
            clip_low=rl.clip_low, clip_high=rl.clip_high, loss_agg=rl.loss_agg,
            rollout_logprobs=mb.rollout_logprobs.to(device), tis_cap=rl.tis_cap,
            ref_logprobs=getattr(mb, "ref_logprobs", None), kl_beta=rl.kl_beta,
            clip_ratio_c=rl.clip_ratio_c,
        )
        # megatron sums what each microbatch returns and divides by the summed count over
        # all microbatches and data-parallel ranks: tokens for token-mean, sequences for
        # seq-mean-token-mean - so each update's loss is that mean over its minibatch.
        count = mask.sum() if rl.loss_agg == "token-mean" else (mask.sum(1) > 0).sum().float()
        loss_sum = loss * count
        out.losses.append(loss_sum.detach())
        out.tokens.append(count.detach())
        collected.append({**m, "count": count.item()})
        return loss_sum, count.to(torch.int), {"loss_sum": loss_sum.detach()}

    losses, grad_norms = [], []
    for group in minibatches:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(ddp, group, vocab, loss_fn=loss_fn, before_forward=before_forward)
        frozen_rows.mask_gradients()
        _, grad_norm, _ = optimizer.step()
        frozen_rows.restore()
        totals = torch.tensor([sum(x.item() for x in out.losses), sum(x.item() for x in out.tokens)],
                              dtype=torch.float64, device=platform.device())
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        losses.append((totals[0] / totals[1].clamp(min=1)).item())
        grad_norms.append(float(grad_norm or 0.0))
    if replay is not None:
        replay.clear()
    gap = _rollout_gap(every)
    weight = sum(c["count"] for c in collected) or 1.0
    avg = {k: sum(c[k] * c["count"] for c in collected) / weight
           for k in ("clip_frac", "clip_frac_dual", "ratio_mean") if collected and k in collected[0]}
    if collected and "kl_mean" in collected[0]:
        avg["kl"] = sum(c["kl_mean"] * c["count"] for c in collected) / weight
    result = {"loss": sum(losses) / len(losses), "grad_norm": max(grad_norms), "updates": len(minibatches),
              "rollout_logprob_gap": gap, **avg}
    return from_last_stage(result)


def _rollout_gap(microbatches: list[Microbatch]) -> float:
    """Mean |trainer - rollout| log-prob over the step's loss tokens on every data-parallel
    rank: the mismatch truncated importance sampling corrects and routing replay narrows
    (meaningful on the last pipeline stage, which has the trainer's log-probs)."""
    totals = torch.zeros(2, dtype=torch.float64, device=platform.device())
    for mb in microbatches:
        if hasattr(mb, "old_logprobs"):
            mask = mb.loss_mask.to(mb.old_logprobs.device).bool()
            diff = (mb.old_logprobs - mb.rollout_logprobs.to(mb.old_logprobs.device)).abs()
            totals[0] += diff[mask].double().sum().to(totals.device)
            totals[1] += mask.sum().to(totals.device)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return (totals[0] / totals[1].clamp(min=1)).item()


def from_last_stage(values: dict) -> dict:
    """``values`` as the last pipeline stage computed them, on every stage.

    Only the last stage computes the loss and sees the log-probs, so the loss, clip
    fractions and KL exist there alone; rank 0, which logs, is on the first stage. With one
    stage this returns ``values`` unchanged."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return values
    box = [values]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def plot_reward_curve(metrics_path: Path, out_png: Path) -> Path:
    """The training reward per rollout (mean, p10-p90) with the held-out evaluation beside it
    (greedy reward and pass@k per eval dataset, when ``rl.eval_interval`` is set), and the
    policy's token entropy below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "reward_mean" in r]
    steps = [r["step"] for r in train]
    fig, (ax, ax_h) = plt.subplots(2, 1, figsize=(6, 5.5), dpi=120, sharex=True,
                                   gridspec_kw={"height_ratios": [2, 1]})
    ax.plot(steps, [r["reward_mean"] for r in train], label="train reward", lw=1.8)
    ax.fill_between(steps, [r["reward_p10"] for r in train], [r["reward_p90"] for r in train],
                    alpha=0.2, label="train p10-p90")
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and not k.endswith("_acc")})
    for key in eval_keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, lw=1.2,
                ls="--", label=key.removeprefix("eval/"))
    ax.set_ylabel("reward")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("RLVR: reward per rollout and held-out evaluation")
    ax_h.plot(steps, [r.get("entropy", float("nan")) for r in train], color="tab:purple", lw=1.5)
    ax_h.set_xlabel("step")
    ax_h.set_ylabel("token entropy (nats)")
    ax_h.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
