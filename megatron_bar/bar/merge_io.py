"""Megatron dist checkpoints read and written a stored chunk at a time (the merge).

Reading (:class:`CheckpointReader`): a box of a stored tensor, loaded with
``torch.distributed.checkpoint.load`` into a buffer - as Megatron-LM's
``tools/checkpoint/dist_checkpoint_io.py`` loads whole tensors, with a load planner asking
for one box. Each stored chunk loaded is checked for non-finite values, its largest
magnitude kept per tensor, and its bytes hashed (XXH3-128) for a content hash.

Writing (:func:`write_checkpoint`): megatron's ``dist_checkpointing.save`` of the sharded
state dict of the model built on the *meta* device - keys, shapes, chunks, ``common.pt`` and
``metadata.json`` are what megatron writes for that model, which loads at any TP / PP / EP -
with a save planner whose ``resolve_data`` makes each chunk when torch's writer writes it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed.checkpoint as dcp
import xxhash
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner, mcore_to_pyt_state_dict
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_bar import platform
from megatron_bar.model.checkpoint import check_checkpoint_files
from megatron_bar.model.config import ModelConfig

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) in global coordinates
HASH_PREFIX = "xxh3-128:"


def local_slices(outer_off: Sequence[int], off: Sequence[int], sz: Sequence[int]) -> tuple[slice, ...]:
    """Box ``(off, sz)`` as slices of a tensor that holds the box starting at ``outer_off``."""
    return tuple(slice(o - b, o - b + s) for o, b, s in zip(off, outer_off, sz))


def intersect(a: Box, b: Box) -> Box | None:
    off = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    end = tuple(min(x + s, y + t) for x, s, y, t in zip(a[0], a[1], b[0], b[1]))
    if any(e <= o for o, e in zip(off, end)):
        return None
    return off, tuple(e - o for o, e in zip(off, end))


class NonFiniteValue(ValueError):
    pass


class Buffers:
    """Tensors kept for reuse by name, shape and dtype: a fresh large tensor costs its page
    faults each time (more than the copy into it), and the shapes of a checkpoint are few."""

    def __init__(self):
        self._kept: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        ident = (name, tuple(shape), dtype)
        if ident not in self._kept:
            self._kept[ident] = torch.empty(ident[1], dtype=dtype)
        return self._kept[ident]



class _BoxLoadPlanner(DefaultLoadPlanner):
    """Loads box ``(offsets, sizes)`` of tensor ``key`` into ``out`` (a tensor of ``sizes``)."""

    def __init__(self, key: str, box: Box, out: torch.Tensor):
        super().__init__()
        self.key, self.box, self.out = key, box, out

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata[self.key]
        chunk = ChunkStorageMetadata(torch.Size(self.box[0]), torch.Size(self.box[1]))
        return LoadPlan(create_read_items_for_chunk_list(self.key, md, [chunk]))

    def resolve_tensor(self, read_item) -> torch.Tensor:
        return self.out[tuple(slice(o, o + n) for o, n in zip(read_item.dest_offsets, read_item.lengths))]

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # (loaded in place)


class _CachedMetadataReader(FileSystemReader):
    """torch's reader, reading ``.metadata`` once for the many loads of a merge."""

    def read_metadata(self, *args, **kwargs):
        if not hasattr(self, "_metadata"):
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


@dataclass
class _Stored:
    box: Box
    digest: bytes | None = None


class CheckpointReader:
    """One megatron_bar checkpoint folder, read a box at a time. Reads load whole stored
    chunks (what torch's reader reads anyway); the last one is kept for the next read."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: no such checkpoint folder")
        self.config = ModelConfig.load(self.dir)
        check_checkpoint_files(self.dir)
        self._reader = _CachedMetadataReader(str(self.dir))
        meta = self._reader.read_metadata()
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        self._chunks = {k: [_Stored((tuple(c.offsets), tuple(c.sizes))) for c in v.chunks]
                        for k, v in self.tensors.items()}
        self.max_abs: dict[str, float] = {}  # key -> largest |value| in the chunks loaded

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def keys(self) -> list[str]:
        return list(self.tensors)

    # The last chunk loaded by any reader, in a buffer shared by all readers (what is kept
    # does not grow with the number of inputs): (reader, key, box, tensor).
    _last: tuple | None = None
    _buffers = Buffers()

    def _load(self, key: str, stored: _Stored) -> torch.Tensor:
        last = CheckpointReader._last
        if last is not None and last[0] is self and last[1:3] == (key, stored.box):
            return last[3]
        CheckpointReader._last = None
        t = self._buffers.get("load", stored.box[1], self.dtype(key))
        dcp.load({key: t}, storage_reader=self._reader, planner=_BoxLoadPlanner(key, stored.box, t), no_dist=True)
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t)
            top = max(-float(lo), float(hi))
            if not math.isfinite(top):
                raise NonFiniteValue(f"{self.dir}: tensor {key!r} holds a non-finite value ({top}) in its stored "
                                     f"chunk at {list(stored.box[0])} - a corrupt checkpoint")
            self.max_abs[key] = max(self.max_abs.get(key, 0.0), top)
        if stored.digest is None:
            stored.digest = xxhash.xxh3_128_digest(t.reshape(-1).view(torch.uint8).numpy())
        CheckpointReader._last = (self, key, stored.box, t)
        return t

    def read(self, key: str, offsets: Sequence[int], sizes: Sequence[int],
             out: torch.Tensor | None = None, shared: bool = False) -> torch.Tensor:
        """Box ``(offsets, sizes)`` of ``key`` (global coordinates), in ``out`` if given.
        ``shared``: a box that is one stored chunk may come back in the readers' shared
        buffer - read-only, and valid until the next read of any reader (no copy)."""
        box = (tuple(offsets), tuple(sizes))
        if out is None:
            whole = [s for s in self._chunks[key] if s.box == box]
            if whole and shared:
                return self._load(key, whole[0])
            out = torch.empty(box[1], dtype=self.dtype(key))
        covered = 0
        for stored in self._chunks[key]:
            part = intersect(box, stored.box)
            if part is not None:
                chunk = self._load(key, stored)
                out[local_slices(box[0], *part)] = chunk[local_slices(stored.box[0], *part)]
                covered += math.prod(part[1])
        if covered != math.prod(box[1]):
            raise ValueError(f"{self.dir}: tensor {key!r} is not stored whole (box {list(box[0])} "
                             f"of {list(box[1])} is {covered} of {math.prod(box[1])} values)")
        return out

    def content_hash(self, keys: Sequence[str] | None = None) -> str:
        """XXH3-128 of ``keys`` (default all) as stored: each stored chunk's key, box, dtype
        and bytes, in key and offset order. Chunks not read yet are read now."""
        h = xxhash.xxh3_128()
        for key in sorted(self.tensors if keys is None else keys):
            for stored in sorted(self._chunks[key], key=lambda s: s.box[0]):
                if stored.digest is None:
                    self._load(key, stored)
                h.update(f"{key}|{list(stored.box[0])}|{list(stored.box[1])}|{self.dtype(key)}|".encode())
                h.update(stored.digest)
        self.close()
        return HASH_PREFIX + h.hexdigest()

    def close(self) -> None:
        CheckpointReader._last = None
        self._buffers._kept.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- the model megatron saves -------------------------------------------------------------


def _sharded_meta_model(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """The sharded state dict of the TP=PP=EP=1 model of ``cfg``, on the meta device."""
    from megatron_bar.model.builder import build_model

    platform.initialize()
    return build_model(cfg, params_dtype=dtype, perform_initialization=False, device="meta").sharded_state_dict()


_EXPECTED: dict[tuple[str, torch.dtype], dict] = {}


def expected_tensors(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (global shape, dtype) of every tensor megatron saves for ``cfg`` (kept per
    config: a merge asks for the same several times)."""
    ident = (json.dumps(cfg.to_dict(), sort_keys=True), dtype)
    if ident not in _EXPECTED:
        out = {}
        for v in nested_values(_sharded_meta_model(cfg, dtype)):
            if isinstance(v, ShardedTensorFactory):  # stored under its key, at its tensor's shape
                sh = next(iter(nested_values(v.build())))
                out[v.key] = (tuple(sh.global_shape), v.data.dtype)
            elif isinstance(v, ShardedTensor):
                out[v.key] = (tuple(v.global_shape), v.data.dtype)
        _EXPECTED[ident] = out
    return dict(_EXPECTED[ident])


class _LazySavePlanner(MCoreSavePlanner):
    """megatron's save planner, except that a tensor chunk is ``fill(key, offsets, sizes)``,
    called when the writer writes it."""

    def __init__(self, fill: Callable, **kwargs):
        super().__init__(**kwargs)
        self.fill = fill

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        chunk = write_item.tensor_data.chunk
        return self.fill(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes))


class _LazySaveStrategy(SaveShardedStrategy):
    """megatron's torch_dist format, written by torch's FileSystemWriter one chunk at a time."""

    def __init__(self, fill: Callable):
        super().__init__("torch_dist", 1)
        self.fill = fill

    @property
    def can_handle_sharded_objects(self):
        return True

    def save(self, sharded_state_dict, checkpoint_dir):
        by_key: dict[str, list] = {}  # what megatron's torch strategy stores under each key
        for v in nested_values(sharded_state_dict):
            by_key.setdefault(v.unique_key if isinstance(v, ShardedObject) else v.key, []).append(v)
        dcp.save(mcore_to_pyt_state_dict(by_key, False),
                 # (one chunk resolved at a time, written before the next is made)
                 storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1, per_thread_copy_ahead=0),
                 planner=_LazySavePlanner(self.fill, dedup_replicated_tensors=False, flatten_state_dict=False))


def write_checkpoint(cfg: ModelConfig, dtype: torch.dtype, directory: Path, fill: Callable) -> None:
    """Write the dist checkpoint of ``cfg`` into the existing folder ``directory``, each
    chunk ``fill(key, offsets, sizes)`` (a tensor of ``sizes``, in the global coordinates
    megatron stores ``key`` in), called once per chunk, in turn."""
    try:
        dist_checkpointing.save(_sharded_meta_model(cfg, dtype), str(directory),
                                sharded_strategy=_LazySaveStrategy(fill))
    except CheckpointException as e:
        # torch wraps what failed (a full disk, a bad input) with its rank's traceback; the
        # error itself is what the caller can act on
        inner = [f[0] for f in e.failures.values() if isinstance(f, tuple) and f and isinstance(f[0], BaseException)]
        inner += [f for f in e.failures.values() if isinstance(f, BaseException)]
        if not inner:
            raise
        raise inner[0] from None
    cfg.save(directory)
