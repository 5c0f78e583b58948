#!/usr/bin/env python
"""Export a megatron_bar checkpoint to an HF folder (Olmo2 for dense, FlexOlmo for MoE).

The folder loads with transformers' from_pretrained (and vLLM). Example:
    python tools/convert_mcore_to_hf.py --load ckpt/bar-merged --save hf/bar-merged [--dtype bf16]

The weights are written in --dtype; by default in the dtype of the HF checkpoint the
model was converted from (recorded at conversion), else the dtype the checkpoint holds.
"""

import argparse

from megatron_bar.cli import run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="megatron_bar checkpoint folder")
    p.add_argument("--save", required=True, help="output HF folder (must not exist)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="dtype of the exported weights (default: the source HF checkpoint's)")
    args = p.parse_args()

    from megatron_bar.convert import mcore_to_hf

    cfg = mcore_to_hf(args.load, args.save, max_shard_bytes=int(args.max_shard_gb * 2**30), dtype=args.dtype)
    arch = "FlexOlmoForCausalLM" if cfg.is_moe else "Olmo2ForCausalLM"
    print(f"wrote {args.save} ({arch})")


if __name__ == "__main__":
    run(main)
