#!/usr/bin/env python
"""The log-prob gap between the rollout engine and the trainer on the tiny 2-expert MoE at
top-1, with and without routing replay (``rl.routing_replay``).

    python bench/routing_replay.py [--prompts 16 --samples 4 --tokens 32 --dtype float32 bfloat16]

The tiny default is upcycled (its two experts are copies), so the experts and the router
are first moved apart (as RL training does; seeded noise, ``--router-scale`` for the router). The rollout worker - the transformers
copy the fleet runs - generates and records the experts it chose; the megatron model
(the trainer's) then scores the same tokens routing by its own router and replaying the
rollout's experts. Printed per dtype: the mean and max |rollout - trainer| log-prob over
the completion tokens, and the share of token-layer routings where the trainer's own
top-1 differs from the rollout's. Last line: JSON of the same.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(base: Path, dtype: torch.dtype, prompts: int, samples: int, tokens: int, seed: int,
            router_scale: float) -> dict:
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_bar import platform
    from megatron_bar.convert.hf_io import hf_config_from_model_config
    from megatron_bar.model.builder import build_model
    from megatron_bar.model.checkpoint import load_weights
    from megatron_bar.model.config import ModelConfig
    from megatron_bar.rl.rollout import RolloutWorker
    from megatron_bar.rl.routing import RoutingReplay, stack_routing
    from megatron_bar.rl.weights import gather_hf_state_dict

    if not platform.is_initialized():
        platform.initialize()
    cfg = ModelConfig.load(base).with_(moe_topk=1)
    gpt = build_model(cfg, params_dtype=dtype, moe_enable_routing_replay=True)
    load_weights(gpt, cfg, base)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            scale = 0.5 if "local_experts.1" in name else router_scale if "router" in name else 0.0
            if scale:
                p.add_((scale * torch.randn_like(p.float())).to(p.dtype))
    gpt.eval()
    worker = RolloutWorker(hf_config_from_model_config(cfg, dtype))
    worker.model.to(dtype)
    worker.set_weights(gather_hf_state_dict(gpt, cfg), 0)

    g = torch.Generator().manual_seed(seed)
    batch = [[1] + torch.randint(5, cfg.vocab_size, (6 + i % 5,), generator=g).tolist() for i in range(prompts)]
    out = worker.generate(batch, samples, 1.0, tokens, eos_id=2, pad_id=3, seed=seed, record_routing=True)

    replay = RoutingReplay(gpt)
    gaps = {"own": [], "replay": []}
    mismatched = total = 0
    for r in out:
        prompt, completion = batch[r["prompt_index"]], r["tokens"]
        seq = torch.tensor([prompt + completion[:-1]])
        routing = stack_routing([r["routing"]], seq.size(1), 1)
        rollout_lp = torch.tensor(r["logprobs"])
        for mode in ("own", "replay"):
            if mode == "replay":
                replay.set(routing)
            else:  # the trainer's own routing, recorded to compare with the rollout's
                for router in replay.routers.values():
                    router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
            with torch.no_grad():
                logits = gpt(seq, torch.arange(seq.size(1))[None], None)[0, len(prompt) - 1 :, : cfg.vocab_size]
            if mode == "own":
                own = torch.stack([replay.routers[i].router_replay.get_recorded_indices()
                                   for i in sorted(replay.routers)])  # [layers, seq * 1, 1]
                mismatched += int((own.view(routing.shape) != routing).sum())
                total += routing.numel()
            replay.clear()
            lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
            gaps[mode].append((lp - rollout_lp).abs())
    own, rep = torch.cat(gaps["own"]), torch.cat(gaps["replay"])
    return {"dtype": str(dtype).removeprefix("torch."), "tokens": own.numel(),
            "gap_mean_without_replay": own.mean().item(), "gap_max_without_replay": own.max().item(),
            "gap_mean_with_replay": rep.mean().item(), "gap_max_with_replay": rep.max().item(),
            "routing_mismatch_share": mismatched / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--router-scale", type=float, default=0.002,
                    help="std of the noise added to the router (small: close expert scores, as a "
                         "router that is still learning has; large: clear-cut choices)")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    from megatron_bar.demo.tiny import build_tiny_base

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_base(Path(tmp) / "tiny")["bar2"]
        for name in args.dtype:
            res = measure(base, getattr(torch, name), args.prompts, args.samples, args.tokens, args.seed,
                          args.router_scale)
            results.append(res)
            print(f"{res['dtype']:>9}: mean |logprob gap| without replay {res['gap_mean_without_replay']:.2e} "
                  f"(max {res['gap_max_without_replay']:.2e}), with replay {res['gap_mean_with_replay']:.2e} "
                  f"(max {res['gap_max_with_replay']:.2e}); trainer's own top-1 differs on "
                  f"{100 * res['routing_mismatch_share']:.2f}% of token-layers ({res['tokens']} tokens)",
                  flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
