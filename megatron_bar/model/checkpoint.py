"""Model checkpoints: a megatron dist checkpoint plus the ``model_config.json`` that says
what model it holds.

The dist checkpoint stores every tensor with its global shape (layers stacked, experts
indexed globally), so the same folder loads at any TP / PP / EP; megatron reshards on load.
"""

from __future__ import annotations

import json
import queue
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader

from megatron_bar.model.config import ConfigError, ModelConfig
from megatron_bar.utils.fs import atomic_output_dir

# Fields that may differ between a checkpoint and the model it is loaded into: they change
# how the model runs, not what its tensors are.
RUNTIME_FIELDS = ("moe_topk", "max_position_embeddings", "hf_extra", "source_dtype")


class CheckpointMismatch(ConfigError):
    pass


def check_same_architecture(expected: ModelConfig, found: ModelConfig, where: str) -> None:
    a = {k: v for k, v in expected.to_dict().items() if k not in RUNTIME_FIELDS}
    b = {k: v for k, v in found.to_dict().items() if k not in RUNTIME_FIELDS}
    diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
    if diff:
        lines = ", ".join(f"{k}: model {x!r} vs checkpoint {y!r}" for k, (x, y) in diff.items())
        raise CheckpointMismatch(f"{where} holds another architecture ({lines})")


def sharded_bytes(sharded_state_dict: dict) -> int:
    """About what a dist checkpoint of ``sharded_state_dict`` takes on disk: the bytes of
    the tensors every rank writes (main replicas only), summed over the ranks. Every rank
    calls (a collective)."""
    import torch

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    from megatron_bar import platform

    local = 0
    for value in nested_values(sharded_state_dict):
        data = getattr(value, "data", None)
        if isinstance(data, torch.Tensor) and is_main_replica(getattr(value, "replica_id", 0)):
            local += data.numel() * data.element_size()
    total = torch.tensor([local], dtype=torch.float64, device=platform.device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return int(total.item())


def save_sharded(sharded_state_dict: dict, directory: str | Path) -> None:
    """megatron's ``dist_checkpointing.save`` (torch_dist format, synchronous).

    megatron-core's torch_dist writer passes its write results through a queue built for
    asynchronous saves: a multiprocessing Manager served by a *spawned* process, a fresh
    interpreter whose start the first save of every process pays (seconds of CPU, longer
    than a whole demo stage's training; bench/README.md, "Figures behind design choices").
    Every save here is synchronous (the results are put and taken in this process), so an
    in-process queue carries them; the format written is unchanged. Set once per process, before the first save creates the Manager.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(sharded_state_dict, str(directory))


def save_model(model, cfg: ModelConfig, directory: str | Path, write_extra=None) -> Path:
    """Write ``model`` (this rank's shards; every rank calls) to ``directory``, atomically.

    ``write_extra(tmp_dir)`` runs on rank 0 before the rename, for files that belong with
    the weights (the tokenizer, a manifest).
    """
    directory = Path(directory)
    rank0 = dist.get_rank() == 0
    state = model.sharded_state_dict()
    with atomic_output_dir(directory, is_writer=rank0, barrier=dist.barrier,
                           need_bytes=sharded_bytes(state)) as tmp:
        save_sharded(state, tmp)
        if rank0:
            cfg.save(tmp)
            if write_extra:
                write_extra(tmp)
    return directory


def check_checkpoint_files(ckpt_dir: Path) -> None:
    """Every file of the dist checkpoint in ``ckpt_dir`` is there at its full length.

    Without this, a missing or cut-short file surfaces from deep inside megatron / torch
    distributed checkpointing as a multi-rank traceback that does not say which file.
    """
    ckpt_dir = Path(ckpt_dir)
    marker = ckpt_dir / "metadata.json"
    if not marker.is_file():
        raise CheckpointMismatch(f"{marker}: not found - {ckpt_dir} holds no megatron dist checkpoint")
    index = ckpt_dir / ".metadata"
    if not index.is_file():
        raise CheckpointMismatch(f"{index}: not found - the checkpoint in {ckpt_dir} is incomplete")
    try:
        backends = json.loads(marker.read_text())
        meta = FileSystemReader(str(ckpt_dir)).read_metadata()
    except Exception as e:  # JSON, pickle and torch errors alike: the file is damaged
        raise CheckpointMismatch(f"{ckpt_dir}: unreadable checkpoint metadata ({e})") from None
    needed = {"common.pt": 0} if backends.get("common_backend") == "torch" else {}
    for info in meta.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointMismatch(f"{path}: missing - the checkpoint in {ckpt_dir} is incomplete")
        if path.stat().st_size < size:
            raise CheckpointMismatch(
                f"{path}: truncated ({path.stat().st_size} bytes, the checkpoint metadata "
                f"needs {size})"
            )


def load_weights(model, cfg: ModelConfig, directory: str | Path) -> None:
    """Load the checkpoint in ``directory`` into ``model`` (any parallel layout)."""
    directory = Path(directory)
    check_same_architecture(cfg, ModelConfig.load(directory), str(directory))
    check_checkpoint_files(directory)
    request = model.sharded_state_dict()
    loaded = dist_checkpointing.load(request, str(directory))
    # A training checkpoint also carries optimizer state; megatron returns its common
    # (non-sharded) part with every load, so keep just the model's keys.
    model.load_state_dict({k: loaded[k] for k in request}, strict=True)
