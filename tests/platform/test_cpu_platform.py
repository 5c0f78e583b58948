"""Each CPU patch of megatron-core, exercised through the megatron code it fixes."""

import math

import pytest
import torch

from helpers import batch
from megatron_bar import platform
from megatron_bar.platform import cpu


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    platform.initialize()


def test_patches_are_named_and_applied():
    assert cpu.cpu_patches_applied()
    names = [p.name for p in cpu.PATCHES]
    assert len(names) == len(set(names))
    assert {"device-placement", "causal-mask", "rng-tracker", "router-gemm", "schedules", "ddp",
            "optimizer", "wgrad-accumulation", "dist-checkpoint"} <= set(names)
    assert all(p.why for p in cpu.PATCHES)


def test_global_torch_is_untouched():
    """Only megatron's modules see the CPU stand-in; everyone else keeps real torch."""
    from megatron.core.transformer import utils as mcore_utils

    assert mcore_utils.torch is not torch
    assert torch.cuda.current_device.__module__ == "torch.cuda"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()  # no CUDA here: the real call still fails


def test_untested_megatron_version_is_refused(monkeypatch):
    monkeypatch.setattr(cpu, "mcore_version", lambda: "0.99.0")
    monkeypatch.delenv(cpu.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(cpu.UnsupportedMegatronVersion, match="0.99.0.*0.16.1"):
        cpu.check_mcore_version()
    monkeypatch.setenv(cpu.ALLOW_UNTESTED_ENV, "1")
    cpu.check_mcore_version()


def test_patches_refuse_a_cuda_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu, "_applied", False)
    with pytest.raises(RuntimeError, match="without CUDA"):
        cpu.apply_cpu_patches()


def test_causal_mask():
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(5)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1))


def test_rng_tracker_forks_a_separate_reproducible_stream():
    from megatron.core import tensor_parallel

    def draw():
        tensor_parallel.model_parallel_cuda_manual_seed(123, force_reset_rng=True)
        torch.manual_seed(7)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            forked = torch.rand(4)
        after = torch.rand(4)
        return forked, after

    forked1, after1 = draw()
    forked2, after2 = draw()
    torch.manual_seed(7)
    plain = torch.rand(4)
    assert torch.equal(forked1, forked2)  # reproducible for a seed
    assert torch.equal(after1, plain)  # the default stream is restored after the fork
    assert not torch.equal(forked1, plain)  # and the fork is a different stream


def test_router_gemm_falls_back_to_torch():
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None


def test_ddp_schedule_and_megatron_optimizer_train(mcore_moe_dir):
    """megatron DDP + schedule + megatron's Adam with clipping: the grad norm it reports is
    the true norm, and the loss falls."""
    from megatron_bar.model.builder import build_model
    from megatron_bar.model.checkpoint import load_weights
    from megatron_bar.model.config import ModelConfig
    from megatron_bar.train.engine import Microbatch, forward_backward, make_optimizer, wrap_ddp

    cfg = ModelConfig.load(mcore_moe_dir)
    model = build_model(cfg)
    load_weights(model, cfg, mcore_moe_dir)
    ddp = wrap_ddp(model)
    optimizer = make_optimizer(ddp, lr=3e-3, clip_grad=1.0)
    tokens, labels = batch(4, 16, seed=3)
    mbs = [Microbatch(tokens[i : i + 2], labels[i : i + 2], torch.ones(2, 16)) for i in (0, 2)]

    losses = []
    for step in range(8):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(ddp, mbs, cfg.vocab_size)
        losses.append(torch.stack(out.losses).mean().item())
        if step == 0:
            true_norm = math.sqrt(sum(p.main_grad.float().pow(2).sum().item() for p in model.parameters()))
        ok, grad_norm, _ = optimizer.step()
        assert ok
        if step == 0:
            assert abs(grad_norm - true_norm) <= 1e-4 * true_norm
            # clipping scaled the gradients the optimizer used down to norm 1.0
            assert grad_norm > 1.0
            clipped = math.sqrt(sum(p.grad.float().pow(2).sum().item() for p in model.parameters()
                                    if p.grad is not None))
            assert abs(clipped - 1.0) <= 1e-4, clipped
    assert losses[-1] < losses[0] - 0.5, losses


def test_dist_checkpoint_save_load_is_bit_exact(mcore_dense_dir, tmp_path, monkeypatch):
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_bar.model.builder import build_model
    from megatron_bar.model.checkpoint import load_weights, save_model
    from megatron_bar.model.config import ModelConfig

    cfg = ModelConfig.load(mcore_dense_dir)
    a = build_model(cfg)  # random init
    # as in a fresh process: megatron would start its results-queue Manager on this save
    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    before = set(multiprocessing.active_children())
    save_model(a, cfg, tmp_path / "ckpt")
    # the synchronous save started no process that outlives it (the spawned Manager costs ~3.5 s)
    assert set(multiprocessing.active_children()) <= before
    b = build_model(cfg, perform_initialization=False)
    load_weights(b, cfg, tmp_path / "ckpt")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name


def _torch_optimizers(optimizer):
    chained = getattr(optimizer, "chained_optimizers", None)
    return [o.optimizer for o in (chained if chained is not None else [optimizer])]


def test_fused_cpu_step_equals_the_unfused_one(mcore_moe_dir):
    """The CPU training step's fused paths - megatron's compiled SwiGLU, weight gradients
    accumulated into ``main_grad`` by the ``wgrad-accumulation`` GEMM, torch's fused Adam -
    are on, and give the gradients and the update of megatron's unfused path."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_bar.model.builder import build_model
    from megatron_bar.model.checkpoint import load_weights
    from megatron_bar.model.config import ModelConfig
    from megatron_bar.train.engine import Microbatch, forward_backward, make_optimizer, wrap_ddp

    cfg = ModelConfig.load(mcore_moe_dir)  # MoE: the experts' MLPs take the same paths
    tokens, labels = batch(4, 16, seed=5)
    mbs = [Microbatch(tokens[i : i + 2], labels[i : i + 2], torch.ones(2, 16)) for i in (0, 2)]

    def linears(model):
        return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]

    def run(fused_backward: bool, fused_adam: bool):
        overrides = {} if fused_backward else {"bias_activation_fusion": False}
        model = build_model(cfg, **overrides)
        load_weights(model, cfg, mcore_moe_dir)
        ddp = wrap_ddp(model)
        optimizer = make_optimizer(ddp, lr=1e-2, clip_grad=1.0)
        if not fused_backward:
            for m in linears(model):
                m.gradient_accumulation_fusion = False
        if not fused_adam:
            for group in (g for o in _torch_optimizers(optimizer) for g in o.param_groups):
                group["fused"] = None
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(ddp, mbs, cfg.vocab_size)
        grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        return model, optimizer, grads, {n: p.detach().clone() for n, p in model.named_parameters()}

    model, optimizer, grads, _ = run(fused_backward=True, fused_adam=True)
    assert model.config.bias_activation_fusion == platform.fused_swiglu()
    assert linears(model) and all(m.gradient_accumulation_fusion for m in linears(model))
    assert all(g["fused"] for o in _torch_optimizers(optimizer) for g in o.param_groups)

    # The backward: SwiGLU fusion and accumulation into main_grad (two microbatches).
    _, _, ref_grads, ref_params = run(fused_backward=False, fused_adam=False)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6), name
    # The update from the same gradients: torch's fused Adam against its per-tensor loop.
    # (Adam's first step is ~lr * sign(g), so it is compared on identical gradients.)
    _, _, same_grads, params = run(fused_backward=False, fused_adam=True)
    for name, p in params.items():
        assert torch.equal(same_grads[name], ref_grads[name]), name
        torch.testing.assert_close(p, ref_params[name], rtol=1e-6, atol=1e-7), name
