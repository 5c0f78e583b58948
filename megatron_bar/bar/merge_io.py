"""Megatron dist checkpoints read and written a stored chunk at a time (the merge).

Reading (:class:`CheckpointReader`): a box of a stored tensor, loaded with
``torch.distributed.checkpoint.load`` into the caller's tensor - as Megatron-LM's
``tools/checkpoint/dist_checkpoint_io.py`` loads whole tensors, with a load planner asking
for one box. Each box is checked for non-finite values and its largest magnitude kept per
tensor; each stored chunk's bytes are hashed (XXH3-128) for a content hash.

Writing (:func:`write_checkpoint`): megatron's ``dist_checkpointing.save`` of the sharded
state dict of the model built on the *meta* device - keys, shapes, chunks, ``common.pt`` and
``metadata.json`` are what megatron writes for that model, which loads at any TP / PP / EP -
with a save planner whose ``resolve_data`` hands torch's writer each chunk, made on threads
ahead of the writer.
"""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
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
from megatron_bar.model.builder import build_model
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


class _BoxLoadPlanner(DefaultLoadPlanner):
    """Loads box ``(offsets, sizes)`` of tensor ``key`` into ``out`` (a tensor of ``sizes``):
    torch's reader reads each stored chunk the box overlaps and copies its part into ``out``."""

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


class _MetadataReader(FileSystemReader):
    """torch's reader, with the ``.metadata`` read once for the many loads of a merge."""

    def __init__(self, path: str, metadata=None):
        super().__init__(path)
        self.metadata = metadata or super().read_metadata()

    def read_metadata(self, *args, **kwargs):
        return self.metadata


class CheckpointReader:
    """One megatron_bar checkpoint folder, read a box at a time into the caller's tensor.

    Every box read is scanned for non-finite values and its largest magnitude kept per
    tensor; a box that is one whole stored chunk is hashed (XXH3-128) for the content hash,
    which reads the chunks no box covered."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: no such checkpoint folder")
        self.config = ModelConfig.load(self.dir)
        check_checkpoint_files(self.dir)
        self._metadata = _MetadataReader(str(self.dir)).metadata
        self._local, self._lock = threading.local(), threading.Lock()  # (a torch reader per thread)
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in self._metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        # key -> {stored chunk box: its digest, once read whole}
        self.digests = {k: {(tuple(c.offsets), tuple(c.sizes)): None for c in v.chunks}
                        for k, v in self.tensors.items()}
        self.max_abs: dict[str, float] = {}  # key -> largest |value| in the boxes read

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def keys(self) -> list[str]:
        return list(self.tensors)

    def chunks(self, key: str) -> list[Box]:
        """The boxes ``key`` is stored in."""
        return list(self.digests[key])

    def read(self, key: str, offsets: Sequence[int], sizes: Sequence[int],
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Box ``(offsets, sizes)`` of ``key`` (global coordinates), into ``out`` if given."""
        box = (tuple(offsets), tuple(sizes))
        t = torch.empty(box[1], dtype=self.dtype(key)) if out is None else out
        covered = sum(math.prod(p[1]) for c in self.digests[key] if (p := intersect(box, c)) is not None)
        if covered != math.prod(box[1]):
            raise ValueError(f"{self.dir}: tensor {key!r} is not stored whole (box {list(box[0])} "
                             f"of {list(box[1])} is {covered} of {math.prod(box[1])} values)")
        if not hasattr(self._local, "reader"):
            self._local.reader = _MetadataReader(str(self.dir), self._metadata)
        dcp.load({key: t}, storage_reader=self._local.reader, planner=_BoxLoadPlanner(key, box, t), no_dist=True)
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t)
            top = max(-float(lo), float(hi))
            if not math.isfinite(top):
                raise NonFiniteValue(f"{self.dir}: tensor {key!r} holds a non-finite value ({top}) in its stored "
                                     f"chunk at {list(box[0])} - a corrupt checkpoint")
            with self._lock:
                self.max_abs[key] = max(self.max_abs.get(key, 0.0), top)
        if self.digests[key].get(box, b"") is None:
            self.digests[key][box] = xxhash.xxh3_128_digest(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        return t

    def content_hash(self, keys: Sequence[str] | None = None) -> str:
        """XXH3-128 of ``keys`` (default all) as stored: each stored chunk's key, box, dtype
        and bytes, in key and offset order. Chunks not read whole yet are read now."""
        h = xxhash.xxh3_128()
        for key in sorted(self.tensors if keys is None else keys):
            for box in sorted(self.digests[key]):
                if self.digests[key][box] is None:
                    self.read(key, *box)
                h.update(f"{key}|{list(box[0])}|{list(box[1])}|{self.dtype(key)}|".encode())
                h.update(self.digests[key][box])
        return HASH_PREFIX + h.hexdigest()


# -- the model megatron saves -------------------------------------------------------------


_MODELS: dict[tuple[str, torch.dtype], torch.nn.Module] = {}


def _sharded_meta_model(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """The sharded state dict of the TP=PP=EP=1 model of ``cfg``, on the meta device (the
    model kept per config: a merge asks for the same several times)."""
    ident = (json.dumps(cfg.to_dict(), sort_keys=True), dtype)
    if ident not in _MODELS:
        platform.initialize()
        _MODELS[ident] = build_model(cfg, params_dtype=dtype, perform_initialization=False, device="meta")
    return _MODELS[ident].sharded_state_dict()


def expected_tensors(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (global shape, dtype) of every tensor megatron saves for ``cfg``."""
    out = {}
    for v in nested_values(_sharded_meta_model(cfg, dtype)):
        if isinstance(v, ShardedTensorFactory):  # stored under its key, at its tensor's shape
            sh = next(iter(nested_values(v.build())))
            out[v.key] = (tuple(sh.global_shape), v.data.dtype)
        elif isinstance(v, ShardedTensor):
            out[v.key] = (tuple(v.global_shape), v.data.dtype)
    return out


class _Ahead:
    """``fill`` of the writer's chunks in the writer's order, AHEAD of them made at a time on
    threads of their own while the writer writes; ``done(chunk)`` once one is written."""

    AHEAD = 2

    def __init__(self, fill: Callable, done: Callable | None, order: list[tuple]):
        self.fill, self.done, self.order = fill, done, order
        self.index = {item: i for i, item in enumerate(order)}
        self.threads = ThreadPoolExecutor(self.AHEAD, thread_name_prefix="merge-fill")
        self.made: dict[int, Future] = {}
        self.next, self.writing = 0, None

    def get(self, item: tuple) -> torch.Tensor:
        if self.writing is not None and self.done is not None:
            self.done(self.writing)
        i = self.index.get(item, -1)
        if i not in self.made and i < self.next:  # (not the order expected: made now)
            self.writing = self.fill(*item)
            return self.writing
        self.next = max(self.next, i)
        while self.next < min(i + 1 + self.AHEAD, len(self.order)):
            self.made[self.next] = self.threads.submit(self.fill, *self.order[self.next])
            self.next += 1
        self.writing = self.made.pop(i).result()
        return self.writing

    def close(self) -> None:
        self.threads.shutdown(wait=True, cancel_futures=True)


class _LazySavePlanner(MCoreSavePlanner):
    """megatron's save planner, except that a tensor chunk is ``fill(key, offsets, sizes)``,
    made ahead of the writer (:class:`_Ahead`)."""

    def __init__(self, fill: Callable, done: Callable | None, **kwargs):
        super().__init__(**kwargs)
        self.fill, self.done, self.ahead = fill, done, None

    def finish_plan(self, new_plan):
        plan = super().finish_plan(new_plan)
        # torch's writer with one thread writes the tensor items in the plan's order
        tensors = [self._item(wi) for wi in plan.items if wi.type != WriteItemType.BYTE_IO]
        self.ahead = _Ahead(self.fill, self.done, tensors)
        return plan

    @staticmethod
    def _item(write_item) -> tuple:
        chunk = write_item.tensor_data.chunk
        return write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes)

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self.ahead.get(self._item(write_item)) if self.ahead else self.fill(*self._item(write_item))


class _LazySaveStrategy(SaveShardedStrategy):
    """megatron's torch_dist format, written by torch's FileSystemWriter one chunk at a time."""

    def __init__(self, fill: Callable, done: Callable | None):
        super().__init__("torch_dist", 1)
        self.fill, self.done = fill, done

    @property
    def can_handle_sharded_objects(self):
        return True

    def save(self, sharded_state_dict, checkpoint_dir):
        by_key: dict[str, list] = {}  # what megatron's torch strategy stores under each key
        for v in nested_values(sharded_state_dict):
            by_key.setdefault(v.unique_key if isinstance(v, ShardedObject) else v.key, []).append(v)
        planner = _LazySavePlanner(self.fill, self.done, dedup_replicated_tensors=False, flatten_state_dict=False)
        try:
            dcp.save(mcore_to_pyt_state_dict(by_key, False), planner=planner,
                     storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1, per_thread_copy_ahead=0),
                     no_dist=True)  # (one process writes: no plans exchanged through the process group)
        finally:
            if planner.ahead is not None:
                planner.ahead.close()


def write_checkpoint(cfg: ModelConfig, dtype: torch.dtype, directory: Path, fill: Callable,
                     done: Callable | None = None) -> None:
    """Write the dist checkpoint of ``cfg`` into the existing folder ``directory``, each
    chunk ``fill(key, offsets, sizes)`` (a tensor of ``sizes``, in the global coordinates
    megatron stores ``key`` in), called once per chunk, on threads of their own and a few
    chunks ahead of the writer; ``done(chunk)`` once the writer has written it."""
    try:
        dist_checkpointing.save(_sharded_meta_model(cfg, dtype), str(directory),
                                sharded_strategy=_LazySaveStrategy(fill, done))
    except CheckpointException as e:
        # torch wraps what failed (a full disk, a bad input) with its rank's traceback; the
        # error itself is what the caller can act on
        inner = [f[0] for f in e.failures.values() if isinstance(f, tuple) and f and isinstance(f[0], BaseException)]
        inner += [f for f in e.failures.values() if isinstance(f, BaseException)]
        if not inner:
            raise
        raise inner[0] from None
    cfg.save(directory)
