#!/usr/bin/env python
"""Rollout throughput of the Ray fleet with 1 and with 2 workers, the worker's decoding loop
against transformers ``generate``, the share of an RLVR step spent generating and syncing
weights, the bytes per sync, the one-step-async loop's step time against the synchronous
one (all on the tiny default, CPU), and the peak memory of one rollout worker with a
100352-token vocabulary.

    python bench/rollout.py [--prompts 16 --samples 8 --tokens 32]
    python bench/rollout.py --memory-only [--mem-samples 64 --mem-tokens 512]

Peak memory: a fresh process builds a rollout worker whose model is the tiny default with
``--mem-vocab`` (100352) tokens, and generates ``--mem-samples`` x ``--mem-tokens``; its
peak RSS above what the process held before the model was built (after a
small model generated once, so that imports are not counted) is compared with the
model's own bytes plus its KV cache (the bound: 2x). The stacked ``[n, T, V]`` float32
logits the worker used to keep are printed beside it, for scale (not run).

Last line: a JSON object with tokens_per_s_1_worker, tokens_per_s_2_workers, ratio
(2 / 1 workers), decode_tokens_per_s / generate_tokens_per_s and decode_over_generate (the
worker's own decoding loop against transformers ``generate``, one process and thread, same
batch; the median of the rounds' ratios),
generation_share and sync_share (of a full RLVR step, by the trainer's own timers on a
short run), first_sync_bytes (the whole model) and sync_bytes (a later step's
mean), step_s_sync / step_s_async and their ratio, the memory figures, and the weight
sync's ``sync_*`` figures.

Weight sync (``--sync-vocab``, default 100352, so that the model is tens of MB rather than
the tiny default's 0.7 MB): a fleet of 2 workers, a randomly initialised model of that
vocabulary; each round pushes (a) the whole model (every tensor moved) and (b) a
training step's change (every tensor but the anchor expert's moved) over the weight-sync
channel (broadcast in ``--sync-bucket-mb`` buckets, what the trainer runs), and the same
tensors again through Ray's object store (``ray.put`` of each bucket, each worker copying
it in: the sync path before the channel, kept here only as the reference); medians of the
rounds. ``sync_*_channel_s`` is the transfer alone (``seconds_transfer``), as is the
object-store figure; ``sync_*_push_s`` adds finding the changed tensors and keeping a copy.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_MEMORY_CHILD = r"""
import json, resource, sys
import psutil, torch
from megatron_bar.rl.rollout import RolloutWorker

hf_config, samples, tokens, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
# a small worker first, so that what generation imports and allocates once is in the baseline
small = RolloutWorker({**hf_config, "vocab_size": 512})
small.generate([[1, 5, 6]], 2, 1.0, 4, eos_id=-1, pad_id=3, seed=0)
del small
before = psutil.Process().memory_info().rss
worker = RolloutWorker(hf_config)
model_bytes = sum(p.numel() * p.element_size() for p in worker.model.parameters())
prompts = [[1] + list(range(5, 13 + i % 4)) for i in range(max(1, samples // 8))]
per_prompt = samples // len(prompts)
out = worker.generate(prompts, per_prompt, 1.0, tokens, eos_id=-1, pad_id=3, seed=0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "model_bytes": model_bytes,
                  "generated": sum(len(o["tokens"]) for o in out), "width": max(map(len, prompts))}))
"""

REPO = Path(__file__).resolve().parents[1]


def rollout_tokens_per_s(base, workers: int, prompts: int, samples: int, tokens: int, rounds: int):
    import megatron_bar
    from megatron_bar.convert.hf_io import hf_config_from_model_config
    from megatron_bar.rl.fleet import FleetConfig, RolloutFleet
    from megatron_bar.rl.weights import gather_hf_state_dict

    policy = megatron_bar.load_model(base)
    fleet = RolloutFleet(hf_config_from_model_config(policy.config, torch.float32),
                         FleetConfig(num_workers=workers, timeout_s=600))
    try:
        fleet.push_weights(gather_hf_state_dict(policy.gpt, policy.config), 0)
        first_sync = dict(fleet.last_sync)
        batch = [[1] + list(range(5, 5 + 8 + i % 4)) for i in range(prompts)]
        fleet.generate(batch, samples, 1.0, tokens, eos_id=-1, pad_id=3, seed=0)  # warm-up
        t0, generated = time.perf_counter(), 0
        for r in range(rounds):
            out = fleet.generate(batch, samples, 1.0, tokens, eos_id=-1, pad_id=3, seed=r + 1)
            generated += sum(len(o["tokens"]) for o in out)
        return generated / (time.perf_counter() - t0), first_sync
    finally:
        fleet.shutdown()


def decode_vs_generate(base, prompts: int, samples: int, tokens: int, rounds: int) -> tuple[float, float, float]:
    """Tokens/s of the worker's own decoding loop and of transformers ``generate`` (sampling
    at temperature 1, no EOS) on the same model and batch in this process, on one thread as
    a fleet worker runs, alternating round by round; and the median of the rounds' ratios
    (own / generate), which a neighbour's load on a shared machine disturbs less than the
    totals."""
    import statistics

    import megatron_bar
    from megatron_bar.convert.hf_io import hf_config_from_model_config
    from megatron_bar.rl.decode import decode
    from megatron_bar.rl.rollout import RolloutWorker
    from megatron_bar.rl.weights import gather_hf_state_dict

    policy = megatron_bar.load_model(base)
    worker = RolloutWorker(hf_config_from_model_config(policy.config, torch.float32))
    worker.set_weights(gather_hf_state_dict(policy.gpt, policy.config), 0)
    model = worker.model
    batch = [[1] + list(range(5, 5 + 8 + i % 4)) for i in range(prompts) for _ in range(samples)]
    width = max(map(len, batch))
    ids = torch.tensor([[3] * (width - len(p)) + p for p in batch])
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in batch])[:, None]).long()
    runs = {
        "decode": lambda: decode(model, ids, mask, 1.0, tokens, -1, 3).tokens,
        "generate": lambda: model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                           top_k=0, top_p=1.0, max_new_tokens=tokens, eos_token_id=None,
                                           pad_token_id=3)[:, width:],
    }
    seconds = {k: [] for k in runs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for r in range(rounds + 1):
                for k, run in runs.items():
                    t0 = time.perf_counter()
                    assert run().shape == (len(batch), tokens)
                    if r:  # the first round warms up
                        seconds[k].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    per_round = len(batch) * tokens
    ratio = statistics.median(g / d for d, g in zip(seconds["decode"], seconds["generate"]))
    return per_round * rounds / sum(seconds["decode"]), per_round * rounds / sum(seconds["generate"]), ratio


def step_shares(base, workdir: Path, async_steps: int) -> dict:
    """A 6-step RLVR run of the tiny digits recipe; its timers, after the first step."""
    from megatron_bar.demo.toy_rl import write_digit_prompts
    from megatron_bar.train.metrics import read_metrics

    prompts = write_digit_prompts(workdir / "digits.jsonl")
    out = workdir / f"rl_async{async_steps}"
    cmd = [sys.executable, "-m", "megatron_bar.rl", str(REPO / "examples/configs/tiny/rlvr_digits.yaml"),
           f"model.load={base}", f'rl.datasets=[{{path: "{prompts}", reward: "megatron_bar.demo.toy_rl:digits_reward"}}]',
           "train.steps=6", f"train.output_dir={out}", "checkpoint.interval=1000",
           f"rl.async_steps={async_steps}"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    rows = read_metrics(out / "metrics.jsonl")[1:]  # the first step includes warm-up
    step = sum(r["time_step_s"] for r in rows)
    return {"generation_share": sum(r["time_generation_s"] for r in rows) / step,
            "sync_share": sum(r["time_weight_sync_s"] for r in rows) / step,
            "step_s": step / len(rows),
            "sync_bytes": sum(r["weight_sync_bytes"] for r in rows) / len(rows)}


def sync_channel_vs_object_store(base, vocab: int, rounds: int, bucket_mb: float) -> dict:
    """Bytes and seconds per weight sync over the channel and through the object store."""
    import statistics

    import ray

    from megatron_bar import platform
    from megatron_bar.convert.hf_io import hf_config_from_model_config
    from megatron_bar.model.builder import build_model
    from megatron_bar.model.config import ModelConfig
    from megatron_bar.rl.channel import plan_buckets
    from megatron_bar.rl.fleet import FleetConfig, RolloutFleet
    from megatron_bar.rl.weights import gather_hf_state_dict

    platform.initialize()
    cfg = ModelConfig.load(base).with_(vocab_size=vocab)
    gpt = build_model(cfg)
    fleet = RolloutFleet(hf_config_from_model_config(cfg, torch.float32),
                         FleetConfig(num_workers=2, timeout_s=600, sync_bucket_mb=bucket_mb))

    def object_store(state):
        t0 = time.perf_counter()
        for bucket in plan_buckets(state, bucket_mb * 2**20):
            ref = ray.put({n: state[n] for n in bucket.names})
            ray.get([w.update_weights.remote(ref, fleet.version) for w in fleet.workers])
            del ref
        return time.perf_counter() - t0

    def move(anchor_too: bool):
        with torch.no_grad():
            for name, p in gpt.named_parameters():
                if anchor_too or "local_experts.0." not in name:
                    p.add_(1e-3)

    figures = {k: [] for k in ("full_channel_s", "full_push_s", "full_object_store_s",
                               "step_channel_s", "step_push_s", "step_object_store_s")}
    try:
        for r in range(rounds + 1):  # the first round warms up
            for kind, anchor_too in (("full", True), ("step", False)):
                move(anchor_too)
                state = gather_hf_state_dict(gpt, cfg)
                fleet.push_weights(state, r * 2 + anchor_too)
                sync = dict(fleet.last_sync)
                changed = {k: v for k, v in state.items() if anchor_too or ".experts.0." not in k}
                assert sync["bytes_sent"] == sum(v.numel() * v.element_size() for v in changed.values())
                store_s = object_store(changed)
                if r:
                    figures[f"{kind}_channel_s"].append(sync["seconds_transfer"])
                    figures[f"{kind}_push_s"].append(sync["seconds"])
                    figures[f"{kind}_object_store_s"].append(store_s)
                figures[f"{kind}_bytes"] = sync["bytes_sent"]
                figures[f"{kind}_buckets"] = sync["buckets"]
    finally:
        fleet.shutdown()
    out = {k: statistics.median(v) if isinstance(v, list) else v for k, v in figures.items()}
    for kind in ("full", "step"):
        out[f"{kind}_object_store_over_channel"] = out[f"{kind}_object_store_s"] / out[f"{kind}_channel_s"]
    return out


def worker_peak_memory(base, vocab: int, samples: int, tokens: int) -> dict:
    """Peak RSS of a fresh process generating with a rollout worker of vocabulary ``vocab``."""
    from megatron_bar.convert.hf_io import hf_config_from_model_config
    from megatron_bar.model.config import ModelConfig

    cfg = ModelConfig.load(base).with_(vocab_size=vocab)
    hf = hf_config_from_model_config(cfg, torch.float32)
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, json.dumps([hf, samples, tokens, 1])],
                          check=True, capture_output=True, text=True, cwd=REPO)
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    positions = m["width"] + tokens
    kv_bytes = 2 * cfg.num_layers * samples * positions * cfg.num_kv_heads * cfg.head_dim * 4
    growth = m["peak"] - m["before"]
    return {"vocab": vocab, "samples": samples, "tokens": tokens, "model_mb": m["model_bytes"] / 2**20,
            "kv_cache_mb": kv_bytes / 2**20, "peak_rss_mb": m["peak"] / 2**20,
            "rss_before_model_mb": m["before"] / 2**20, "peak_growth_mb": growth / 2**20,
            "growth_over_model_and_kv": growth / (m["model_bytes"] + kv_bytes),
            "stacked_logits_mb": samples * tokens * vocab * 4 / 2**20}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mem-vocab", type=int, default=100352)
    p.add_argument("--mem-samples", type=int, default=64)
    p.add_argument("--mem-tokens", type=int, default=512)
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--sync-vocab", type=int, default=100352)
    p.add_argument("--sync-bucket-mb", type=float, default=16.0)
    p.add_argument("--sync-only", action="store_true", help="only the weight-sync figures")
    args = p.parse_args()
    from megatron_bar.demo.tiny import build_tiny_base

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_base(Path(tmp) / "tiny")["bar2"]
        if not args.sync_only:  # first: a child's peak RSS counts its parent's (vfork + exec)
            mem = worker_peak_memory(base, args.mem_vocab, args.mem_samples, args.mem_tokens)
            print(f"rollout worker, vocab {mem['vocab']}, {mem['samples']} samples x {mem['tokens']} tokens: "
                  f"peak RSS {mem['peak_rss_mb']:.0f} MB, {mem['peak_growth_mb']:.0f} MB above the process "
                  f"before the model ({mem['rss_before_model_mb']:.0f} MB); model {mem['model_mb']:.0f} MB + "
                  f"KV cache {mem['kv_cache_mb']:.0f} MB -> {mem['growth_over_model_and_kv']:.2f}x "
                  f"(bound 2x); stacked [n, T, V] logits would be {mem['stacked_logits_mb']:,.0f} MB each")
            result.update({f"mem_{k}": round(v, 3) if isinstance(v, float) else v for k, v in mem.items()})
        if not args.memory_only:
            sync_fig = sync_channel_vs_object_store(base, args.sync_vocab, args.rounds, args.sync_bucket_mb)
            for kind, what in (("full", "whole model"), ("step", "a step's change (all but the anchor expert)")):
                print(f"weight sync to 2 workers, {what}: {sync_fig[kind + '_bytes'] / 2**20:.1f} MB in "
                      f"{sync_fig[kind + '_buckets']} buckets; channel {sync_fig[kind + '_channel_s']:.3f} s "
                      f"({sync_fig[kind + '_push_s']:.3f} s with finding the change), object store "
                      f"{sync_fig[kind + '_object_store_s']:.3f} s "
                      f"({sync_fig[kind + '_object_store_over_channel']:.2f}x the channel)")
            result.update({f"sync_{k}": round(v, 4) if isinstance(v, float) else v for k, v in sync_fig.items()})
        if not (args.memory_only or args.sync_only):
            one, first_sync = rollout_tokens_per_s(base, 1, args.prompts, args.samples, args.tokens, args.rounds)
            two, _ = rollout_tokens_per_s(base, 2, args.prompts, args.samples, args.tokens, args.rounds)
            own, hf, own_over_hf = decode_vs_generate(base, args.prompts, args.samples, args.tokens,
                                                      max(args.rounds, 5))
            sync = step_shares(base, Path(tmp), 0)
            ahead = step_shares(base, Path(tmp), 1)
            print("| workers | rollout tokens/s |\n|---|---|")
            print(f"| 1 | {one:,.0f} |\n| 2 | {two:,.0f} |")
            print(f"one worker's decoding, in process, one thread: own loop {own:,.0f} tokens/s, "
                  f"transformers generate {hf:,.0f} tokens/s (median ratio of the rounds {own_over_hf:.2f}x)")
            print(f"synchronous step: {sync['step_s']:.2f} s, generation {sync['generation_share']:.1%}, "
                  f"weight sync {sync['sync_share']:.1%}; async_steps 1: {ahead['step_s']:.2f} s "
                  f"({ahead['step_s'] / sync['step_s']:.2f}x)")
            print(f"bytes per sync: first (whole model) {first_sync['bytes']:,} in "
                  f"{first_sync['seconds']:.3f} s; a training step's {sync['sync_bytes']:,.0f}")
            result.update({
                "tokens_per_s_1_worker": round(one, 1), "tokens_per_s_2_workers": round(two, 1),
                "ratio": round(two / one, 3), "decode_tokens_per_s": round(own, 1),
                "generate_tokens_per_s": round(hf, 1), "decode_over_generate": round(own_over_hf, 3), "generation_share": round(sync["generation_share"], 3),
                "sync_share": round(sync["sync_share"], 3), "first_sync_bytes": first_sync["bytes"],
                "first_sync_s": round(first_sync["seconds"], 4), "sync_bytes": round(sync["sync_bytes"]),
                "step_s_sync": round(sync["step_s"], 3), "step_s_async": round(ahead["step_s"], 3),
                "async_over_sync": round(ahead["step_s"] / sync["step_s"], 3)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
