#!/usr/bin/env python
"""Upcycle a dense checkpoint into the 2-expert BAR MoE (expert 0 = frozen anchor).

The MoE's output equals the dense model's at step 0. Example:
    python tools/upcycle.py --load ckpt/olmo2-7b --save ckpt/olmo2-7b-2x
"""

import argparse

from megatron_bar.cli import run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="dense megatron_bar checkpoint")
    p.add_argument("--save", required=True, help="output MoE checkpoint (must not exist)")
    p.add_argument("--num-experts", type=int, default=2, help="anchor + trainable copies")
    p.add_argument("--topk", type=int, default=None, help="experts per token (default: all)")
    args = p.parse_args()

    from megatron_bar.bar.upcycle import upcycle

    cfg = upcycle(args.load, args.save, num_experts=args.num_experts, moe_topk=args.topk)
    print(f"wrote {args.save} ({cfg.num_experts} experts, top-{cfg.moe_topk}; expert 0 is the anchor)")


if __name__ == "__main__":
    run(main)
