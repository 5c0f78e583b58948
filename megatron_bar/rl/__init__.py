"""RLVR stage: GRPO loss and advantages, verifiable rewards, and the code sandbox.

* :mod:`megatron_bar.rl.grpo`: group advantages, the clipped policy loss, log-prob helpers (torch).
* :mod:`megatron_bar.rl.rewards`: reward functions, their registry, ``safe_reward`` and ``RewardPool``.
* :mod:`megatron_bar.rl.sandbox`: ``run_python``, generated code run under bubblewrap.

The names below are loaded on first access (PEP 562). The math reward's
worker processes import :mod:`megatron_bar.rl.rewards`, and this way they
don't pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # grpo
    "PolicyLossConfig": "grpo",
    "drop_uniform_groups": "grpo",
    "dynamic_sampling": "grpo",
    "group_advantages": "grpo",
    "masked_mean": "grpo",
    "overlong_rewards": "grpo",
    "pass_at_k": "grpo",
    "policy_loss": "grpo",
    "sequence_logprobs": "grpo",
    # rewards
    "RewardPool": "rewards",
    "code_reward": "rewards",
    "get_reward_fn": "rewards",
    "math_reward": "rewards",
    "safe_reward": "rewards",
    "safety_reward": "rewards",
    "tool_reward": "rewards",
    # sandbox
    "SandboxConfig": "sandbox",
    "SandboxResult": "sandbox",
    "SandboxUnavailable": "sandbox",
    "probe_isolation": "sandbox",
    "run_python": "sandbox",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
