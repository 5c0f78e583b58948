"""Scorers: ``(record, completion) -> float in [0, 1]``, the same signature as RL rewards.

The verifiable domains reuse the RLVR rewards of :mod:`megatron_bar.rl.rewards`, so a
model is evaluated by exactly what it was trained towards: ``math`` (math-verify),
``code`` (the program runs on the record's tests in the sandbox), ``tool_use`` (exactly
one call with the expected name and arguments), ``safety`` (refuses iff it should).
``exact`` compares whitespace-normalised text with ``record["answer"]`` (instruction
following: copy, reverse, sort...). Any other name is a ``package.module:function``.
"""

from __future__ import annotations

from typing import Callable

from megatron_bar.rl.rewards import BUILTIN_REWARDS, get_reward_fn

Scorer = Callable[[dict, str], float]


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_match(record: dict, completion: str) -> float:
    """1.0 if the reply equals ``record["answer"]`` up to case and whitespace."""
    return float(_norm(completion) == _norm(str(record["answer"])))


SCORERS: dict[str, Scorer] = {**BUILTIN_REWARDS, "exact": exact_match}


def get_scorer(name: str) -> Scorer:
    """A built-in scorer by name (:data:`SCORERS`) or ``package.module:function``."""
    if name in SCORERS:
        return SCORERS[name]
    return get_reward_fn(name)
