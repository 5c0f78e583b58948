"""A verifiable toy task for RLVR on the tiny default: answer with digits only.

The reward is the share of the answer's characters (spaces aside) that are digits - a
dense, checkable signal that a random tiny model scores near 0 on, so a rising reward
curve is learning by RL alone.
"""

from __future__ import annotations

import random
from pathlib import Path

from megatron_bar.demo.toy_data import write_jsonl


def digits_reward(record: dict, completion: str) -> float:
    text = "".join(completion.split())
    return sum(c.isdigit() for c in text) / len(text) if text else 0.0


def write_digit_prompts(path: str | Path, n: int = 32, seed: int = 0) -> Path:
    rng = random.Random(seed)
    subjects = ("a number", "the year", "a code", "a count", "an amount", "a total")
    return write_jsonl(Path(path), [
        {"prompt": f"Reply with {rng.choice(subjects)}, digits only.", "task": "digits"}
        for _ in range(n)
    ])
