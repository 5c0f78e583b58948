#!/usr/bin/env python
"""Build the tiny default: tokenizer, dense Olmo 2 base, 2-expert BAR MoE, toy data.

    python examples/tiny/make_tiny.py --out runs/tiny
"""

import argparse
from pathlib import Path

from megatron_bar.cli import run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/tiny"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from megatron_bar.demo.tiny import build_tiny_base
    from megatron_bar.demo.toy_data import write_toy_sets
    from megatron_bar.demo.toy_rl import write_digit_prompts

    paths = build_tiny_base(args.out, seed=args.seed)
    data = write_toy_sets(args.out / "data", seed=args.seed)
    data["digits"] = write_digit_prompts(args.out / "data" / "digits.jsonl", seed=args.seed)
    for name, path in {**paths, **data}.items():
        print(f"{name:>10}: {path}")


if __name__ == "__main__":
    run(main)
