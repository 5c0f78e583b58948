"""megatron-core on a machine without CUDA.

megatron-core 0.16 assumes CUDA in a few dozen places: tensors allocated with
``device="cuda"`` or ``device=torch.cuda.current_device()``, ``torch.cuda.synchronize()``
in checkpoint saving, ``torch.cuda.Stream()`` in DDP and the dispatchers, and an RNG
tracker built on the CUDA generator. Every one of those is a call made *by a megatron
module through its module-level ``torch`` name*. So instead of patching torch globally
(which would change behaviour for everyone in the process) each patched megatron module
gets its own ``torch``: a thin proxy that forwards everything to the real torch except
the CUDA-only calls, which it answers for the CPU. Code outside those modules - ours,
transformers', the user's - sees the real torch.

Each patch is a named, documented :class:`Patch`; :func:`apply_cpu_patches` applies them
once, only when CUDA is absent, and refuses a megatron-core version they were not
written against. ``tests/platform/test_cpu_platform.py`` checks that each is applied
and runs what they make possible (training steps, dist checkpoint save and load).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import types
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_bar.utils.errors import UserError

log = logging.getLogger(__name__)

# The megatron-core releases these patches were written and tested against.
TESTED_MCORE_VERSIONS = ("0.16.0", "0.16.1")
ALLOW_UNTESTED_ENV = "MEGATRON_BAR_ALLOW_UNTESTED_MCORE"


class UnsupportedMegatronVersion(UserError):
    pass


# --------------------------------------------------------------------------------------
# The proxy that a patched module sees as ``torch``.
# --------------------------------------------------------------------------------------

# torch factory functions that take a ``device=`` argument.
_FACTORIES = frozenset(
    {
        "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn",
        "randint", "randperm", "eye", "linspace", "empty_like", "zeros_like", "ones_like",
        "full_like", "rand_like", "randn_like", "empty_strided",
    }
)


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return factory


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: on CPU every op is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return _NullEvent()


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other) -> float:
        # the inference controller times its steps with CUDA events; on CPU none is kept
        return 0.0


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as a patched megatron module sees it on a CPU machine."""

    def __init__(self):
        super().__init__("torch.cuda")

    # Device placement: megatron passes ``torch.cuda.current_device()`` as ``device=``.
    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(device=None):
        pass

    @staticmethod
    def is_available():
        return False

    # The RNG tracker keeps its named states on the generator that dropout uses: here the
    # CPU default generator.
    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    Stream = _NullStream
    Event = _NullEvent

    @staticmethod
    def current_stream(device=None):
        return _NullStream()

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()

    @staticmethod
    def device_count():
        return 0

    @staticmethod
    def memory_allocated(device=None):
        return 0

    @staticmethod
    def max_memory_allocated(device=None):
        return 0

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """``torch`` as a patched megatron module sees it on a CPU machine."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in _FACTORIES:
            value = _cpu_factory(value)
        # Cache, so that later lookups are plain attribute reads.
        setattr(self, name, value)
        return value


_TORCH_ON_CPU = _TorchOnCpu()


def _proxy_torch_in(module_names: tuple[str, ...]) -> Callable[[], None]:
    def apply():
        for name in module_names:
            module = importlib.import_module(name)
            if getattr(module, "torch", None) is not torch:
                raise UnsupportedMegatronVersion(
                    f"{name} no longer imports torch as a module global; the CPU patch "
                    "'cuda-calls-answer-for-cpu' needs revisiting for this megatron-core"
                )
            module.torch = _TORCH_ON_CPU

    return apply


# --------------------------------------------------------------------------------------
# The patches.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    name: str
    why: str
    apply: Callable[[], None]


# The megatron modules whose CUDA calls we answer for the CPU, grouped by what they do.
_DEVICE_PLACEMENT_MODULES = (
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",  # GlobalMemoryBuffer: the sequence-parallel all-gather buffer
)
_CAUSAL_MASK_MODULES = ("megatron.core.transformer.utils",)
_SCHEDULE_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
)
_DDP_MODULES = (
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
)
_OPTIMIZER_MODULES = (
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
)
_CHECKPOINT_MODULES = (
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)


def _patch_rng_tracker():
    """The tracker's ``fork()`` swaps generator states through two helpers that read the
    CUDA generator; on CPU they swap the CPU default generator's state instead."""
    from megatron.core.tensor_parallel import random as mcore_random

    _proxy_torch_in(("megatron.core.tensor_parallel.random",))()

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mcore_random._get_cuda_rng_state = get_state
    mcore_random._set_cuda_rng_state = set_state

    # fork() warns when the CPU generator moved inside a forked region: on GPU that means
    # a bug, on CPU it is the point of the fork (the forked state *is* the CPU generator).
    class _DropExpectedWarning(logging.Filter):
        def filter(self, record):
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mcore_random.__name__).addFilter(_DropExpectedWarning())


def patch_router_gemm():
    """The fp32 router GEMM calls ``te_general_gemm`` when Transformer Engine is installed;
    without it the name is unbound in 0.16 and the torch matmul path must be chosen. Also
    applied on a GPU without Transformer Engine (:func:`megatron_bar.platform.initialize`)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_grad_clipping():
    """``clip_grads.get_grad_norm_fp32`` reduces the norm in a tensor it allocates with
    ``device='cuda'`` (the proxy places it on CPU; megatron's own fallback kernel sums the
    per-tensor norms). ``clip_grad_by_total_norm_fp32`` asserts every gradient is a
    ``torch.cuda.FloatTensor``; the replacement checks for fp32 on any device and scales
    exactly as megatron does (coefficient max_norm / (total_norm + 1e-6), applied when < 1).
    """
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.utils import to_local_if_dtensor

    _proxy_torch_in(_OPTIMIZER_MODULES)()

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = []
        for param in parameters:
            grad = getattr(param, attr, None)
            if grad is not None:
                if grad.dtype not in (torch.float32, torch.bfloat16):
                    raise TypeError(f"gradient clipping expects fp32/bf16 grads, got {grad.dtype}")
                grads.append(to_local_if_dtensor(grad).detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


class _WgradAccumulationOnCpu:
    """Stands in for apex's ``fused_weight_gradient_mlp_cuda`` (megatron's
    ``gradient_accumulation_fusion``): the weight-gradient GEMM accumulates straight into
    the parameter's fp32 ``main_grad`` buffer, ``main_grad += grad_output^T @ input``.
    Without it each linear layer's backward makes a fresh weight gradient that megatron's
    DDP hook then adds into ``main_grad``: one allocation and one more pass per weight."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        main_grad.addmm_(grad_output.t(), total_input)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input, grad_output, main_grad):
        main_grad.addmm_(grad_output.t(), total_input)


def _patch_wgrad_accumulation():
    """megatron's linear layers accumulate weight gradients into ``main_grad`` through
    apex's CUDA extension when ``gradient_accumulation_fusion`` is on, and refuse the option
    without it; on CPU the extension's two functions are the GEMM above. Used where
    :func:`megatron_bar.train.engine.wrap_ddp` turns the option on (the buffers exist only
    under megatron's DDP)."""
    from megatron.core.tensor_parallel import layers

    if not hasattr(layers, "_grad_accum_fusion_available"):
        raise UnsupportedMegatronVersion(
            "megatron.core.tensor_parallel.layers no longer has _grad_accum_fusion_available; "
            "the CPU patch 'wgrad-accumulation' needs revisiting for this megatron-core"
        )
    layers.fused_weight_gradient_mlp_cuda = _WgradAccumulationOnCpu
    layers._grad_accum_fusion_available = True


PATCHES: tuple[Patch, ...] = (
    Patch(
        "device-placement",
        "tensors megatron allocates on torch.cuda.current_device() land on the CPU",
        _proxy_torch_in(_DEVICE_PLACEMENT_MODULES),
    ),
    Patch(
        "causal-mask",
        "transformer.utils.get_default_causal_mask builds its mask with device='cuda'",
        _proxy_torch_in(_CAUSAL_MASK_MODULES),
    ),
    Patch(
        "rng-tracker",
        "the model-parallel RNG tracker forks the CUDA generator",
        _patch_rng_tracker,
    ),
    Patch(
        "router-gemm",
        "moe_utils.te_general_gemm is unbound without Transformer Engine",
        patch_router_gemm,
    ),
    Patch(
        "schedules",
        "forward-backward schedules count tokens in a device='cuda' tensor and "
        "p2p_communication synchronizes CUDA",
        _proxy_torch_in(_SCHEDULE_MODULES),
    ),
    Patch(
        "ddp",
        "DDP makes a CUDA stream for overlapped reduction and the grad buffer warms up "
        "with a device='cuda' tensor",
        _proxy_torch_in(_DDP_MODULES),
    ),
    Patch(
        "optimizer",
        "grad-norm reduction allocates on CUDA and clipping asserts torch.cuda.FloatTensor",
        _patch_grad_clipping,
    ),
    Patch(
        "wgrad-accumulation",
        "gradient_accumulation_fusion needs apex's fused_weight_gradient_mlp_cuda "
        "(a GEMM accumulating into main_grad)",
        _patch_wgrad_accumulation,
    ),
    Patch(
        "dist-checkpoint",
        "the checkpoint writer calls torch.cuda.synchronize() before writing",
        _proxy_torch_in(_CHECKPOINT_MODULES),
    ),
)

# Applied on demand: nvidia-modelopt is optional (tools/quantize.py), so it is not imported
# with the patches megatron-core always needs.
MODELOPT_PATCH = Patch(
    "modelopt-megatron-plugin",
    "nvidia-modelopt's megatron plugin calls torch.cuda.synchronize() when it saves "
    "quantizer state",
    _proxy_torch_in(("modelopt.torch.opt.plugins.megatron",)),
)

# Applied on demand (rl.engine megatron): megatron-core's inference stack, imported only
# by the rollout engine that uses it.
INFERENCE_PATCH = Patch(
    "mcore-inference",
    "megatron.core.inference's static engine, controller and model wrapper allocate with "
    "device=torch.cuda.current_device() and time their steps with torch.cuda.Event",
    _proxy_torch_in((
        "megatron.core.inference.engines.static_engine",
        "megatron.core.inference.text_generation_controllers.text_generation_controller",
        "megatron.core.inference.model_inference_wrappers.abstract_model_inference_wrapper",
        "megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper",
        "megatron.core.inference.utils",
    )),
)

_applied = False


_optional_applied: set[str] = set()


def _apply_optional(patch: Patch) -> None:
    """A patch applied only when its feature is used (once per process, never with CUDA)."""
    if patch.name in _optional_applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError(f"the CPU patch {patch.name!r} is for machines without CUDA")
    patch.apply()
    log.debug("CPU patch applied: %s (%s)", patch.name, patch.why)
    _optional_applied.add(patch.name)


def apply_inference_patch() -> None:
    _apply_optional(INFERENCE_PATCH)


class TensorCudaStaysOnCpu(torch.overrides.TorchFunctionMode):
    """``tensor.cuda()`` returns the tensor itself while active.

    The module proxies answer calls made through a module's ``torch`` name; a *method* call
    on a tensor is not one. megatron-core 0.16's static-batch generation loop
    (``TextGenerationController.generate_all_output_tokens_static_batch``) makes one:
    ``torch.zeros(batch_size, device=...).cuda()``. A torch function mode, entered only
    around that loop, leaves every other call as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **(kwargs or {}))


def apply_modelopt_patch() -> None:
    _apply_optional(MODELOPT_PATCH)


def mcore_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def check_mcore_version() -> None:
    version = mcore_version()
    if version in TESTED_MCORE_VERSIONS or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return
    raise UnsupportedMegatronVersion(
        f"megatron-core {version} is installed, but megatron_bar's CPU patches were written "
        f"and tested against {', '.join(TESTED_MCORE_VERSIONS)}. Install "
        f"megatron-core=={TESTED_MCORE_VERSIONS[-1]}, or set {ALLOW_UNTESTED_ENV}=1 to try "
        "anyway (then run the tests in tests/platform first)."
    )


def apply_cpu_patches() -> list[str]:
    """Apply every patch once; returns the names applied (empty when already applied)."""
    global _applied
    if _applied:
        return []
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_patches() is for machines without CUDA")
    check_mcore_version()
    for patch in PATCHES:
        patch.apply()
        log.debug("megatron-core CPU patch applied: %s (%s)", patch.name, patch.why)
    _applied = True
    return [p.name for p in PATCHES]


def cpu_patches_applied() -> bool:
    return _applied
