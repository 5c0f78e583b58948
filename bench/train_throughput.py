"""Training throughput: megatron_bar's training step against transformers + torch AdamW.

    python bench/train_throughput.py                  # dense Olmo 2
    python bench/train_throughput.py --moe            # 2-expert BAR MoE against FlexOlmo
    python bench/train_throughput.py --preset olmo2-1b --dtype bf16 [--moe] --profile 3   # GPU

Both sides train the same model from the same initial weights on the same batches, in one
process, with the same torch thread count:

* ours: ``megatron_bar.platform.initialize()``, ``build_model(cfg,
  calculate_per_token_loss=True)``, megatron DDP (``wrap_ddp``), megatron's optimizer
  (``make_optimizer``: Adam, clipping at 1.0), a constant LR scheduler, and the trainer's
  step: ``zero_grad_buffer``, ``optimizer.zero_grad``, ``forward_backward`` over
  ``Microbatch`` objects, ``optimizer.step``, ``scheduler.step``, the step's loss read back
  as the trainer does (``_global_loss``);
* reference: ``transformers.Olmo2ForCausalLM`` (``FlexOlmoForCausalLM`` with ``--moe``)
  holding the same weights (our initial weights exported with the project's key map and
  HF config writer, loaded with ``from_pretrained``; SDPA attention),
  ``torch.optim.AdamW`` with the same lr / betas / eps / weight decay, and
  ``clip_grad_norm_(1.0)``: the loop anyone would write.

``--dtype bf16`` (the GPU's precision) builds ours with bf16 parameters (megatron's
optimizer keeps fp32 master weights; the vocab-parallel cross entropy runs megatron's fused
variant) and the reference in bf16 with SDPA and ``AdamW(fused=True)`` (on CUDA), plain
bf16 parameters, as a transformers user trains. ``--preset olmo2-1b`` takes
OLMo-2-0425-1B's shapes (hidden 2048, 16 layers, 16 heads, FFN 8192, vocabulary 100352)
at sequence 4096. On a GPU the table adds MFU: tokens/s x FLOPs per token / the GPU's peak
bf16 FLOP/s (``--peak-tflops``, else known from the device name), with FLOPs per token =
6 x the parameters in matmuls (every parameter but the input embedding; for the MoE the
top-k experts' share) + 12 x layers x hidden x sequence (attention scores and values, the
full square as PaLM counts it). ``--profile N`` profiles N more steps of ours with
torch.profiler, then N of the reference, and prints both tables (CUDA time first on a GPU).

Causal attention without a document mask on both. Each side first runs ``--warmup`` steps,
then ``--steps`` timed steps in ``--rounds`` alternating blocks (ours first in even rounds,
the reference first in odd ones), so drift in machine load falls on both alike. The two
loss curves are printed side by side (the first-step loss must agree: same model, same
batch), then a table, and as the LAST line a JSON object with ``ours_tokens_per_s``,
``reference_tokens_per_s`` and ``ratio`` (ours / reference).

tokens/s is timed tokens over the summed wall time of the timed steps. On a shared machine
also look at the median-step, fastest-step and CPU-time ratios (process CPU seconds, which
other processes' load disturbs less), in the table and the JSON; ``--threads 1`` is much
less disturbed by other jobs than several threads that wait for each other. The table's page
faults per step (minor faults, median) tell whether a side keeps re-faulting memory that
the C allocator handed back to the OS between steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import statistics
import sys
import time
import warnings


# OLMo-2-0425-1B (allenai/OLMo-2-0425-1B config.json), at the recipe's sequence length
PRESETS = {
    "olmo2-1b": dict(vocab=100352, hidden=2048, ffn=8192, layers=16, heads=16, kv_heads=16,
                     seq=4096, batch=2),
}

# Peak dense bf16 FLOP/s (no sparsity) by GPU name, from the vendors' data sheets
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    p.add_argument("--rounds", type=int, default=0,
                   help="alternating timed blocks per side (0: alternate every step)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model shapes and sequence of a known model (overrides the shape flags)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="parameters and compute of both sides (bf16: the GPU's)")
    p.add_argument("--profile", type=int, default=0,
                   help="after timing, profile this many steps of each side and print torch.profiler's tables")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak dense bf16 TFLOP/s for MFU (default: from the GPU's name)")
    p.add_argument("--ffn", type=int, default=None, help="FFN width (default 4 x hidden)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--moe", action="store_true",
                   help="bench the 2-expert BAR MoE (top-2, as upcycled) against FlexOlmo")
    p.add_argument("--experts", type=int, default=2, help="experts with --moe")
    p.add_argument("--topk", type=int, default=None, help="experts per token (default all)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both sides (default: torch's default)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--loss-tol", type=float, default=None,
                   help="largest first-step loss difference accepted (exit 1 beyond it; "
                        "default 1e-3 in fp32, 5e-2 in bf16)")
    args = p.parse_args(argv)
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    if args.dtype == "bf16":
        import torch

        if not torch.cuda.is_available():
            p.error("--dtype bf16 needs a GPU (megatron's bf16 optimizer takes CUDA tensors only)")
    if args.loss_tol is None:
        args.loss_tol = 1e-3 if args.dtype == "fp32" else 5e-2
    args.ffn = args.ffn or 4 * args.hidden
    if args.steps < 1 or args.rounds < 0 or args.warmup < 0:
        p.error("--steps must be >= 1, --rounds and --warmup >= 0")
    args.rounds = min(args.rounds or args.steps, args.steps)
    return args


def _quiet():
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("megatron", "megatron.core", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -- data -----------------------------------------------------------------------------------


def make_batches(n: int, batch: int, seq: int, vocab: int, seed: int):
    """``n`` batches of (tokens, labels), [batch, seq] each, from a learnable random process
    so that the loss visibly falls: tokens follow a Zipf law, and half the time a token is
    followed by a fixed successor (a random permutation of the vocabulary)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    successor = torch.randperm(vocab, generator=g)
    out = []
    for _ in range(n):
        x = torch.multinomial(zipf, batch * (seq + 1), replacement=True, generator=g)
        x = x.view(batch, seq + 1)
        follow = torch.rand(batch, seq, generator=g) < 0.5
        for i in range(seq):
            x[:, i + 1] = torch.where(follow[:, i], successor[x[:, i]], x[:, i + 1])
        out.append((x[:, :-1].contiguous(), x[:, 1:].contiguous()))
    return out


# -- models ---------------------------------------------------------------------------------


def model_config(args):
    from megatron_bar.model.config import ModelConfig

    moe = {}
    if args.moe:
        topk = args.topk or args.experts
        moe = dict(num_experts=args.experts, moe_topk=topk, norm_topk_prob=topk < args.experts)
    return ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
        num_layers=args.layers, num_attention_heads=args.heads, num_kv_heads=args.kv_heads,
        rope_theta=10000.0, max_position_embeddings=max(args.seq, 128), **moe,
    )


def reference_from(ours_model, cfg):
    """transformers' model of ``cfg`` holding ``ours_model``'s weights: exported with the
    project's key map and HF config writer to a temporary HF folder, then loaded with
    ``from_pretrained`` (which also fuses FlexOlmo's per-expert tensors as it does for any
    checkpoint)."""
    import json
    import tempfile
    from pathlib import Path

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from megatron_bar.convert import keymap
    from megatron_bar.convert.hf_io import hf_config_from_model_config

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    state = ours_model.state_dict()
    weights = {}
    for m in keymap.tensor_maps(cfg):
        for key, tensor in zip(m.hf, keymap.to_hf(m, state[m.mcore], cfg)):
            weights[key] = tensor.detach().to(torch.float32).contiguous().clone()
    with tempfile.TemporaryDirectory(prefix="megatron_bar_bench_") as tmp:
        hf_dir = Path(tmp)
        save_file(weights, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
        hf_config = hf_config_from_model_config(cfg, torch.float32)
        (hf_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
        model, info = AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True
        )
    expected = "FlexOlmoForCausalLM" if cfg.is_moe else "Olmo2ForCausalLM"
    if type(model).__name__ != expected:
        raise RuntimeError(f"expected {expected}, transformers built {type(model).__name__}")
    bad = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
           if info.get(k)}
    if bad:
        raise RuntimeError(f"weights did not transfer to transformers exactly: {bad}")
    return model.float().train()


# -- the two training steps -----------------------------------------------------------------


class Ours:
    name = "megatron_bar"

    def __init__(self, cfg, args):
        import torch

        from megatron_bar.model.builder import build_model
        from megatron_bar.train.engine import make_optimizer, wrap_ddp
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.cfg = cfg
        # the reference's precision: fp32 by default on every device, bf16 with --dtype bf16
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        self.model = build_model(cfg, params_dtype=dtype, calculate_per_token_loss=True)
        self.ddp = wrap_ddp(self.model)
        self.optimizer = make_optimizer(
            self.ddp, lr=args.lr, min_lr=args.lr, weight_decay=0.0, clip_grad=1.0,
            adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
        )
        # The trainer's constant schedule (warmup 0).
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=args.lr, max_lr=args.lr, min_lr=args.lr,
            lr_warmup_steps=0, lr_decay_steps=1, lr_decay_style="constant",
            start_wd=0.0, end_wd=0.0, wd_incr_steps=1, wd_incr_style="constant",
        )
        self.ddp.train()

    def step(self, tokens, labels) -> float:
        import torch

        from megatron_bar.train.engine import Microbatch, forward_backward
        from megatron_bar.train.trainer import _global_loss

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        mb = Microbatch(tokens=tokens, labels=labels,
                        loss_mask=torch.ones(labels.shape, dtype=torch.float32))
        out = forward_backward(self.ddp, [mb], self.cfg.vocab_size)
        self.optimizer.step()
        self.scheduler.step(increment=1)
        loss, _ = _global_loss(out)  # the trainer's read-back (a DP all-reduce and .item())
        return loss


class Reference:
    name = "transformers"

    def __init__(self, model, args):
        import torch

        from megatron_bar import platform

        self.device = platform.device()  # ours runs there too (megatron_bar.platform)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        self.model = model.to(self.device, dtype)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused AdamW where torch has it for the device (CUDA); its default elsewhere
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                           weight_decay=0.0, **fused)
        self.vocab = model.config.vocab_size

    def step(self, tokens, labels) -> float:
        import torch
        import torch.nn.functional as F

        self.optimizer.zero_grad(set_to_none=True)
        tokens, labels = tokens.to(self.device), labels.to(self.device)
        logits = self.model(input_ids=tokens).logits
        loss = F.cross_entropy(logits.float().reshape(-1, self.vocab), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss.item()


# -- the bench ------------------------------------------------------------------------------


def flops_per_token(cfg, seq: int) -> float:
    """Training FLOPs per token: 6 x the parameters a token goes through in matmuls (the
    LM head, not the input embedding; the MoE's top-k experts) + 12 x layers x attention
    width x sequence (PaLM's count of the attention scores and values)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    hq, hk = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = h * (hq + 2 * hk) + hq * h + 3 * h * f * (cfg.moe_topk if cfg.is_moe else 1)
    if cfg.is_moe:
        per_layer += cfg.num_experts * h
    matmul_params = cfg.num_layers * per_layer + cfg.vocab_size * h
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * hq * seq


def peak_flops(args):
    """The device's peak dense bf16 FLOP/s, or None (CPU, or a GPU not in the table)."""
    import torch

    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def profile_steps(side, batches, n: int) -> str:
    """torch.profiler's table over ``n`` steps of ``side`` (CUDA time first on a GPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(n):
            tokens, labels = batches[i % len(batches)]
            side.step(tokens, labels)
    sort = "cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=30)



def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_block(side, batches, start, count, losses, times):
    """Steps ``start .. start+count-1``; records (wall s, process CPU s, minor page faults)
    of each step."""
    for i in range(start, start + count):
        tokens, labels = batches[i]
        f0, t0, c0 = _minor_faults(), time.perf_counter(), time.process_time()
        losses.append(side.step(tokens, labels))
        times.append((time.perf_counter() - t0, time.process_time() - c0, _minor_faults() - f0))


def main(argv=None) -> int:
    args = parse_args(argv)
    _quiet()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    from megatron_bar import platform

    platform.initialize(seed=args.seed)
    _quiet()  # megatron and transformers install their own handlers on import
    cfg = model_config(args)
    ours = Ours(cfg, args)
    reference = Reference(reference_from(ours.model, cfg), args)
    n_params = sum(p.numel() for p in reference.params)

    batches = make_batches(args.warmup + args.steps, args.batch, args.seq, args.vocab, args.seed)
    tokens_per_step = args.batch * args.seq
    kind = (f"MoE {cfg.num_experts} experts top-{cfg.moe_topk} vs FlexOlmoForCausalLM"
            if cfg.is_moe else "dense vs Olmo2ForCausalLM")
    print(f"model: {kind}; vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, ffn "
          f"{cfg.ffn_hidden_size}, {cfg.num_layers} layers, {cfg.num_attention_heads} heads / "
          f"{cfg.num_kv_heads} kv, {n_params / 1e6:.2f} M params (HF count)")
    print(f"batch {args.batch} x seq {args.seq} = {tokens_per_step} tokens/step; "
          f"{args.warmup} warmup + {args.steps} timed steps per side in {args.rounds} "
          f"alternating blocks; torch threads {threads}; {args.dtype}; torch {torch.__version__}; "
          f"device {platform.device()}")

    sides = (ours, reference)
    losses = {s.name: [] for s in sides}
    times = {s.name: [] for s in sides}
    warm = {s.name: [] for s in sides}
    for side in sides:
        run_block(side, batches, 0, args.warmup, losses[side.name], warm[side.name])

    per_round = [args.steps // args.rounds + (r < args.steps % args.rounds)
                 for r in range(args.rounds)]
    start = args.warmup
    for r, count in enumerate(per_round):
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            gc.collect()
            run_block(side, batches, start, count, losses[side.name], times[side.name])
        start += count

    # Loss curves side by side.
    a, b = losses[ours.name], losses[reference.name]
    print(f"\n{'step':>5} {'ours loss':>12} {'reference':>12} {'|diff|':>10}")
    for i, (x, y) in enumerate(zip(a, b)):
        print(f"{i + 1:>5} {x:>12.6f} {y:>12.6f} {abs(x - y):>10.2e}"
              + ("   (warmup)" if i < args.warmup else ""))
    first_diff = abs(a[0] - b[0])

    def stats(name):
        wall = [t[0] for t in times[name]]
        cpu = [t[1] for t in times[name]]
        faults = [t[2] for t in times[name]]
        return dict(tokens_per_s=tokens_per_step * len(wall) / sum(wall),
                    median_s=statistics.median(wall), min_s=min(wall), max_s=max(wall),
                    tokens_per_cpu_s=tokens_per_step * len(cpu) / sum(cpu),
                    faults=statistics.median(faults))

    so, sr = stats(ours.name), stats(reference.name)
    ratio = so["tokens_per_s"] / sr["tokens_per_s"]
    median_ratio = sr["median_s"] / so["median_s"]
    min_ratio = sr["min_s"] / so["min_s"]
    cpu_ratio = so["tokens_per_cpu_s"] / sr["tokens_per_cpu_s"]
    print(f"\n{'':<14} {'tokens/s':>10} {'median s/step':>14} {'min':>8} {'max':>8} "
          f"{'tokens/cpu-s':>13} {'page faults/step':>17}")
    for label, s in (("ours", so), ("transformers", sr)):
        print(f"{label:<14} {s['tokens_per_s']:>10.1f} {s['median_s']:>14.4f} "
              f"{s['min_s']:>8.4f} {s['max_s']:>8.4f} {s['tokens_per_cpu_s']:>13.1f} "
              f"{s['faults']:>17.0f}")
    fpt, peak = flops_per_token(cfg, args.seq), peak_flops(args)
    mfu = {}
    if peak:
        mfu = {label: s["tokens_per_s"] * fpt / peak for label, s in (("ours", so), ("transformers", sr))}
        print(f"MFU ({fpt / 1e9:.2f} GFLOP/token, peak {peak / 1e12:.0f} TFLOP/s): "
              f"ours {mfu['ours']:.3f}, transformers {mfu['transformers']:.3f}")
    print(f"ratio (ours / transformers): {ratio:.3f}   by median step: {median_ratio:.3f}   "
          f"by fastest step: {min_ratio:.3f}   by CPU time: {cpu_ratio:.3f}")
    print(f"first-step loss: ours {a[0]:.6f}, transformers {b[0]:.6f}, |diff| {first_diff:.2e}; "
          f"last: ours {a[-1]:.4f}, transformers {b[-1]:.4f}")
    ok = first_diff <= args.loss_tol
    if not ok:
        print(f"WARNING: first-step losses differ by more than {args.loss_tol:g}: the two "
              "sides are not training the same model")
    result = {
        "ours_tokens_per_s": round(so["tokens_per_s"], 2),
        "reference_tokens_per_s": round(sr["tokens_per_s"], 2),
        "ratio": round(ratio, 4),
        "median_step_ratio": round(median_ratio, 4),
        "min_step_ratio": round(min_ratio, 4),
        "cpu_time_ratio": round(cpu_ratio, 4),
        "model": "moe" if cfg.is_moe else "dense",
        "tokens_per_step": tokens_per_step,
        "timed_steps": args.steps,
        "threads": threads,
        "device": str(platform.device()),
        "page_faults_per_step": {"ours": so["faults"], "reference": sr["faults"]},
        "first_step_loss_diff": first_diff,
        "dtype": args.dtype,
        "seq": args.seq,
        "flops_per_token": fpt,
        "mfu": {k: round(v, 4) for k, v in mfu.items()},
    }
    if args.profile:
        for side in sides:
            print(f"\ntorch.profiler, {args.profile} steps of {side.name}:")
            print(profile_steps(side, batches, args.profile))
    platform.shutdown()
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
