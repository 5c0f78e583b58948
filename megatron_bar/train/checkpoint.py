"""Training checkpoints: everything needed to continue exactly where a run stopped.

``<dir>/iter_0000100/`` is one megatron dist checkpoint holding the model, the optimizer
state and every rank's RNG state, plus ``model_config.json`` and ``tokenizer/`` (so the
folder is also a plain model checkpoint for ``load_model`` and the convert tools) and
``train_state.json`` (step, consumed samples, LR scheduler). It is written to a temporary
folder and renamed when complete; ``<dir>/latest`` names the newest complete checkpoint
and is replaced (atomically) only after the rename, so a kill at any moment leaves the
previous checkpoint as the one a restart resumes from. The last ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_bar.model.checkpoint import check_checkpoint_files, save_sharded, sharded_bytes
from megatron_bar.model.config import ModelConfig
from megatron_bar.utils.fs import atomic_output_dir

log = logging.getLogger(__name__)

LATEST = "latest"
TRAIN_STATE = "train_state.json"


def iteration_dir(root: Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    path = Path(root) / marker.read_text().strip()
    if not (path / TRAIN_STATE).is_file():
        raise FileNotFoundError(f"{marker} names {path.name}, which is not a complete checkpoint")
    return path


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model, optimizer, rng: dict | None = None, world: int | None = None,
                   is_loading: bool = False):
    # The optimizer's state is keyed per layer and per expert ("singleton" shards): a frozen
    # anchor expert has no optimizer state, and megatron's stacked [layers, experts, ...]
    # keys cannot describe a stack with a hole in it.
    per_tensor = model.sharded_state_dict(metadata={"singleton_local_shards": True})
    # The distributed optimizer (the GPU default) takes its format from the metadata; its
    # default in megatron-core 0.16 ('fully_sharded_model_space') writes flattened ranges
    # that 0.16's own dist checkpointing rejects (seen on an H200). 'fully_reshardable'
    # also reloads at another DP / TP. Optimizers that are not distributed ignore it.
    optim_metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    state = {"model": model.sharded_state_dict(),
             "optimizer": optimizer.sharded_state_dict(per_tensor, is_loading=is_loading,
                                                       metadata=optim_metadata)}
    rank, world = dist.get_rank(), world or dist.get_world_size()
    state["rng"] = ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0)
    return state


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    root: str | Path,
    step: int,
    model,
    optimizer,
    train_state: dict,
    model_cfg: ModelConfig,
    tokenizer=None,
    keep_last: int = 2,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Every rank calls. Returns the checkpoint folder. ``extra_files``: name -> text,
    written by rank 0 into the checkpoint (a merged model's ``bar_manifest.json``)."""
    root = Path(root)
    final = iteration_dir(root, step)
    rank0 = dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        current = latest_checkpoint(root)
        if final.exists() and final != current:
            # Complete but never made `latest`: a run killed between rename and marker.
            shutil.rmtree(final)
    dist.barrier()
    state = _sharded_state(model, optimizer, _rng_state())
    with atomic_output_dir(final, is_writer=rank0, barrier=dist.barrier,
                           need_bytes=sharded_bytes(state)) as tmp:
        save_sharded(state, tmp)
        if rank0:
            model_cfg.save(tmp)
            if tokenizer is not None:
                tokenizer.save(tmp / "tokenizer")
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            (tmp / TRAIN_STATE).write_text(
                json.dumps({**train_state, "world_size": dist.get_world_size()}, indent=2)
            )
    if rank0:
        _write_text_atomic(root / LATEST, final.name + "\n")
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if (p / TRAIN_STATE).is_file())
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Load model, optimizer and (same world size only) RNG state; returns the train state."""
    check_checkpoint_files(path)
    train_state = json.loads((path / TRAIN_STATE).read_text())
    same_world = train_state.get("world_size") == dist.get_world_size()
    state = _sharded_state(model, optimizer, is_loading=True)
    if not same_world:
        log.warning("%s was written by %s ranks, this run has %d: RNG state not restored",
                    path, train_state.get("world_size"), dist.get_world_size())
        del state["rng"]
    loaded = dist_checkpointing.load(state, str(path))
    model.load_state_dict(loaded["model"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    if same_world:
        _set_rng_state(loaded["rng"])
    return train_state
