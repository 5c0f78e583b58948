"""The GPU-only training features a config can ask for, as megatron settings.

* ``model.fp8: hybrid | e4m3`` (+ ``model.fp8_recipe``): FP8 matmuls through Transformer
  Engine. megatron's ``TransformerBlock`` enters TE's FP8 autocast itself when
  ``TransformerConfig.fp8`` is set, so the trainer only passes the settings to the model
  config. It needs the TE layer spec, hence a GPU and ``pip install -e .[gpu]``; anywhere
  else the config is refused with a clear error rather than silently trained in bf16.
* ``model.recompute``: full activation recomputation (already a model-config option).
* ``parallel.distributed_optimizer``: megatron's distributed optimizer (fp32 master
  weights and Adam moments sharded over the data-parallel ranks). Default: on with a GPU.
"""

from __future__ import annotations

from megatron_bar import platform
from megatron_bar.model.config import ConfigError

FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")


def validate_gpu_features(cfg) -> None:
    """Static checks of a TrainConfig's GPU options (no device needed)."""
    m = cfg.model
    if m.fp8 is not None and m.fp8 not in FP8_FORMATS:
        raise ConfigError(f"model.fp8 {m.fp8!r}: null, {' or '.join(FP8_FORMATS)}")
    if m.fp8_recipe not in FP8_RECIPES:
        raise ConfigError(f"model.fp8_recipe {m.fp8_recipe!r}: one of {', '.join(FP8_RECIPES)}")


def fp8_overrides(model_load_cfg) -> dict:
    """``TransformerConfig`` fields for ``model.fp8`` (empty when off). Raises ConfigError
    where Transformer Engine cannot run (no GPU, or TE not installed)."""
    m = model_load_cfg
    if m.fp8 is None:
        return {}
    if not platform.has_transformer_engine():
        where = "no GPU here" if not platform.has_gpu() else "transformer_engine is not installed"
        raise ConfigError(f"model.fp8 {m.fp8!r} needs Transformer Engine on a GPU ({where}); "
                          "set model.fp8=null, or install with pip install -e .[gpu]")
    overrides = {"fp8": m.fp8, "fp8_recipe": m.fp8_recipe}
    if m.fp8_recipe == "delayed":
        # Megatron-LM's usual delayed-scaling settings: the max over a long amax history.
        overrides.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return overrides


def use_distributed_optimizer(parallel_cfg) -> bool:
    value = parallel_cfg.distributed_optimizer
    return platform.has_gpu() if value is None else bool(value)
