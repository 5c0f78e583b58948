"""python -m megatron_bar.train CONFIG.yaml [key=value ...] (also under torchrun)."""

import argparse

from megatron_bar.cli import run


def main():
    p = argparse.ArgumentParser(
        prog="python -m megatron_bar.train",
        description="Train one BAR stage (midtrain, sft, rlvr, router) from a YAML config.",
    )
    p.add_argument("config", help="YAML config (see examples/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 optim.lr=3e-4")
    args = p.parse_args()

    from megatron_bar.train.config import load_config
    from megatron_bar.train.trainer import train

    result = train(load_config(args.config, args.overrides))
    print(f"done: {result.steps} steps; checkpoint {result.final_checkpoint}")


if __name__ == "__main__":
    run(main)
