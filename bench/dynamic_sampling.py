#!/usr/bin/env python
"""Does DAPO's dynamic sampling learn at least as fast? The digits task on the tiny
default (examples/configs/tiny/rlvr_digits.yaml), with and without `rl.dynamic_sampling`,
over several seeds: the number of steps until the mean training reward first reaches a
threshold, and the generation rounds that took.

    python bench/dynamic_sampling.py [--seeds 0 1 2 --steps 30 --threshold 0.8]

A run that never reaches the threshold counts as `--steps + 1`. Last line: JSON with
steps_to_threshold_off / _on (per seed), their means, ratio (on / off; <= 1 is as fast or
faster), and rounds_on (generation rounds per step with dynamic sampling, mean).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(base: Path, prompts: Path, out: Path, seed: int, steps: int, dynamic: bool) -> list[dict]:
    from megatron_bar.train.metrics import read_metrics

    cmd = [sys.executable, "-m", "megatron_bar.rl", str(REPO / "examples/configs/tiny/rlvr_digits.yaml"),
           f"model.load={base}",
           f'rl.datasets=[{{path: "{prompts}", reward: "megatron_bar.demo.toy_rl:digits_reward"}}]',
           f"rl.dynamic_sampling={'true' if dynamic else 'false'}", f"train.seed={seed}",
           f"train.steps={steps}", f"train.output_dir={out}", f"checkpoint.interval={steps + 1}"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO,
                   env={"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **__import__("os").environ})
    return read_metrics(out / "metrics.jsonl")


def steps_to(rows: list[dict], threshold: float, steps: int) -> int:
    return next((r["step"] for r in rows if r.get("reward_mean", 0.0) >= threshold), steps + 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threshold", type=float, default=0.8)
    args = ap.parse_args()
    from megatron_bar.demo.tiny import build_tiny_base
    from megatron_bar.demo.toy_rl import write_digit_prompts

    result = {"off": [], "on": [], "rounds_on": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_tiny_base(tmp / "tiny")["bar2"]
        prompts = write_digit_prompts(tmp / "digits.jsonl")
        for seed in args.seeds:
            for mode in ("off", "on"):
                rows = run(base, prompts, tmp / f"{mode}{seed}", seed, args.steps, mode == "on")
                n = steps_to(rows, args.threshold, args.steps)
                result[mode].append(n)
                rounds = [r["dynamic_sampling_rounds"] for r in rows if "dynamic_sampling_rounds" in r]
                if mode == "on":
                    result["rounds_on"].append(sum(rounds) / len(rounds))
                before = [r["dynamic_sampling_rounds"] for r in rows if r["step"] < n]
                curve = " ".join(f"{r['reward_mean']:.2f}" for r in rows)
                print(f"seed {seed} dynamic_sampling {mode:>3}: reward >= {args.threshold} at step {n} "
                      f"(rounds per step {sum(rounds) / len(rounds):.2f}, before the threshold "
                      f"{sum(before) / max(len(before), 1):.2f}); rewards {curve}", flush=True)
    off = sum(result["off"]) / len(result["off"])
    on = sum(result["on"]) / len(result["on"])
    print(f"mean steps to {args.threshold}: without {off:.1f}, with {on:.1f} (ratio {on / off:.2f})")
    print(json.dumps({"steps_to_threshold_off": result["off"], "steps_to_threshold_on": result["on"],
                      "mean_off": off, "mean_on": on, "ratio": on / off,
                      "rounds_on": sum(result["rounds_on"]) / len(result["rounds_on"])}))


if __name__ == "__main__":
    main()
