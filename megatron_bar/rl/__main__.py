"""python -m megatron_bar.rl CONFIG.yaml [key=value ...] (also under torchrun)."""

import argparse

from megatron_bar.cli import run


def main():
    p = argparse.ArgumentParser(prog="python -m megatron_bar.rl",
                                description="RLVR with GRPO and a Ray rollout fleet, from a YAML config.")
    p.add_argument("config", help="YAML config (see examples/configs/tiny/rlvr_digits.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.num_workers=2 train.steps=10")
    args = p.parse_args()

    from megatron_bar.rl.trainer import RLTrainConfig, train_rl
    from megatron_bar.train.config import load_config

    result = train_rl(load_config(args.config, args.overrides, cls=RLTrainConfig))
    print(f"done: {result['steps']} steps; metrics in {result['output_dir']}/metrics.jsonl")


if __name__ == "__main__":
    run(main)
