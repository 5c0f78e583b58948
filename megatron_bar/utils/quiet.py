"""Deprecation warnings of dependencies that a user of the tools can do nothing about.

Each is silenced by its exact message (and category), not by a pattern: a new warning,
or one of these whose wording changes, still shows.
"""

from __future__ import annotations

import re
import warnings

# (category, exact message): raised inside megatron-core / torch dist checkpointing on
# every checkpoint load, about APIs that megatron-core 0.16.1 itself calls.
DEPENDENCY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, "`load_state_dict` is deprecated and will be removed in future versions. "
                    "Please use `load` instead."),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor."),
)


def quiet_dependency_warnings() -> None:
    for category, message in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message) + r"\Z", category=category)
