#!/usr/bin/env python
"""Rollout throughput of the Ray fleet with 1 and with 2 workers, and the share of an
RLVR step spent generating, on the tiny default (CPU).

    python bench/rollout.py [--prompts 16 --samples 8 --tokens 32]

Last line: a JSON object with tokens_per_s_1_worker, tokens_per_s_2_workers, ratio
(2 / 1 workers) and generation_share (of a full RLVR step, measured by the trainer's own
timers on a short run).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def rollout_tokens_per_s(base, workers: int, prompts: int, samples: int, tokens: int, rounds: int) -> float:
    import megatron_bar
    from megatron_bar.convert.hf_io import hf_config_from_model_config
    from megatron_bar.rl.fleet import FleetConfig, RolloutFleet
    from megatron_bar.rl.weights import gather_hf_state_dict

    policy = megatron_bar.load_model(base)
    fleet = RolloutFleet(hf_config_from_model_config(policy.config, torch.float32),
                         FleetConfig(num_workers=workers, timeout_s=600))
    try:
        fleet.push_weights(gather_hf_state_dict(policy.gpt, policy.config), 0)
        batch = [[1] + list(range(5, 5 + 8 + i % 4)) for i in range(prompts)]
        fleet.generate(batch, samples, 1.0, tokens, eos_id=-1, pad_id=3, seed=0)  # warm-up
        t0, generated = time.perf_counter(), 0
        for r in range(rounds):
            out = fleet.generate(batch, samples, 1.0, tokens, eos_id=-1, pad_id=3, seed=r + 1)
            generated += sum(len(o["tokens"]) for o in out)
        return generated / (time.perf_counter() - t0)
    finally:
        fleet.shutdown()


def generation_share(base, workdir: Path) -> float:
    from megatron_bar.demo.toy_rl import write_digit_prompts
    from megatron_bar.train.metrics import read_metrics

    prompts = write_digit_prompts(workdir / "digits.jsonl")
    out = workdir / "rl"
    cmd = [sys.executable, "-m", "megatron_bar.rl", str(REPO / "examples/configs/tiny/rlvr_digits.yaml"),
           f"model.load={base}", f'rl.datasets=[{{path: "{prompts}", reward: "megatron_bar.demo.toy_rl:digits_reward"}}]',
           "train.steps=6", f"train.output_dir={out}", "checkpoint.interval=1000"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    rows = read_metrics(out / "metrics.jsonl")[1:]  # the first step includes warm-up
    gen = sum(r["time_generation_s"] for r in rows)
    total = sum(r["time_generation_s"] + r["time_training_s"] + r["time_weight_sync_s"] for r in rows)
    return gen / total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from megatron_bar.demo.tiny import build_tiny_base

    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_base(Path(tmp) / "tiny")["bar2"]
        one = rollout_tokens_per_s(base, 1, args.prompts, args.samples, args.tokens, args.rounds)
        two = rollout_tokens_per_s(base, 2, args.prompts, args.samples, args.tokens, args.rounds)
        share = generation_share(base, Path(tmp))
    print("| workers | rollout tokens/s |\n|---|---|")
    print(f"| 1 | {one:,.0f} |\n| 2 | {two:,.0f} |")
    print(f"generation share of an RLVR step: {share:.1%}")
    print(json.dumps({"tokens_per_s_1_worker": round(one, 1), "tokens_per_s_2_workers": round(two, 1),
                      "ratio": round(two / one, 3), "generation_share": round(share, 3)}))


if __name__ == "__main__":
    main()
