"""The Olmo 2 7B recipes (examples/configs/olmo2_7b/) are configs the trainers accept, with
the layouts the README describes; the GPU-only options (FP8, distributed optimizer) are
refused clearly where they cannot run."""

import pytest

from helpers import REPO

RECIPES = REPO / "examples" / "configs" / "olmo2_7b"


def _load(path):
    from megatron_bar.rl.trainer import RLTrainConfig
    from megatron_bar.train.config import load_config

    return load_config(path, cls=RLTrainConfig if "rlvr" in path.name else None)


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_loads(name):
    cfg = _load(RECIPES / name)
    assert cfg.model.recompute and cfg.parallel.distributed_optimizer
    assert cfg.train.micro_batch_size == 1
    assert cfg.train.stage == "rlvr" or cfg.data.seq_length == 4096  # RLVR: prompt + max_response_tokens
    if cfg.train.stage == "router":  # the 5-expert model: 5 experts do not divide over EP 2
        assert (cfg.parallel.tp, cfg.parallel.ep) == (2, 1) and cfg.data.sample_fraction == 0.05
    else:
        assert (cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.pp) == (2, 2, 1)
    # RLVR stays bf16 (rollout vs trainer log-probs); every other stage trains in FP8 hybrid
    assert cfg.model.fp8 == (None if cfg.train.stage == "rlvr" else "hybrid")


def test_every_domain_has_an_sft_recipe_for_the_pipeline():
    assert {p.stem for p in RECIPES.glob("*_sft.yaml")} == {"math_sft", "code_sft", "tool_use_sft", "safety_sft"}
    assert (RECIPES / "router.yaml").is_file()


def test_gpu_options_on_cpu():
    from megatron_bar import platform
    from megatron_bar.model.config import ConfigError
    from megatron_bar.train.gpu_features import fp8_overrides, use_distributed_optimizer

    cfg = _load(RECIPES / "math_sft.yaml")
    if platform.has_transformer_engine():
        assert fp8_overrides(cfg.model)["fp8"] == "hybrid"
    else:
        with pytest.raises(ConfigError, match="model.fp8 'hybrid' needs Transformer Engine on a GPU"):
            fp8_overrides(cfg.model)
    cfg.model.fp8 = None
    assert fp8_overrides(cfg.model) == {}
    cfg.parallel.distributed_optimizer = None
    assert use_distributed_optimizer(cfg.parallel) == platform.has_gpu()
    with pytest.raises(ConfigError, match="model.fp8 'fp16': null, hybrid or e4m3"):
        _load_with(RECIPES / "math_sft.yaml", "model.fp8=fp16")
    with pytest.raises(ConfigError, match="model.fp8_recipe 'x'"):
        _load_with(RECIPES / "math_sft.yaml", "model.fp8_recipe=x")


def _load_with(path, *overrides):
    from megatron_bar.train.config import load_config

    return load_config(path, list(overrides))


ONE_MACHINE = REPO / "examples" / "configs" / "olmo2_1b"


@pytest.mark.parametrize("name", sorted(p.name for p in ONE_MACHINE.glob("*.yaml")))
def test_one_machine_config_loads(name):
    """The Olmo 2 1B configs run on one GPU as given (no model parallelism)."""
    cfg = _load(ONE_MACHINE / name)
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep) == (1, 1, 1)
    assert cfg.model.recompute and cfg.model.fp8 is None and cfg.data.add_special_tokens == []
