#!/usr/bin/env python
"""BAR stage 2: merge 2-expert domain checkpoints into one MoE, or upgrade a merged one.

Expert 0 of the result is the anchor (identical in every input), expert j is the j-th
input's expert 1; shared parameters are averaged, router rows carried over, grown
vocabularies merged. Prints the plan and a divergence report of the shared parameters and
writes bar_manifest.json next to the weights. Examples:

    python tools/merge_experts.py --experts math=ckpt/math code=ckpt/code \\
        tool_use=ckpt/tool_use safety=ckpt/safety --save ckpt/bar-5x
    python tools/merge_experts.py --experts math=A code=B --weights math=0.7,code=0.3 --dry-run
    python tools/merge_experts.py --base ckpt/bar-5x --replace code=ckpt/code-v2 --save ckpt/bar-5x-code2
    python tools/merge_experts.py --base ckpt/bar-5x --add legal=ckpt/legal --save ckpt/bar-6x
"""

import argparse

from megatron_bar.cli import run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", nargs="+", metavar="NAME=DIR", help="2-expert domain checkpoints, in expert order")
    p.add_argument("--save", help="output checkpoint folder (must not exist)")
    p.add_argument("--weights", metavar="NAME=W,...", help="weights of the shared-parameter mean (default: equal)")
    p.add_argument("--topk", type=int, default=None, help="experts per token of the result (default: the inputs')")
    p.add_argument("--dry-run", action="store_true", help="check, print the plan and divergence report; write nothing")
    p.add_argument("--base", help="a merged checkpoint to upgrade (with --replace / --add)")
    p.add_argument("--replace", nargs="+", default=[], metavar="NAME=DIR", help="swap the expert NAME of --base")
    p.add_argument("--add", nargs="+", default=[], metavar="NAME=DIR", help="add expert NAME to --base")
    args = p.parse_args()

    from megatron_bar.bar.merge import MergeError, merge_experts, parse_named_dirs, parse_weights, upgrade

    if not args.dry_run and not args.save:
        raise MergeError("--save OUT is required (or --dry-run)")
    if args.base:
        if args.experts:
            raise MergeError("--experts and --base exclude each other (use --replace / --add with --base)")
        if args.weights:
            raise MergeError("--weights applies to a full merge; an upgrade keeps the base's shared parameters")
        upgrade(
            args.base, args.save,
            replace=parse_named_dirs(args.replace, "--replace"),
            add=parse_named_dirs(args.add, "--add"),
            topk=args.topk, dry_run=args.dry_run,
        )
    else:
        if args.replace or args.add:
            raise MergeError("--replace / --add need --base MERGED")
        if not args.experts:
            raise MergeError("--experts NAME=DIR ... is required (or --base)")
        merge_experts(
            parse_named_dirs(args.experts), args.save,
            weights=parse_weights(args.weights), topk=args.topk, dry_run=args.dry_run,
        )


if __name__ == "__main__":
    run(main)
