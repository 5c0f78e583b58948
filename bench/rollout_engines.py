"""Rollout tokens/s of ``rl.engine megatron`` (megatron-core's static inference engine)
against ``rl.engine transformers`` (our decoding loop), same weights, same process, one
thread, on the tiny dense and 2-expert BAR models (fp32 on CPU; each engine warmed up,
then timed twice in alternation).

    python bench/rollout_engines.py [--samples 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import megatron_bar
from megatron_bar.convert.hf_io import hf_config_from_model_config
from megatron_bar.demo.tiny import build_tiny_base
from megatron_bar.rl.mcore_engine import MegatronRolloutWorker
from megatron_bar.rl.rollout import RolloutWorker
from megatron_bar.rl.weights import gather_hf_state_dict, gather_mcore_state_dict


def tokens_per_s(worker, prompts, samples, tokens) -> float:
    worker.generate(prompts[:2], 2, 1.0, 4, eos_id=-1, pad_id=3, seed=0)  # warm-up
    t0 = time.perf_counter()
    out = worker.generate(prompts, samples, 1.0, tokens, eos_id=-1, pad_id=3, seed=1)  # no EOS: full length
    return sum(len(r["tokens"]) for r in out) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prompts = [[1] + [5 + (i * 7 + j) % 300 for j in range(8 + i % 5)] for i in range(8)]  # 5 lengths
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_tiny_base(Path(tmp))
        for which in ("dense", "bar2"):
            policy = megatron_bar.load_model(paths[which])
            hf = RolloutWorker(hf_config_from_model_config(policy.config, torch.float32))
            hf.set_weights(gather_hf_state_dict(policy.gpt, policy.config), 0)
            mc = MegatronRolloutWorker(policy.config.to_dict())
            mc.set_weights(gather_mcore_state_dict(policy.gpt, policy.config), 0)
            runs = {"transformers": [], "megatron": []}
            for _ in range(2):
                for name, worker in (("transformers", hf), ("megatron", mc)):
                    runs[name].append(tokens_per_s(worker, prompts, args.samples, args.tokens))
            t, m = max(runs["transformers"]), max(runs["megatron"])
            print(f"{which}: transformers {t:.0f} tok/s, megatron {m:.0f} tok/s, ratio {m / t:.2f}")
            result.update({f"{which}_transformers_tokens_per_s": t, f"{which}_megatron_tokens_per_s": m,
                           f"{which}_ratio": m / t})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
