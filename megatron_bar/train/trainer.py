"""One trainer for every stage of every expert: midtrain, sft, rlvr updates and router.

    python -m megatron_bar.train CONFIG.yaml [key=value ...]          # one process
    torchrun --nproc-per-node 8 -m megatron_bar.train CONFIG.yaml     # TP/PP/EP/DP from config

A run starts from ``model.load`` (or, when ``<checkpoint dir>/latest`` exists, resumes
from it), applies the stage's freeze policy, and trains with megatron DDP and megatron's
optimizer. The loss is the token mean over the whole global batch, so runs at different
TP / PP / DP sizes follow the same curve.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_bar import platform
from megatron_bar.bar.freeze import (
    EXPERT_STAGES,
    FREEZE_POLICIES,
    SHARED_GROUPS,
    FrozenRows,
    apply_freeze_policy,
    format_freeze_table,
    freeze_counts,
)
from megatron_bar.bar.manifest import expert_names
from megatron_bar.bar.vocab import copy_with_grown_vocab, mean_init_rows
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import check_same_architecture, load_weights
from megatron_bar.model.config import ModelConfig
from megatron_bar.train import checkpoint as ckpt
from megatron_bar.train.config import TrainConfig, config_to_dict
from megatron_bar.train.data import build_training_data, steps_for
from megatron_bar.train.engine import forward_backward, make_optimizer, wrap_ddp
from megatron_bar.train.gpu_features import fp8_overrides, use_distributed_optimizer
from megatron_bar.train.metrics import MetricsLogger, check_metrics_file, plot_loss_curve
from megatron_bar.train.preempt import Preemption
from megatron_bar.train.vocab_fit import StageTokenizer, stage_tokenizer

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    final_checkpoint: Path
    losses: list[float]
    output_dir: Path


def _print0(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


def _is_logging_rank() -> bool:
    # The last rank is on the last pipeline stage, where the loss is known.
    return dist.get_rank() == dist.get_world_size() - 1


def _tokenizer_for(cfg: TrainConfig, rows: int) -> StageTokenizer:
    """The checkpoint's tokenizer, checked to fit its ``rows`` (before any data is read),
    with ``data.add_special_tokens`` added; the chat format adds no token."""
    fit = stage_tokenizer(cfg.model.load, rows, cfg.data.tokenizer, cfg.data.add_special_tokens)
    if fit.describe():
        _print0(fit.describe())
    return fit


def _model_config(cfg: TrainConfig, start: Path, fit: StageTokenizer) -> tuple[ModelConfig, ModelConfig]:
    """(config of the checkpoint we start from, config of the model we train)."""
    start_cfg = ModelConfig.load(start)
    if cfg.model.moe_topk is not None:
        start_cfg = start_cfg.with_(moe_topk=cfg.model.moe_topk)
    return start_cfg, start_cfg.with_(vocab_size=fit.model_vocab_size)


def _build(cfg: TrainConfig, model_cfg: ModelConfig):
    return build_model(
        model_cfg,
        calculate_per_token_loss=True,
        moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff,
        recompute=cfg.model.recompute,
        **fp8_overrides(cfg.model),
    )


def _initial_model(cfg: TrainConfig, start_cfg: ModelConfig, model_cfg: ModelConfig, fit: StageTokenizer):
    model = _build(cfg, model_cfg)
    if model_cfg.vocab_size == start_cfg.vocab_size:
        load_weights(model, start_cfg, cfg.model.load)
    else:
        # More new special tokens than unused rows: load at the old size, then grow.
        old = _build(cfg, start_cfg)
        load_weights(old, start_cfg, cfg.model.load)
        copy_with_grown_vocab(old, start_cfg, model, model_cfg)
    # The added tokens' rows (unused padding, or grown) start as the mean of the tokenizer's.
    mean_init_rows(model, model_cfg, fit.new_ids.start, fit.new_ids.stop)
    return model


def _scheduler(optimizer, cfg: TrainConfig, total_steps: int) -> OptimizerParamScheduler:
    o = cfg.optim
    style = {"cosine": "cosine", "constant": "constant", "linear": "linear"}[o.schedule]
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr if style != "constant" else o.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


def _shared_lr_scale(cfg: TrainConfig, groups: dict[str, str]):
    """``optim.shared_lr_scale`` as a name -> LR multiplier, or None where it does not apply."""
    scales = {g: cfg.optim.shared_lr_scale_by_group.get(g, cfg.optim.shared_lr_scale) for g in SHARED_GROUPS}
    if set(scales.values()) == {1.0} or cfg.train.stage not in EXPERT_STAGES:
        return None
    _print0("shared parameters train at " + ", ".join(f"{g} {s:g}" for g, s in scales.items()) + " x lr")
    return lambda name: scales.get(groups[name], 1.0)


@dataclass
class TrainingSetup:
    ddp: object
    optimizer: object
    scheduler: OptimizerParamScheduler
    frozen_rows: FrozenRows  # the anchor's router row, and the vocabulary rows a stage does not train
    step: int  # optimizer steps already done (0, or the resumed checkpoint's)


def setup_training(cfg: TrainConfig, model, model_cfg: ModelConfig, total_steps: int,
                   resume_from: Path | None, added_vocab_rows: range = range(0)) -> TrainingSetup:
    """Freeze policy (printed), DDP, optimizer, LR schedule, and - when resuming - their
    state from the checkpoint. Shared by the SFT-style trainer and the RLVR trainer.
    ``added_vocab_rows``: the ids of the tokens this stage added (``data.add_special_tokens``)."""
    policy = FREEZE_POLICIES[cfg.train.stage]
    groups = apply_freeze_policy(model, policy, model_cfg.num_experts)
    _print0(format_freeze_table(policy, freeze_counts(model, groups)))
    trained_vocab_rows = None
    if cfg.optim.train_only_added_vocab_rows:
        trained_vocab_rows = added_vocab_rows
        _print0(f"vocabulary rows: only those of the tokens this stage added "
                f"({added_vocab_rows.start}..{added_vocab_rows.stop - 1}) train" if added_vocab_rows else
                "vocabulary rows: this stage adds no token, so no embedding or LM head row trains")
    ddp = wrap_ddp(model, use_distributed_optimizer(cfg.parallel))
    o = cfg.optim
    optimizer = make_optimizer(
        ddp, lr=o.lr, min_lr=o.min_lr if o.schedule != "constant" else o.lr,
        weight_decay=o.weight_decay, clip_grad=o.clip_grad,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        lr_scale_of=_shared_lr_scale(cfg, groups),
    )
    scheduler = _scheduler(optimizer, cfg, total_steps)
    step = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        _print0(f"resumed from {resume_from} at step {step}")
    # After a resume: the frozen rows as loaded.
    return TrainingSetup(ddp, optimizer, scheduler, FrozenRows.of_stage(model, policy, trained_vocab_rows), step)


def _global_loss(out) -> tuple[float, int]:
    """Token-mean loss of the step over every data-parallel rank (last stage only)."""
    if not out.losses:
        return math.nan, 0
    totals = torch.stack([torch.stack(out.losses).sum(), torch.stack(out.tokens).sum()]).double()
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item())


def _init_router_from_domains(cfg, model, model_cfg, data):
    from megatron_bar.bar.router_stats import domain_mean_router_init, domain_probe_router_init

    names = expert_names(cfg.model.load, model_cfg.num_experts)
    batches = data.domain_batches(cfg.router.stats_sequences, cfg.train.micro_batch_size)
    expert_domains = [None if n == "anchor" else n for n in names]
    if cfg.router.init in ("domain_probe", "domain_routing"):
        accuracy = domain_probe_router_init(model, batches, expert_domains,
                                            own_routing=cfg.router.init == "domain_routing")
        _print0(f"router rows fitted to the domains ({cfg.router.init}): {names}; training accuracy per layer "
                + ", ".join(f"{a:.3f}" for _, a in sorted(accuracy.items())))
        return
    domain_mean_router_init(model, batches, expert_domains)
    _print0(f"router rows initialised from domain means: {names}")


def _router_report(cfg, model, model_cfg, data, out_dir: Path, stem: str):
    from megatron_bar.bar.router_stats import routing_shares, write_routing_report

    batches = data.domain_batches(cfg.router.stats_sequences, cfg.train.micro_batch_size)
    shares = routing_shares(model, batches, expert_names(cfg.model.load, model_cfg.num_experts))
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, _ = write_routing_report(shares, out_dir, stem)
        _print0(f"router statistics: {json_path}")


def _carried_manifest(cfg: TrainConfig, step: int) -> dict[str, str]:
    """A merged model's manifest (expert names, sources, history) goes on with it through
    training - the router stage above all - so that its checkpoints can be upgraded
    (``merge_experts.py --base``) and served by expert name."""
    from megatron_bar.bar.manifest import MANIFEST_FILE

    source = Path(cfg.model.load) / MANIFEST_FILE
    if not source.is_file():
        return {}
    manifest = json.loads(source.read_text())
    manifest["history"] = list(manifest.get("history", [])) + [
        {"op": cfg.train.stage, "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "from": str(cfg.model.load), "step": step}]
    return {MANIFEST_FILE: json.dumps(manifest, indent=2) + "\n"}


def train(cfg: TrainConfig) -> TrainResult:
    # SIGTERM / SIGUSR1 (Slurm's warning before the time limit), from here on: the loop
    # finishes the step in flight, checkpoints and exits 75 (megatron_bar/train/preempt.py).
    # Installed before the (long, on 7B) startup so that an early signal is not fatal.
    with Preemption() as preempt:
        return _train(cfg, preempt)


def _train(cfg: TrainConfig, preempt: Preemption) -> TrainResult:
    cfg.validate()
    layout = platform.ParallelLayout(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    platform.initialize(layout, seed=cfg.train.seed)
    if cfg.data.seq_length % cfg.parallel.tp:
        raise ValueError(f"data.seq_length {cfg.data.seq_length} must divide by parallel.tp "
                         f"{cfg.parallel.tp} (sequence parallelism splits it)")
    out_dir = Path(cfg.train.output_dir)
    ckpt_root = cfg.checkpoint_dir
    resume_from = ckpt.latest_checkpoint(ckpt_root)
    if resume_from is not None:
        check_metrics_file(out_dir)  # every rank: all stop alike

    # Not a checkpoint, or a tokenizer that does not fit it: say so before reading any data.
    fit = _tokenizer_for(cfg, ModelConfig.load(cfg.model.load).vocab_size)
    tokenizer = fit.tokenizer
    data = build_training_data(cfg.data, tokenizer, cfg.train.seed, progress=dist.get_rank() == 0)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    if cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp_size):
        raise ValueError(
            f"train.global_batch_size {cfg.train.global_batch_size} must be a multiple of "
            f"micro_batch_size x data-parallel size ({cfg.train.micro_batch_size} x {dp_size})"
        )
    total_steps = steps_for(cfg.train.steps, cfg.train.epochs, len(data), cfg.train.global_batch_size)

    start_cfg, model_cfg = _model_config(cfg, Path(cfg.model.load), fit)
    if resume_from is not None:
        check_same_architecture(model_cfg, ModelConfig.load(resume_from), str(resume_from))
        model = _build(cfg, model_cfg)  # weights come with the optimizer state below
    else:
        model = _initial_model(cfg, start_cfg, model_cfg, fit)

    if resume_from is None and cfg.router.init != "none":
        _init_router_from_domains(cfg, model, model_cfg, data)

    run = setup_training(cfg, model, model_cfg, total_steps, resume_from, fit.new_ids)
    ddp, optimizer, scheduler, frozen_rows, step = (
        run.ddp, run.optimizer, run.scheduler, run.frozen_rows, run.step)

    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        _print0(data.mixture_report)
        _print0(f"{len(data)} sequences of {cfg.data.seq_length} tokens; {total_steps} steps of "
                f"{cfg.train.global_batch_size} sequences")
    write_router_stats = (cfg.router.stats and model_cfg.is_moe
                          and parallel_state.get_pipeline_model_parallel_world_size() == 1)
    if write_router_stats and step == 0:
        _router_report(cfg, model, model_cfg, data, out_dir, "router_stats_start")
    metrics = MetricsLogger(out_dir, total_steps, start_step=step, enabled=_is_logging_rank())
    losses = []
    final = resume_from

    def save(step: int) -> Path:
        return ckpt.save_checkpoint(
            ckpt_root, step, model, optimizer,
            {"step": step, "consumed_samples": step * cfg.train.global_batch_size,
             "scheduler": scheduler.state_dict(), "stage": cfg.train.stage},
            model_cfg, tokenizer if dist.get_rank() == 0 else None, cfg.checkpoint.keep_last,
            extra_files=_carried_manifest(cfg, step),
        )

    # The metrics are closed (TensorBoard flushed) however the loop ends.
    with contextlib.closing(metrics):
        while step < total_steps:
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            microbatches = data.microbatches(
                step, cfg.train.global_batch_size, cfg.train.micro_batch_size, dp_rank, dp_size
            )
            out = forward_backward(ddp, microbatches, model_cfg.vocab_size)
            frozen_rows.mask_gradients()
            ok, grad_norm, _ = optimizer.step()
            frozen_rows.restore()
            scheduler.step(increment=1)
            step += 1
            loss, tokens = _global_loss(out)
            losses.append(loss)
            lr = optimizer.param_groups[0]["lr"] if optimizer.param_groups else 0.0
            metrics.log(
                step,
                {"loss": loss, "lr": lr, "grad_norm": float(grad_norm or 0.0), "loss_tokens": tokens},
                tokens=cfg.train.global_batch_size * cfg.data.seq_length,
                print_line=step % cfg.train.log_interval == 0 or step == total_steps,
            )
            # Every checkpoint.interval steps, at the end, and after a preemption signal (then
            # it raises preempt.Preempted: exit code 75, which the Slurm scripts requeue).
            final = preempt.end_of_step(step, total_steps, cfg.checkpoint.interval, save) or final
    if write_router_stats:
        _router_report(cfg, model, model_cfg, data, out_dir, "router_stats")
    if _is_logging_rank() and metrics.path.exists():
        plot_loss_curve(metrics.path, out_dir / "loss.png", f"{cfg.train.stage}: loss")
    dist.barrier()
    return TrainResult(step, final, losses, out_dir)
