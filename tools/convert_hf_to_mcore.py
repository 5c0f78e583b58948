#!/usr/bin/env python
"""Convert an HF Olmo 2 (dense) or FlexOlmo (MoE) folder to a megatron dist checkpoint.

The checkpoint loads at any TP / PP / EP. --hf-dir is a local folder, not a hub id:
download it first, then convert:
    huggingface-cli download allenai/OLMo-2-1124-7B-Instruct --local-dir hf/olmo2-7b-instruct
    python tools/convert_hf_to_mcore.py --hf-dir hf/olmo2-7b-instruct --save ckpt/olmo2-7b
"""

import argparse

from megatron_bar.cli import run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="local folder with config.json, *.safetensors and the tokenizer files")
    p.add_argument("--save", required=True, help="output checkpoint folder (must not exist)")
    args = p.parse_args()

    from megatron_bar.convert import hf_to_mcore

    cfg = hf_to_mcore(args.hf_dir, args.save)
    kind = f"MoE, {cfg.num_experts} experts, top-{cfg.moe_topk}" if cfg.is_moe else "dense"
    print(f"wrote {args.save} ({kind}, {cfg.num_layers} layers, vocab {cfg.vocab_size})")


if __name__ == "__main__":
    run(main)
