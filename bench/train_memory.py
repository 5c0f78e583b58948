"""One training step's memory per rank: the analytic estimate beside the measured peak.

    python bench/train_memory.py CONFIG [key=value ...]                        # one process
    torchrun --nproc-per-node 2 bench/train_memory.py CONFIG parallel.tp=2     # its layout
    python bench/train_memory.py CONFIG [key=value ...] --estimate-only --gpus 32

CONFIG is a training config (``python -m megatron_bar.train``'s YAML); the model's shapes
come from ``model_config.json`` in its ``model.load`` (bench/configs/<name>/ hold the shapes
of models without a checkpoint here: ``model.load=bench/configs/olmo2_7b_bar2``). The step is
the trainer's: the stage's freeze policy, megatron DDP and optimizer (distributed or not as
the config says), ``model.recompute``, ``micro_batch_size`` x ``data.seq_length`` synthetic
tokens (memory does not depend on the data or the weights' values).

Measured, per rank (megatron_bar.platform.memory): the state = what the rank's data holds
after a first step (parameters, gradient buffer, optimizer state, workspaces) above what it
held before building the model (on CPU anonymous memory, so not the library code the
first step pages in); the step peak = the peak of a second step above that state
(CUDA allocator on GPU, the kernel's resident high-water mark on CPU); peak = the sum.
Estimated: megatron_bar.train.memory_model, from the shapes alone. The LAST line is a JSON
list with one object per rank.

``--estimate-only`` prints the estimate without building anything, for a layout of
``--gpus`` GPUs (bf16, Transformer Engine's fused attention and Adam, as on the cluster):
one row per kind of rank (with EP, the rank holding the anchor expert and one without it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

MIB = 2**20
ROWS = ("params", "grads", "optimizer", "fp8_copies", "attention_workspace", "state",
        "activations", "recomputed_layer", "logits", "lm_head_backward", "attention_backward",
        "optimizer_transient", "step_peak", "peak")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="training config YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for the trainer")
    p.add_argument("--estimate-only", action="store_true", help="no model: the estimate for --gpus")
    p.add_argument("--gpus", type=int, default=8, help="world size with --estimate-only")
    p.add_argument("--microbatches", type=int, default=1,
                   help="microbatches in the measured step (the peak does not grow with them at PP=1)")
    return p.parse_args(argv)


def load(args):
    from megatron_bar.model.config import ConfigError, ModelConfig
    from megatron_bar.train.config import load_config

    import yaml

    # an RLVR config (train.stage rlvr, with its rl: section) is read as the RLVR trainer reads it
    cls = None
    if "rl" in (yaml.safe_load(Path(args.config).read_text()) or {}) if Path(args.config).is_file() else False:
        from megatron_bar.rl.trainer import RLTrainConfig as cls
    try:
        cfg = load_config(args.config, args.overrides, cls=cls)
        model_cfg = ModelConfig.load(cfg.model.load)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if cfg.data.seq_length % cfg.parallel.tp:
        sys.exit(f"error: data.seq_length {cfg.data.seq_length} must divide by parallel.tp {cfg.parallel.tp}")
    return cfg, model_cfg


def shape_for(cfg, model_cfg, *, dp, param_bytes, flash, adam, distributed_optimizer, gpu, pp_rank=0,
              ep_rank=0):
    from megatron_bar.train.memory_model import StepShape

    return StepShape(
        seq_length=cfg.data.seq_length, micro_batch_size=cfg.train.micro_batch_size,
        tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=cfg.parallel.ep, dp=dp, stage=cfg.train.stage,
        recompute=cfg.model.recompute, distributed_optimizer=distributed_optimizer,
        param_bytes=param_bytes, flash_attention=flash, adam=adam,
        fp8_weight_copies=cfg.model.fp8 is not None, gpu=gpu, pp_rank=pp_rank, ep_rank=ep_rank,
    )


def print_table(columns: list[tuple[str, dict]]) -> None:
    width = max(14, *(len(name) for name, _ in columns))
    print(f"{'MiB':<20}" + "".join(f"{name:>{width}}" for name, _ in columns))
    for row in ROWS:
        cells = []
        for _, values in columns:
            v = values.get(row)
            cells.append(f"{v / MIB:>{width}.1f}" if v is not None else f"{'':>{width}}")
        print(f"{row:<20}" + "".join(cells))


def estimate_only(args, cfg, model_cfg) -> None:
    from megatron_bar.train.memory_model import estimate

    world = args.gpus
    if world % (cfg.parallel.tp * cfg.parallel.pp):
        sys.exit(f"error: --gpus {world} is not a multiple of tp x pp")
    dp = world // (cfg.parallel.tp * cfg.parallel.pp)
    dist_opt = True if cfg.parallel.distributed_optimizer is None else cfg.parallel.distributed_optimizer
    columns, out = [], []
    ep_ranks = [0, 1] if model_cfg.is_moe and cfg.parallel.ep > 1 else [0]
    for ep_rank in ep_ranks:
        shape = shape_for(cfg, model_cfg, dp=dp, param_bytes=2, flash=True, adam="fused",
                          distributed_optimizer=dist_opt, gpu=True, pp_rank=cfg.parallel.pp - 1,
                          ep_rank=ep_rank)
        est = estimate(model_cfg, shape).as_dict()
        name = f"ep_rank {ep_rank}" + (" (anchor)" if ep_rank == 0 and model_cfg.is_moe else "")
        columns.append((name, est))
        out.append({"ep_rank": ep_rank, "estimate": est})
    print(f"{args.config}: estimate per GPU, {world} GPUs, TP={cfg.parallel.tp} PP={cfg.parallel.pp} "
          f"EP={cfg.parallel.ep} DP={dp}, stage {cfg.train.stage}, recompute {cfg.model.recompute}, "
          f"distributed optimizer {dist_opt}, micro-batch {cfg.train.micro_batch_size} x {cfg.data.seq_length}")
    print_table(columns)
    print(json.dumps(out))


def measure(args, cfg, model_cfg) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_bar import platform
    from megatron_bar.bar.freeze import FREEZE_POLICIES, apply_freeze_policy
    from megatron_bar.model.builder import build_model
    from megatron_bar.platform.memory import PeakMemory, adam_implementation, resident_bytes
    from megatron_bar.train.engine import Microbatch, forward_backward, make_optimizer, wrap_ddp
    from megatron_bar.train.gpu_features import fp8_overrides, use_distributed_optimizer
    from megatron_bar.train.memory_model import estimate

    layout = platform.ParallelLayout(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    platform.initialize(layout, seed=cfg.train.seed)
    before = resident_bytes()

    model = build_model(model_cfg, calculate_per_token_loss=True, recompute=cfg.model.recompute,
                        **fp8_overrides(cfg.model))
    apply_freeze_policy(model, FREEZE_POLICIES[cfg.train.stage], model_cfg.num_experts)
    dist_opt = use_distributed_optimizer(cfg.parallel)
    ddp = wrap_ddp(model, dist_opt)
    optimizer = make_optimizer(ddp, lr=1e-5)
    mbs, seq = cfg.train.micro_batch_size, cfg.data.seq_length
    g = torch.Generator().manual_seed(cfg.train.seed)
    microbatches = []
    for _ in range(args.microbatches):
        tokens = torch.randint(0, model_cfg.vocab_size, (mbs, seq + 1), generator=g)
        microbatches.append(Microbatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(),
                                       torch.ones(mbs, seq)))

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(ddp, microbatches, model_cfg.vocab_size)
        optimizer.step()

    step()  # the optimizer's state and megatron's workspaces exist from here on
    state = resident_bytes() - before
    with PeakMemory() as second:
        step()
    measured = {"state": state, "step_peak": second.above_baseline}
    measured["peak"] = measured["state"] + measured["step_peak"]

    param_bytes = next(model.parameters()).element_size()
    shape = shape_for(cfg, model_cfg, dp=parallel_state.get_data_parallel_world_size(),
                      param_bytes=param_bytes, flash=platform.has_transformer_engine(),
                      adam=adam_implementation(), distributed_optimizer=dist_opt, gpu=platform.has_gpu(),
                      pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                      ep_rank=parallel_state.get_expert_model_parallel_rank())
    est = estimate(model_cfg, shape).as_dict()
    built = sum(p.numel() for p in model.parameters()) * param_bytes
    row = {"rank": dist.get_rank(), "estimate": est, "measured": measured, "params_built": built}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        device = torch.cuda.get_device_name() if platform.has_gpu() else "CPU (resident set)"
        print(f"{args.config}: one step per rank on {device}, TP={layout.tp} PP={layout.pp} EP={layout.ep} "
              f"DP={shape.dp}, stage {cfg.train.stage}, recompute {cfg.model.recompute}, distributed optimizer "
              f"{dist_opt}, micro-batch {mbs} x {seq}, {args.microbatches} microbatch(es), Adam {shape.adam}")
        columns = []
        for r in rows:
            columns.append((f"rank{r['rank']} est", r["estimate"]))
            columns.append((f"rank{r['rank']} meas", r["measured"]))
        print_table(columns)
        for r in rows:
            e, m = r["estimate"], r["measured"]
            print(f"rank {r['rank']}: parameters built {r['params_built'] / MIB:.1f} MiB (estimate "
                  f"{e['params'] / MIB:.1f}); estimate / measured: state {e['state'] / max(m['state'], 1):.2f}, "
                  f"step peak {e['step_peak'] / max(m['step_peak'], 1):.2f}, peak {e['peak'] / max(m['peak'], 1):.2f}")
        print(json.dumps(rows))
    platform.shutdown()


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    args = parse_args(argv)
    cfg, model_cfg = load(args)
    if args.estimate_only:
        estimate_only(args, cfg, model_cfg)
    else:
        measure(args, cfg, model_cfg)


if __name__ == "__main__":
    main()
