"""The rollout engines ``rl.engine`` names, and what each needs from the trainer.

An engine is a worker class the fleet runs as a Ray actor (the calls of
:class:`megatron_bar.rl.rollout.RolloutWorker`), the config it is built from, and the
layout the trainer's weights reach it in:

- ``transformers``: a transformers copy of the policy decoded by
  :func:`megatron_bar.rl.decode.decode`; weights in the HF layout.
- ``megatron``: megatron-core's inference engine on the trainer's own modules
  (:mod:`megatron_bar.rl.mcore_engine`); weights by the trainer's parameter names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from megatron_bar.model.config import ModelConfig
from megatron_bar.train.config import ConfigError


@dataclass(frozen=True)
class Engine:
    worker: str  # "module:Class"
    requires: str  # a module that must import for this engine to run
    install: str  # how to get it

    def worker_class(self):
        module, name = self.worker.split(":")
        return getattr(importlib.import_module(module), name)

    def worker_config(self, cfg: ModelConfig) -> dict:
        """What the worker class is built from."""
        if self is ENGINES["transformers"]:
            import torch

            from megatron_bar.convert.hf_io import hf_config_from_model_config

            return hf_config_from_model_config(cfg, torch.float32)
        return cfg.to_dict()

    def gather_weights(self) -> Callable:
        """``fn(model, cfg)``: the trainer's weights as this engine loads them (rank 0; ``None``
        elsewhere), called on every rank."""
        from megatron_bar.rl import weights

        if self is ENGINES["transformers"]:
            return weights.gather_hf_state_dict
        return weights.gather_mcore_state_dict


ENGINES = {
    "transformers": Engine("megatron_bar.rl.rollout:RolloutWorker", "transformers",
                           "pip install transformers"),
    "megatron": Engine("megatron_bar.rl.mcore_engine:MegatronRolloutWorker",
                       "megatron.core.inference.engines.static_engine", "pip install megatron-core"),
}

# where a GPU rollout engine would go next; naming it is an error before any work starts
_NOT_BUILT = {"vllm": ("vllm", "pip install vllm")}


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def check_engine(name: str) -> Engine:
    """The engine ``rl.engine`` names, installed here; else a :class:`ConfigError` that says
    how to install it or which engines exist."""
    if name in _NOT_BUILT:
        module, install = _NOT_BUILT[name]
        if not _importable(module):
            raise ConfigError(f"rl.engine {name!r} is not installed ({install}); and the rollout "
                              f"workers do not drive it yet: use rl.engine transformers or megatron")
        raise ConfigError(f"rl.engine {name!r}: installed, but the rollout workers do not drive it "
                          f"yet; use rl.engine transformers or megatron")
    if name not in ENGINES:
        raise ConfigError(f"rl.engine {name!r}: one of {', '.join(sorted(ENGINES))}")
    engine = ENGINES[name]
    if not _importable(engine.requires):
        raise ConfigError(f"rl.engine {name!r} is not installed: {engine.requires} is missing "
                          f"({engine.install})")
    return engine
