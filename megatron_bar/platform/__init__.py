"""The one place that knows which device we run on.

Everything device-specific lives here: the torch.distributed backend (NCCL on GPU, gloo
on CPU), where tensors go, which layer implementations the model spec uses (Transformer
Engine on GPU when installed, megatron's local modules otherwise), the default training
dtype, and - on machines without CUDA - the patches that let megatron-core run there
(:mod:`megatron_bar.platform.cpu`). No other module of megatron_bar mentions CUDA.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "ParallelLayout",
    "has_gpu",
    "device",
    "backend",
    "standalone_backend",
    "standalone_process_group",
    "has_transformer_engine",
    "default_train_dtype",
    "fused_swiglu",
    "fused_adam",
    "fused_wgrad_accumulation",
    "initialize",
    "shutdown",
    "is_initialized",
    "synchronize",
    "reset_peak_memory",
    "prepare_modelopt",
    "prepare_mcore_inference",
    "manual_seed",
]


def has_gpu() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    if has_gpu():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if has_gpu() else "gloo"


def standalone_backend(requested: str, members_on_gpu: bool) -> str:
    """The backend of a process group outside the default world (the RL weight-sync
    channel between the trainer's rank 0 and the rollout workers): ``auto`` is NCCL when
    this process and every other member have a GPU, gloo otherwise."""
    if requested == "auto":
        return "nccl" if has_gpu() and members_on_gpu else "gloo"
    if requested == "nccl" and not (has_gpu() and members_on_gpu):
        raise ValueError("an NCCL process group needs a GPU in this process and in every member")
    if requested not in ("nccl", "gloo"):
        raise ValueError(f"process-group backend {requested!r}: auto, nccl or gloo")
    return requested


def standalone_process_group(store: dist.Store, rank: int, size: int, timeout_s: float,
                             backend_name: str) -> tuple[dist.ProcessGroup, torch.device]:
    """A process group of ``size`` members that meet in ``store``, built from torch's public
    backend classes rather than ``init_process_group``/``new_group`` (which need every
    member in one default world: the rollout workers are not in the trainer's), and the
    device its tensors live on. Collectives are called on the returned object directly
    (``group.broadcast(tensor, root).wait()``). Joining blocks until every member has."""
    if backend_name == "nccl":
        # (NCCL's own default timeout applies: its Options set one only through a private field)
        return dist.ProcessGroupNCCL(store, rank, size, dist.ProcessGroupNCCL.Options()), device()
    return dist.ProcessGroupGloo(store, rank, size, datetime.timedelta(seconds=timeout_s)), torch.device("cpu")


def has_transformer_engine() -> bool:
    """True where the Transformer Engine spec (fused kernels, grouped GEMM, FP8) can be used."""
    if not has_gpu():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def default_train_dtype() -> torch.dtype:
    """bf16 on GPU (the recipe's precision), fp32 on CPU (exact and deterministic)."""
    return torch.bfloat16 if has_gpu() else torch.float32


def fused_swiglu() -> bool:
    """Whether the MLPs use megatron's fused SwiGLU (``bias_activation_fusion``).

    On CPU, yes where a C++ compiler is found: megatron's ``jit_fuser`` is
    ``torch.compile``, which turns the activation and its gradient into one loop each
    (inductor's C++ backend), where the unfused one runs chunk, silu, an add of
    ``glu_linear_offset`` and a product forward, and three kernels and the ``cat`` of the
    two halves' gradients backward. On GPU the spec keeps megatron's unfused activation
    (the fused one is not measured there yet).
    """
    if has_gpu():
        return False
    import shutil

    return shutil.which(os.environ.get("CXX", "g++")) is not None


def fused_adam() -> bool:
    """Whether megatron's Adam (torch's ``AdamW`` where Transformer Engine and apex are
    absent) steps with torch's fused kernel. On CPU, yes: megatron builds it with torch's
    default there, the per-tensor loop, ~3x slower than the fused CPU kernel. On GPU
    megatron's own fused Adam (TE / apex) is used where installed."""
    return not has_gpu()


def fused_wgrad_accumulation() -> bool:
    """Whether linear layers under megatron's DDP accumulate their weight gradients straight
    into the fp32 ``main_grad`` buffer (megatron's ``gradient_accumulation_fusion``). On
    CPU, yes (the GEMM of the ``wgrad-accumulation`` patch); on GPU it needs apex, which
    the project does not install."""
    return not has_gpu()


def synchronize() -> None:
    if has_gpu():
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    """Start a new peak for :func:`peak_memory_bytes` (the CUDA allocator's; on CPU the
    caller samples the resident size itself)."""
    if has_gpu():
        torch.cuda.reset_peak_memory_stats()


def prepare_modelopt() -> None:
    """Make nvidia-modelopt's megatron plugin usable here (a named CPU patch, see
    :data:`megatron_bar.platform.cpu.MODELOPT_PATCH`; nothing to do on GPU)."""
    if not has_gpu():
        from megatron_bar.platform.cpu import apply_modelopt_patch

        apply_modelopt_patch()


def prepare_mcore_inference():
    """Make megatron-core's inference stack (``megatron.core.inference``) usable here and
    return the context to run its generation loop in: nothing to do on GPU; on CPU a named
    patch (:data:`megatron_bar.platform.cpu.INFERENCE_PATCH`) and a torch function mode
    that keeps ``tensor.cuda()`` on the CPU
    (:class:`megatron_bar.platform.cpu.TensorCudaStaysOnCpu`)."""
    import contextlib

    if has_gpu():
        return contextlib.nullcontext()
    from megatron_bar.platform.cpu import TensorCudaStaysOnCpu, apply_inference_patch

    apply_inference_patch()
    return TensorCudaStaysOnCpu()


def manual_seed(seed: int) -> None:
    """Seed every generator the model and the data use, on every device."""
    torch.manual_seed(seed)
    if has_gpu():
        torch.cuda.manual_seed_all(seed)


def peak_memory_bytes() -> int:
    if has_gpu():
        return torch.cuda.max_memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


@dataclass(frozen=True)
class ParallelLayout:
    """Model-parallel sizes; data parallelism is whatever of the world remains."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    sequence_parallel: bool | None = None  # None: on whenever tp > 1

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    def use_sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(timeout_s: float) -> None:
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # torchrun / srun: rank, world size and rendezvous come from the environment.
        if has_gpu():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend(), timeout=timeout)
    else:
        # A plain `python` process: a one-rank group, so that megatron's parallel state
        # (which always asks torch.distributed) works for tools and tests.
        dist.init_process_group(
            backend=backend(),
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
            timeout=timeout,
        )


def is_initialized() -> bool:
    from megatron.core import parallel_state

    return dist.is_initialized() and parallel_state.model_parallel_is_initialized()


def initialize(layout: ParallelLayout | None = None, seed: int = 1234, timeout_s: float = 600.0):
    """Start torch.distributed (if needed) and megatron's model-parallel groups.

    Safe to call again with the same layout; a different layout re-creates the groups.
    """
    from megatron.core import parallel_state, tensor_parallel

    layout = layout or ParallelLayout()
    if not has_gpu():
        from megatron_bar.platform.cpu import apply_cpu_patches

        apply_cpu_patches()
    elif not has_transformer_engine():
        # megatron-core 0.16's router GEMM names te_general_gemm, unbound without Transformer
        # Engine on any device (seen on an H200 without TE: NameError in the first forward)
        from megatron_bar.platform.cpu import patch_router_gemm

        patch_router_gemm()
    if not dist.is_initialized():
        _init_process_group(timeout_s)

    world = dist.get_world_size()
    if world % layout.model_parallel_size:
        raise ValueError(
            f"world size {world} is not divisible by tp*pp = {layout.tp}*{layout.pp}"
        )
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == layout.tp
            and parallel_state.get_pipeline_model_parallel_world_size() == layout.pp
            and parallel_state.get_expert_model_parallel_world_size() == layout.ep
        ):
            tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
            return layout
        parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
    )
    manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return layout


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
