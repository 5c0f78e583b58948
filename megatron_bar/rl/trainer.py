"""RLVR with GRPO: megatron-core trains, a Ray fleet of rollout workers generates.

    python -m megatron_bar.rl CONFIG.yaml [key=value ...]                  # one process
    torchrun --nproc-per-node 8 -m megatron_bar.rl CONFIG.yaml rl.ray_address=HEAD:6379

Each step: rank 0 samples ``rl.prompts_per_rollout`` prompts, the fleet answers each
``rl.samples_per_prompt`` times, the verifiers score the answers, GRPO turns the scores into
group-relative advantages (groups whose rewards are all equal carry no signal and are
dropped), the training ranks compute their own log-probs of the rollouts and take
``rl.minibatches`` optimizer steps (one by default) on the clipped policy loss (with
truncated importance sampling against the rollout engine's log-probs), and the new
weights go back to every worker. The
``rlvr`` freeze policy applies: every shared parameter trains, the anchor expert stays.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bar import platform
from megatron_bar.bar.freeze import FREEZE_POLICIES
from megatron_bar.convert.hf_io import hf_config_from_model_config
from megatron_bar.data import ChatTemplate, Message, add_chat_special_tokens, load_tokenizer
from megatron_bar.data.chat import DataError, ROLES
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import check_same_architecture, load_weights
from megatron_bar.model.config import ModelConfig
from megatron_bar.rl.grpo import drop_uniform_groups, group_advantages, policy_loss
from megatron_bar.rl.sandbox import SandboxConfig
from megatron_bar.train import checkpoint as ckpt
from megatron_bar.train.config import ConfigError, TrainConfig, config_to_dict
from megatron_bar.train.engine import Microbatch, forward_backward
from megatron_bar.train.metrics import MetricsLogger, read_metrics
from megatron_bar.train.preempt import Preemption
from megatron_bar.train.trainer import setup_training

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
    advantage_scale: str = "group"  # group: (r - mean) / (std + eps) | none: centred (Dr. GRPO)
    clip_low: float = 0.2
    clip_high: float = 0.272
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean
    kl_beta: float = 0.0  # k3 KL to the starting policy; 0 = off (the recipe)
    tis_cap: float = 2.0  # truncated importance sampling: rollout vs trainer log-probs
    minibatches: int = 1  # optimizer steps per rollout (open-instruct num_mini_batches; 1 = on-policy)
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    ray_address: str | None = None
    timeout_s: float = 600.0
    reward_workers: int = 2  # processes scoring rollouts (code rewards' programs run side by side)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


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
        if self.rl.loss_agg not in ("token-mean", "seq-mean-token-mean"):
            raise ConfigError(f"rl.loss_agg {self.rl.loss_agg!r}: token-mean or seq-mean-token-mean")
        if self.rl.advantage_scale not in ("group", "none"):
            raise ConfigError(f"rl.advantage_scale {self.rl.advantage_scale!r}: group or none")
        if self.train.stage not in FREEZE_POLICIES:
            raise ConfigError(f"train.stage {self.train.stage!r} is not one of {sorted(FREEZE_POLICIES)}")
        if self.train.steps is None:
            raise ConfigError("train.steps is required for RLVR (one step = one rollout + update)")
        return self


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


def score(rollouts_raw: list[dict], prompts: list[Prompt], tokenizer, reward_fns,
          pool=None) -> tuple[list[Rollout], int]:
    """Rewards of the rollouts, in ``pool`` (a :class:`~megatron_bar.rl.rewards.RewardPool`;
    None: in this process), and how many raised."""
    from megatron_bar.rl.rewards import RewardPool

    jobs = []
    for r in rollouts_raw:
        p = prompts[r["prompt_index"]]
        text = tokenizer.decode([t for t in r["tokens"] if t != tokenizer.eos_id], skip_special_tokens=False)
        jobs.append((reward_fns[p.reward], p.record, text))
    scored = (pool or RewardPool(0)).score(jobs)
    rollouts = [Rollout(prompts[r["prompt_index"]].tokens, r["tokens"], r["logprobs"], value)
                for r, (value, _) in zip(rollouts_raw, scored)]
    return rollouts, sum(error is not None for _, error in scored)


def to_microbatches(rollouts: list[Rollout], length: int, micro_batch_size: int, pad_id: int) -> list[Microbatch]:
    """prompt + completion, right-padded to ``length``; loss on the completion's tokens.

    Extra fields ride along on each Microbatch: ``advantages`` [b], ``rollout_logprobs``
    [b, length] aligned with the label positions.
    """
    out = []
    for i in range(0, len(rollouts), micro_batch_size):
        chunk = rollouts[i : i + micro_batch_size]
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
        out.append(mb)
    return out


def _token_logprobs(logits, labels, vocab_size, temperature):
    logits = logits[..., :vocab_size].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


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
    tokenizer = load_tokenizer(cfg.data.tokenizer or str(Path(cfg.model.load) / "tokenizer"))
    add_chat_special_tokens(tokenizer)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model {model_cfg.vocab_size}")
    template = ChatTemplate(tokenizer)
    pools = [read_prompts(d.path, d.reward, template, cfg.data.max_bad_lines) for d in rl.datasets]
    reward_fns = {d.reward: get_reward_fn(d.reward) for d in rl.datasets}
    max_prompt = max(len(p.tokens) for pool in pools for p in pool)
    tp = cfg.parallel.tp
    length = int(math.ceil((max_prompt + rl.max_response_tokens) / tp) * tp)

    model = build_model(model_cfg, calculate_per_token_loss=True, recompute=cfg.model.recompute,
                        moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff)
    if resume_from is not None:
        check_same_architecture(model_cfg, ModelConfig.load(resume_from), str(resume_from))
    else:
        load_weights(model, model_cfg, cfg.model.load)
    total_steps = cfg.train.steps
    run = setup_training(cfg, model, model_cfg, total_steps, resume_from)
    ddp, optimizer, scheduler, router_rows, step = (
        run.ddp, run.optimizer, run.scheduler, run.router_rows, run.step)
    ref_model = None
    if rl.kl_beta > 0:
        ref_model = build_model(model_cfg, perform_initialization=False)
        load_weights(ref_model, model_cfg, cfg.model.load)
        ref_model.eval()

    fleet = reward_pool = None
    if rank0:
        from megatron_bar.rl.fleet import FleetConfig, RolloutFleet
        from megatron_bar.rl.rewards import RewardPool

        reward_pool = RewardPool(rl.reward_workers, rl.sandbox)

        fleet = RolloutFleet(
            hf_config_from_model_config(model_cfg, torch.float32),
            FleetConfig(num_workers=rl.num_workers, cpus_per_worker=rl.cpus_per_worker,
                        gpus_per_worker=rl.gpus_per_worker, threads_per_worker=rl.threads_per_worker,
                        ray_address=rl.ray_address, timeout_s=rl.timeout_s),
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        # which process is which rollout worker, for an operator (Ray restarts change it)
        (out_dir / "rollout_workers.json").write_text(json.dumps({"pids": fleet.worker_pids()}))
    from megatron_bar.rl.weights import gather_hf_state_dict

    def push(version):
        t0 = time.perf_counter()
        state = gather_hf_state_dict(model, model_cfg)
        if rank0:
            fleet.push_weights(state, version)
        return time.perf_counter() - t0

    push(step)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mbs = cfg.train.micro_batch_size
    metrics = MetricsLogger(out_dir, total_steps, start_step=step, enabled=rank0)
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            rollouts, stats = None, {}
            if rank0:
                prompts = sample_prompts(pools, [d.weight for d in rl.datasets], rl.prompts_per_rollout,
                                         seed=cfg.train.seed * 100003 + step)
                raw = fleet.generate([p.tokens for p in prompts], rl.samples_per_prompt, rl.temperature,
                                     rl.max_response_tokens, tokenizer.eos_id, tokenizer.pad_id,
                                     seed=cfg.train.seed * 100003 + step)
                t_gen = time.perf_counter() - t0
                t_score = time.perf_counter()
                rollouts, reward_errors = score(raw, prompts, tokenizer, reward_fns, reward_pool)
                t_score = time.perf_counter() - t_score
                rewards = torch.tensor([r.reward for r in rollouts])
                adv = group_advantages(rewards, rl.samples_per_prompt, rl.advantage_scale)
                keep, dropped = drop_uniform_groups(rewards, rl.samples_per_prompt)
                for r, a in zip(rollouts, adv.tolist()):
                    r.advantage = a
                kept = [r for r, k in zip(rollouts, keep.tolist()) if k]
                lengths = torch.tensor([len(r.completion) for r in rollouts], dtype=torch.float)
                stats = {
                    "reward_mean": rewards.mean().item(),
                    "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
                    "reward_p10": rewards.quantile(0.1).item(),
                    "reward_p50": rewards.quantile(0.5).item(),
                    "reward_p90": rewards.quantile(0.9).item(),
                    "reward_errors": reward_errors,
                    "response_length": lengths.mean().item(),
                    "groups_dropped_share": dropped / rl.prompts_per_rollout,
                    "time_generation_s": t_gen,
                    "time_reward_s": t_score,
                    "worker_restarts": fleet.restarts_seen,
                }
                rollouts = kept
            rollouts, stats = _broadcast((rollouts, stats))

            t1 = time.perf_counter()
            update = {}
            if rollouts:
                update = _update(ddp, model, optimizer, router_rows, ref_model, rollouts, model_cfg, rl,
                                 length, mbs, dp_rank, dp_size, tokenizer.pad_id)
            scheduler.step(increment=1)
            t_train = time.perf_counter() - t1
            step += 1
            t_sync = push(step)
            n_tokens = sum(len(r.prompt) + len(r.completion) for r in rollouts)
            metrics.log(step, {**stats, **update, "loss": update.get("loss", 0.0),
                               "lr": optimizer.param_groups[0]["lr"] if optimizer.param_groups else 0.0,
                               "time_training_s": t_train, "time_weight_sync_s": t_sync,
                               "samples_trained": len(rollouts)},
                        tokens=n_tokens, print_line=False)
            if rank0 and (step % cfg.train.log_interval == 0 or step == total_steps):
                print(f"step {step}/{total_steps} | reward {stats['reward_mean']:.3f} | "
                      f"len {stats['response_length']:.1f} | dropped {stats['groups_dropped_share']:.2f} | "
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


def _update(ddp, model, optimizer, router_rows, ref_model, rollouts, model_cfg, rl, length, mbs,
            dp_rank, dp_size, pad_id) -> dict:
    """``rl.minibatches`` optimizer steps on the rollouts, each on this rank's share of one
    minibatch. The old policy (the ratio's denominator) is the trainer's policy before the
    first of them, as in PPO: later minibatches see ratios away from 1, and clip."""
    n_mb = min(rl.minibatches, len(rollouts))
    bounds = [round(i * len(rollouts) / n_mb) for i in range(n_mb + 1)]
    minibatches = [to_microbatches(_rank_share(rollouts[a:b], dp_rank, dp_size), length, mbs, pad_id)
                   for a, b in zip(bounds, bounds[1:])]
    vocab = model_cfg.vocab_size

    # The policy that generated: the trainer's own log-probs before the update.
    every = [mb for group in minibatches for mb in group]
    old = forward_backward(ddp, every, vocab, forward_only=True, keep_logits=True, loss_fn=_zero_loss)
    for mb, logits in zip(every, old.logits):
        mb.old_logprobs = _token_logprobs(logits, mb.labels, vocab, rl.temperature)
    if ref_model is not None:
        ref = forward_backward(ref_model, every, vocab, forward_only=True, keep_logits=True,
                               loss_fn=_zero_loss)
        for mb, logits in zip(every, ref.logits):
            mb.ref_logprobs = _token_logprobs(logits, mb.labels, vocab, rl.temperature)

    collected: list[dict] = []

    def loss_fn(logits, mb, out):
        device = logits.device
        logprobs = _token_logprobs(logits, mb.labels.to(device), vocab, rl.temperature)
        mask = mb.loss_mask.to(device)
        loss, m = policy_loss(
            logprobs, mb.old_logprobs.to(device), mb.advantages.to(device), mask,
            clip_low=rl.clip_low, clip_high=rl.clip_high, loss_agg=rl.loss_agg,
            rollout_logprobs=mb.rollout_logprobs.to(device), tis_cap=rl.tis_cap,
            ref_logprobs=getattr(mb, "ref_logprobs", None), kl_beta=rl.kl_beta,
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
        out = forward_backward(ddp, group, vocab, loss_fn=loss_fn)
        router_rows.mask_gradients()
        _, grad_norm, _ = optimizer.step()
        router_rows.restore()
        totals = torch.tensor([sum(x.item() for x in out.losses), sum(x.item() for x in out.tokens)],
                              dtype=torch.float64, device=platform.device())
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        losses.append((totals[0] / totals[1].clamp(min=1)).item())
        grad_norms.append(float(grad_norm or 0.0))
    weight = sum(c["count"] for c in collected) or 1.0
    avg = {k: sum(c[k] * c["count"] for c in collected) / weight
           for k in ("clip_frac", "ratio_mean") if collected and k in collected[0]}
    if collected and "kl_mean" in collected[0]:
        avg["kl"] = sum(c["kl_mean"] * c["count"] for c in collected) / weight
    return {"loss": sum(losses) / len(losses), "grad_norm": max(grad_norms), "updates": len(minibatches),
            **avg}


def _zero_loss(logits, mb, out):
    zero = logits.sum() * 0.0
    return zero, torch.tensor(1, dtype=torch.int), {}


def plot_reward_curve(metrics_path: Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, [r["reward_mean"] for r in rows], label="mean reward", lw=1.8)
    ax.fill_between(steps, [r["reward_p10"] for r in rows], [r["reward_p90"] for r in rows],
                    alpha=0.2, label="p10-p90")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    ax.set_title("RLVR: reward per rollout")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
