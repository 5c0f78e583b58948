"""Streaming access to megatron dist checkpoints, for tools that must not hold a model.

Reading (:class:`CheckpointReader`): any box of a stored tensor, in global coordinates,
read straight from the ``.distcp`` files. A torch_dist checkpoint stores each chunk as a
``torch.save`` archive (an uncompressed zip); the reader finds where the chunk's raw bytes
start (torch's own zip reader) and ``pread``s only the rows asked for, so a caller can walk
a 1 GB embedding in 4 MB blocks - or, with :meth:`CheckpointReader.view`, maps those rows
read-only (``mmap``: no copy; the merge reads its inputs this way, a bounded number of
mappings alive at once). Chunks stored in an unusual way (a view with strides, a
storage transform) fall back to ``torch.load`` of that one chunk. The reader also hashes
every chunk's bytes as they go by (XXH3-128, on a background thread), for a content hash of
the checkpoint's tensors that does not depend on how they are laid out in files.

Writing (:func:`write_checkpoint`): megatron's own ``dist_checkpointing.save`` of the
``sharded_state_dict`` of a model built on the *meta* device, so keys, global shapes,
chunking, sharded objects, ``common.pt`` and ``metadata.json`` are exactly what megatron
writes for that model - with a save strategy whose planner computes each chunk only when
the writer asks for it (``resolve_data``) and a writer that writes chunks one at a time and
keeps none. A chunk that is a stored input chunk unchanged is copied as its stored archive.
The output data file is written with ``O_DIRECT`` where the filesystem takes it (a stored
archive straight from the input's mapping: no copy into the page cache), else through the
page cache (``copy_file_range``). Chunks are computed on a thread ahead of the writer:
one ahead, or as far as the caller's memory for them lets it (the merge's
:class:`ChunkRing`, 1.5 times the largest chunk); reused buffers (:class:`Buffers`) keep the
resident size flat.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import errno
import io
import json
import math
import mmap
import os
import pickle
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import xxhash
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo, _write_item
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from megatron_bar import platform
from megatron_bar.model.checkpoint import CheckpointMismatch, check_checkpoint_files
from megatron_bar.model.config import ModelConfig

# A block read or computed at once; what a merge holds per input is about this much.
BLOCK_BYTES = 4 << 20
# Mapped input bytes whose hashing may be pending at once (see BackgroundQueue.submit_mapped):
# what a view keeps resident beyond its use is bounded by this, whatever the model or K.
MAPPED_BACKLOG_BYTES = 16 << 20
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) in global coordinates


# -- boxes --------------------------------------------------------------------------------


def _intersect(a_off, a_sz, b_off, b_sz):
    off, sz = [], []
    for ao, asz, bo, bsz in zip(a_off, a_sz, b_off, b_sz):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        off.append(lo)
        sz.append(hi - lo)
    return tuple(off), tuple(sz)


def local_slices(outer_off, off, sz) -> tuple[slice, ...]:
    """Index of box ``(off, sz)`` inside a tensor holding the box that starts at ``outer_off``."""
    return tuple(slice(o - oo, o - oo + s) for o, oo, s in zip(off, outer_off, sz))


def row_blocks(offsets, sizes, itemsize: int, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, Box]]:
    """Split a box into blocks of about ``block_bytes`` along its first axis longer than 1.

    Yields ``(axis, (offsets, sizes))``; every block of a contiguous tensor holding the box
    is a contiguous slice of it (the axes before ``axis`` have length 1).
    """
    offsets, sizes = tuple(offsets), tuple(sizes)
    axis = next((i for i, s in enumerate(sizes) if s > 1), max(len(sizes) - 1, 0))
    if not sizes:
        yield 0, (offsets, sizes)
        return
    row = itemsize
    for s in sizes[axis + 1:]:
        row *= s
    step = max(1, block_bytes // max(row, 1))
    for r0 in range(0, sizes[axis], step):
        r1 = min(sizes[axis], r0 + step)
        off = list(offsets)
        sz = list(sizes)
        off[axis] += r0
        sz[axis] = r1 - r0
        yield axis, (tuple(off), tuple(sz))


def _contiguous_runs(chunk_sz, off, sz) -> Iterator[tuple[int, int, tuple]]:
    """Contiguous element runs of box ``(off, sz)`` of a row-major tensor of shape ``chunk_sz``.

    Yields ``(first_element, n_elements, index_of_the_run_in_the_box)``.
    """
    n = len(chunk_sz)
    s = n  # dims s.. are covered fully
    while s > 0 and off[s - 1] == 0 and sz[s - 1] == chunk_sz[s - 1]:
        s -= 1
    strides = [1] * n
    for d in range(n - 2, -1, -1):
        strides[d] = strides[d + 1] * chunk_sz[d + 1]
    if s == 0:
        total = 1
        for x in chunk_sz:
            total *= x
        yield 0, total, tuple(slice(None) for _ in range(n))
        return
    k = s - 1  # the dim where a run is a range
    run = sz[k] * (strides[k] if n else 1)
    outer = [range(sz[d]) for d in range(k)]

    def rec(d, idx, base):
        if d == k:
            first = base + off[k] * strides[k]
            yield first, run, tuple(idx) + (slice(None),) * (n - k)
            return
        for i in outer[d]:
            yield from rec(d + 1, idx + [i], base + (off[d] + i) * strides[d])

    yield from rec(0, [], 0)


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


_FROMBUFFER_WARNED = False


def _frombuffer(buf, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    """``torch.frombuffer`` of a read-only buffer (a mapping), without torch's one-time
    warning that the tensor would be writable: the caller does not write to it."""
    global _FROMBUFFER_WARNED
    if not _FROMBUFFER_WARNED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)
        _FROMBUFFER_WARNED = True
        return t
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)


class Buffers:
    """Reusable memory. Fresh allocations of tens of MB cost page faults on every use
    (glibc maps and unmaps them), often more than the arithmetic on them; these are
    faulted in once and reused, which also keeps the resident size flat."""

    def __init__(self):
        self._bufs: dict[object, torch.Tensor] = {}

    def get(self, name, sizes, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``sizes`` in buffer ``name`` (contents undefined)."""
        n = torch.empty((), dtype=dtype).element_size()
        for s in sizes:
            n *= s
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n:
            wait_for_hashes(memory_only=True)
            buf = self._bufs[name] = torch.empty(max(n, 1), dtype=torch.uint8)
        return buf[:n].view(dtype).view(tuple(sizes))


class ChunkRing:
    """Memory for output chunks computed ahead of the writer: one buffer, carved in turn,
    so that many small chunks can be computed ahead as well as one large one. Chunks may
    be given back in any order; their room is reused once every older chunk is back too
    (the writer writes chunks mostly in the order they were taken).

    Its size is 1.5 times the largest chunk asked for - the largest chunk and room for
    smaller ones beside it (measured: as fast as twice, and 1.25 times is slower) - so
    memory stays flat whatever the model; it is faulted in once and reused. :meth:`take`
    waits while the chunk does not fit; :meth:`close` wakes and fails the waiting ones
    (the writer has stopped)."""

    _ALIGN = 64
    _LARGEST = 1.5  # ring size / largest chunk

    def __init__(self):
        self._buf: torch.Tensor | None = None
        self._mem: memoryview | None = None
        self._live: collections.deque = collections.deque()  # [start, nbytes, given back]
        self._head = 0  # where the next chunk goes
        self._cv = threading.Condition()
        self._closed = False

    def _size(self, n: int) -> int:
        return -(-int(self._LARGEST * n) // self._ALIGN) * self._ALIGN

    def _fits(self, n: int) -> int | None:
        """Where a chunk of ``n`` bytes goes now, or None (no room yet)."""
        if not self._live:
            return 0
        tail = self._live[0][0]  # the oldest chunk not given back
        if self._head > tail:  # live chunks in one run [tail, head): room after, or at 0
            if self._head + n <= len(self._mem):
                return self._head
            return 0 if n <= tail else None
        return self._head if self._head + n <= tail else None  # wrapped: room in [head, tail)

    def take(self, sizes, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``sizes`` whose storage is exactly its bytes (``torch.save`` writes
        the whole storage); waits for room."""
        n = math.prod(sizes) * torch.empty((), dtype=dtype).element_size()
        if n == 0:
            return torch.empty(tuple(sizes), dtype=dtype)
        need = -(-n // self._ALIGN) * self._ALIGN
        with self._cv:
            while True:
                if self._closed:
                    raise RuntimeError("the checkpoint writer has stopped")
                if self._mem is None or self._size(need) > len(self._mem):
                    if not self._live:  # (re)sized while empty, for the largest chunk yet
                        wait_for_hashes(memory_only=True)
                        self._buf = torch.empty(self._size(need), dtype=torch.uint8)
                        self._mem = memoryview(self._buf.numpy()).cast("B")
                        self._head = 0
                        continue
                else:
                    at = self._fits(need)
                    if at is not None:
                        break
                self._cv.wait()
            self._live.append([at, need, False])
            self._head = at + need
        t = torch.frombuffer(self._mem[at:at + n], dtype=dtype).view(tuple(sizes))
        # the memory may still be hashed from reads into the chunk it held before
        wait_for_hashes(t)
        return t

    def give(self, t: torch.Tensor) -> None:
        """Give back a chunk from :meth:`take` (no-op for any other tensor)."""
        if self._mem is None or not t.numel():
            return
        at = t.data_ptr() - self._buf.data_ptr()
        with self._cv:
            for region in self._live:
                if region[0] == at:
                    region[2] = True
                    break
            else:
                return
            while self._live and self._live[0][2]:
                self._live.popleft()
            if not self._live:
                self._head = 0
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


# -- reading ------------------------------------------------------------------------------


class _FileSlice(io.RawIOBase):
    """A read-only window ``[start, start + length)`` of an open file, as a file."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        if n == 0:
            return 0
        got = os.preadv(self.fd, [memoryview(b)[:n]], self.start + self.pos)
        self.pos += got
        return got


class _StorageRef:
    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    def __init__(self, storage, storage_offset, size, stride):
        self.storage, self.storage_offset = storage, storage_offset
        self.size, self.stride = tuple(size), tuple(stride)


def _rebuild(storage, storage_offset, size, stride, *args, **kwargs):
    return _TensorRef(storage, storage_offset, size, stride)


class _LayoutUnpickler(pickle.Unpickler):
    """Reads the ``data.pkl`` of a saved tensor without touching its data: which storage
    record, dtype, offset, shape and strides. Anything but a plain tensor is refused."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        typename, storage_type, key, _location, numel = pid
        if typename != "storage":
            raise pickle.UnpicklingError(typename)
        return _StorageRef(key, storage_type.dtype, numel)


@dataclass
class _Chunk:
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    blob_offset: int
    blob_length: int
    transformed: bool
    data_offset: int | None = None  # absolute offset of the raw bytes in ``file``; None: use torch.load
    resolved: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n


# The content hash: XXH3 with 128 bits. It identifies an input (which checkpoint, which
# bytes went into a merge) and tells any change to it, as rsync's xxh128 does for files;
# it is not a defence against someone forging a checkpoint on purpose (whoever can write
# the checkpoints can write the manifest too). Every input byte is hashed, so the hash's
# speed is a merge's: XXH3 runs at memory speed (13 GB/s here), where BLAKE3, the fastest
# cryptographic hash, cost a merge of two 360 MB experts 0.2 s of CPU of its 1.7 s.
# Content hashes are written as "xxh3-128:<hex>", so the algorithm is on record.
HASH_ALGORITHM = "xxh3-128"


def _new_hash():
    return xxhash.xxh3_128()


class _ChunkHasher:
    """The hash (:data:`HASH_ALGORITHM`) of a chunk's raw bytes, fed in order as reads go by."""

    def __init__(self):
        self.h = _new_hash()
        self.pos = 0  # bytes hashed so far
        self.gap = False  # a read skipped ahead: hash again at the end
        self.queued = False  # a background job hashes it whole (hash_in_background)
        # the hash thread, the file-hash thread and a torch.load fallback may all feed one
        # chunk: one update at a time, or the digest would depend on their interleaving
        self._lock = threading.Lock()

    def update(self, start: int, data: memoryview):
        with self._lock:
            if self.gap or start > self.pos:
                self.gap = True
                return
            end = start + len(data)
            if end <= self.pos:
                return
            self.h.update(data[self.pos - start:])
            self.pos = end


class BackgroundQueue:
    """Jobs on one background thread, in submission order: the merge's hashes (the hash
    releases the GIL) and its output's writes (:class:`_OutputFile`).

    A job works on memory the caller still owns: before that memory is written again,
    :meth:`wait_overlapping` (or :meth:`wait_all`) makes sure its jobs are done. A job on
    a file mapping (:meth:`submit_mapped`) keeps it alive until done; at most
    ``backlog_bytes`` of those may be pending. A job's error is raised (once) by the next
    submit or wait.
    """

    def __init__(self, name: str, backlog_bytes: int):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._backlog = backlog_bytes
        self._pending: list[tuple[int, int, object]] = []  # (first byte, end, future)
        self._mapped: collections.deque = collections.deque()  # (future, bytes) of mapped jobs
        self._error: BaseException | None = None  # of a finished job, not raised yet
        # the writer thread (copied chunks) and the compute thread (reads) both submit
        self._lock = threading.Lock()

    def _prune(self) -> None:
        """Drop finished jobs, keeping the first error (under the lock)."""
        running = []
        for p in self._pending:
            if not p[2].done():
                running.append(p)
            elif self._error is None and p[2].exception() is not None:
                self._error = p[2].exception()
        self._pending = running

    def _raise_error(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def submit(self, fn, lo: int, hi: int) -> None:
        with self._lock:
            self._prune()
            self._pending.append((lo, hi, self._pool.submit(fn)))
        self._raise_error()

    def submit_mapped(self, fn, nbytes: int):
        """A job on ``nbytes`` of a mapping that it keeps alive (and resident) until done;
        returns its future. Waits while more than the backlog of such jobs is pending, so
        that the mapped pages waiting for their job stay bounded."""
        with self._lock:
            self._prune()
            fut = self._pool.submit(fn)
            self._pending.append((0, 0, fut))
            self._mapped.append((fut, nbytes))
            while self._mapped and self._mapped[0][0].done():
                self._mapped.popleft()
            held = sum(n for _, n in self._mapped)
            oldest = list(self._mapped)
        self._raise_error()
        for f, n in oldest:
            if held <= self._backlog:
                break
            f.result()
            held -= n
        return fut

    def wait_overlapping(self, lo: int, hi: int) -> None:
        with self._lock:
            pending = list(self._pending)
        for a, b, fut in pending:
            if a < hi and lo < b:
                fut.result()

    def wait_all(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        first = None
        for _, _, fut in pending:  # (all of them, even after an error: their memory may go next)
            if fut.exception() is not None and first is None:
                first = fut.exception()
        with self._lock:
            error, self._error = self._error or first, None
        if error is not None:
            raise error

    def shutdown(self) -> None:
        """Wait for every job (errors are not raised) and stop the thread."""
        self._pool.shutdown(wait=True)
        with self._lock:
            self._pending, self._error = [], None
            self._mapped.clear()


_HASH_QUEUE: BackgroundQueue | None = None
_FILE_HASH_QUEUE: BackgroundQueue | None = None


def hash_queue() -> BackgroundQueue:
    """Hashes of bytes in memory (reads into buffers that will be reused)."""
    global _HASH_QUEUE
    if _HASH_QUEUE is None:
        _HASH_QUEUE = BackgroundQueue("merge-hash", MAPPED_BACKLOG_BYTES)
    return _HASH_QUEUE


def file_hash_queue() -> BackgroundQueue:
    """Hashes of stored chunks copied without being read here (read from their files on
    the hash thread). A queue of its own: a 100 MB expert chunk hashed from its file must
    not hold up the hashing of a 4 MB read buffer the merge waits to reuse."""
    global _FILE_HASH_QUEUE
    if _FILE_HASH_QUEUE is None:
        _FILE_HASH_QUEUE = BackgroundQueue("merge-hash", MAPPED_BACKLOG_BYTES)
    return _FILE_HASH_QUEUE


def wait_for_hashes(t: torch.Tensor | None = None, *, memory_only: bool = False) -> None:
    """Before writing into ``t``: finish the hashing of reads into it. Without ``t``:
    finish every hash (``memory_only``: of reads into memory only)."""
    q = hash_queue()
    if t is None:
        q.wait_all()
        if not memory_only:
            file_hash_queue().wait_all()
    elif t.numel():
        lo = t.data_ptr()
        q.wait_overlapping(lo, lo + t.numel() * t.element_size())


class CheckpointReader:
    """One megatron_bar checkpoint folder, read a box at a time."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: no such checkpoint folder")
        self.config = ModelConfig.load(self.dir)
        check_checkpoint_files(self.dir)
        meta = FileSystemReader(str(self.dir)).read_metadata()
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        self._chunks: dict[str, list[_Chunk]] = {}
        for key, tmeta in self.tensors.items():
            chunks = []
            for c in tmeta.chunks:
                info = meta.storage_data.get(MetadataIndex(key, c.offsets))
                if info is None:
                    raise CheckpointMismatch(f"{self.dir}: tensor {key!r} chunk {list(c.offsets)} has no stored data")
                chunks.append(_Chunk(
                    key, tuple(c.offsets), tuple(c.sizes), info.relative_path, info.offset,
                    info.length, bool(getattr(info, "transform_descriptors", None)),
                ))
            self._chunks[key] = chunks
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._hashers: dict[tuple, _ChunkHasher] = {}
        self._loaded: tuple | None = None  # (chunk id, tensor) of the last torch.load fallback
        self.bytes_read = 0
        self._closing = False
        _frombuffer(b"\0", torch.uint8, 1, 0)  # torch's one-time warning, silenced here on this thread

    # -- metadata

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def keys(self) -> list[str]:
        return list(self.tensors)

    def stored_chunks(self, key: str) -> list[Box]:
        return [(c.offsets, c.sizes) for c in self._chunks[key]]

    # -- data

    def _fd(self, name: str) -> int:
        with self._fd_lock:  # the writer thread copies stored chunks while reads go on
            if name not in self._fds:
                fd = self._fds[name] = os.open(self.dir / name, os.O_RDONLY)
                self._sizes[name] = os.fstat(fd).st_size
            return self._fds[name]

    def _map(self, c: "_Chunk", start: int, nbytes: int) -> tuple[mmap.mmap, int]:
        """A read-only mapping of bytes ``start .. start + nbytes`` of chunk ``c``'s file
        (absolute offsets), pages populated; returns it and where ``start`` is in it.

        Mapping page-cache pages costs a fraction of copying them (``pread``): the merge's
        inputs are read through mappings. A mapping is unmapped when the last reference to
        it (a tensor, a pending hash) goes."""
        fd = self._fd(c.file)
        if start + nbytes > self._sizes[c.file]:
            raise CheckpointMismatch(f"{self.dir / c.file}: unexpected end of file reading {c.key!r}")
        base = start - start % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(fd, start + nbytes - base, mmap.MAP_SHARED | _MAP_POPULATE, mmap.PROT_READ, offset=base)
        return m, start - base

    def _resolve(self, c: _Chunk) -> None:
        """Find where the chunk's raw bytes are (or decide on torch.load)."""
        if c.resolved:
            return
        # Threads read at once (the anchor check, the compute workers, the writer): a chunk
        # is marked resolved only once its data_offset is known - marked earlier, another
        # thread would take the torch.load path for it meanwhile. Resolving it twice gives
        # the same answer.
        if not c.transformed:
            c.data_offset = self._data_offset(c)
        c.resolved = True

    def _data_offset(self, c: _Chunk) -> int | None:
        """Where the chunk's raw bytes are in its file; None: use torch.load."""
        try:
            reader = torch._C.PyTorchFileReader(_FileSlice(self._fd(c.file), c.blob_offset, c.blob_length))
            if bytes(reader.get_record("byteorder")) != b"little" and reader.has_record("byteorder"):
                return None
            ref = _LayoutUnpickler(io.BytesIO(bytes(reader.get_record("data.pkl")))).load()
            dtype = self.dtype(c.key)
            if not isinstance(ref, _TensorRef) or ref.storage.dtype != dtype or ref.size != c.sizes:
                return None
            expect = []
            acc = 1
            for s in reversed(c.sizes):
                expect.append(acc)
                acc *= s
            if any(s > 1 and st != e for s, st, e in zip(c.sizes, ref.stride, reversed(expect))):
                return None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if (ref.storage_offset + c.numel) > ref.storage.numel:
                return None
            rec = reader.get_record_offset(f"data/{ref.storage.key}")
            return c.blob_offset + rec + ref.storage_offset * itemsize
        except Exception:
            return None

    def _read_raw(self, c: _Chunk, first: int, dst: torch.Tensor, hash: bool = True) -> None:
        """Elements ``first .. first + dst.numel()`` of chunk ``c`` into contiguous ``dst``."""
        view = _as_bytes(dst)
        itemsize = dst.element_size()
        wait_for_hashes(dst)
        fd, pos, done = self._fd(c.file), c.data_offset + first * itemsize, 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], pos + done)
            if got <= 0:
                raise CheckpointMismatch(f"{self.dir / c.file}: unexpected end of file reading {c.key!r}")
            done += got
        self.bytes_read += done
        if len(view) and hash:
            hasher, start = self._hasher(c), first * itemsize
            lo = dst.data_ptr()
            hash_queue().submit(lambda: hasher.update(start, view), lo, lo + len(view))

    def _hasher(self, c: _Chunk) -> _ChunkHasher:
        ident = (c.key, c.offsets)
        h = self._hashers.get(ident)
        if h is None:  # (setdefault: two threads reading one chunk get the same hasher)
            h = self._hashers.setdefault(ident, _ChunkHasher())
        return h

    def _load_chunk(self, c: _Chunk) -> torch.Tensor:
        ident = (c.key, c.offsets)
        loaded = self._loaded  # (read once: another thread may replace it)
        if loaded is None or loaded[0] != ident:
            fd = self._fd(c.file)
            blob = bytearray(c.blob_length)
            view = memoryview(blob)
            done = 0
            while done < c.blob_length:
                got = os.preadv(fd, [view[done:]], c.blob_offset + done)
                if got <= 0:
                    raise CheckpointMismatch(f"{self.dir / c.file}: unexpected end of file reading {c.key!r}")
                done += got
            self.bytes_read += done
            t = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True).contiguous()
            del blob, view
            wait_for_hashes()
            h = self._hasher(c)
            if h.pos == 0 and not h.gap:
                h.update(0, _as_bytes(t))
            loaded = self._loaded = (ident, t)
        return loaded[1]

    def view(self, key: str, offsets: Sequence[int], sizes: Sequence[int], hash: bool = True) -> torch.Tensor | None:
        """The box ``(offsets, sizes)`` of ``key`` as a tensor on a read-only mapping of the
        file (no copy) - when it is one contiguous run of one plain stored chunk; else None
        (use :meth:`read`). The tensor must not be written to. ``hash`` as in :meth:`read`."""
        offsets, sizes = tuple(offsets), tuple(sizes)
        shape = self.shape(key)
        if len(offsets) != len(shape) or any(o < 0 or o + s > g for o, s, g in zip(offsets, sizes, shape)):
            raise CheckpointMismatch(f"{self.dir}: box {offsets}+{sizes} is outside {key!r} {list(shape)}")
        dtype = self.dtype(key)
        for c in self._chunks[key]:
            inter = _intersect(c.offsets, c.sizes, offsets, sizes)
            if inter is None:
                continue
            if inter != (offsets, sizes):
                return None  # the box spans chunks
            self._resolve(c)
            if c.data_offset is None:
                return None
            in_chunk = tuple(o - co for o, co in zip(offsets, c.offsets))
            runs = _contiguous_runs(c.sizes, in_chunk, sizes)
            first, count, _ = next(runs)
            if next(runs, None) is not None:
                return None
            itemsize = torch.empty((), dtype=dtype).element_size()
            nbytes = count * itemsize
            if nbytes == 0:
                return torch.empty(sizes, dtype=dtype)
            start = c.data_offset + first * itemsize
            m, delta = self._map(c, start, nbytes)
            t = _frombuffer(m, dtype, count, delta).view(sizes)
            self.bytes_read += nbytes
            if hash:
                hasher, rel = self._hasher(c), first * itemsize
                data = memoryview(m)[delta:delta + nbytes]
                hash_queue().submit_mapped(lambda: hasher.update(rel, data), nbytes)
            return t
        return None

    def read(self, key: str, offsets: Sequence[int], sizes: Sequence[int], out: torch.Tensor | None = None,
             hash: bool = True) -> torch.Tensor:
        """The box ``(offsets, sizes)`` of tensor ``key`` (global coordinates).

        ``hash=False``: leave these bytes out of the content hash (the caller knows their
        digest otherwise, see :meth:`adopt_hashes`)."""
        offsets, sizes = tuple(offsets), tuple(sizes)
        shape = self.shape(key)
        if len(offsets) != len(shape) or any(o < 0 or o + s > g for o, s, g in zip(offsets, sizes, shape)):
            raise CheckpointMismatch(f"{self.dir}: box {offsets}+{sizes} is outside {key!r} {list(shape)}")
        dtype = self.dtype(key)
        if out is None:
            out = torch.empty(sizes, dtype=dtype)
        covered = 0
        for c in self._chunks[key]:
            inter = _intersect(c.offsets, c.sizes, offsets, sizes)
            if inter is None:
                continue
            ioff, isz = inter
            n = 1
            for s in isz:
                n *= s
            covered += n
            dst = out[local_slices(offsets, ioff, isz)]
            in_chunk = tuple(o - co for o, co in zip(ioff, c.offsets))
            self._resolve(c)
            if c.data_offset is None:
                src = self._load_chunk(c)[local_slices((0,) * len(ioff), in_chunk, isz)]
                dst.copy_(src)
                continue
            for first, count, idx in _contiguous_runs(c.sizes, in_chunk, isz):
                target = dst[idx] if len(idx) else dst
                if target.is_contiguous() and target.dtype == dtype and target.numel() == count:
                    self._read_raw(c, first, target, hash)
                else:
                    tmp = torch.empty(count, dtype=dtype)
                    self._read_raw(c, first, tmp, hash)
                    target.copy_(tmp.view(target.shape))
        total = 1
        for s in sizes:
            total *= s
        if covered != total:
            raise CheckpointMismatch(f"{self.dir}: tensor {key!r} is not fully stored in box {offsets}+{sizes}")
        return out

    # -- whole stored chunks

    def stored_blob(self, key: str, offsets, sizes) -> "StoredBlob | None":
        """The stored ``torch.save`` archive of exactly the box ``(offsets, sizes)``, when
        the checkpoint stores that box as one plain contiguous chunk; else None.

        Such an archive can be copied as it is into another checkpoint for a chunk of the
        same shape and dtype (the archive does not record where the chunk sits)."""
        offsets, sizes = tuple(offsets), tuple(sizes)
        for c in self._chunks.get(key, []):
            if c.offsets == offsets and c.sizes == sizes:
                self._resolve(c)
                if c.data_offset is None:
                    return None
                return StoredBlob(self, c)
        return None

    def hash_in_background(self, c: "_Chunk") -> None:
        """Hash chunk ``c`` (unless done) on the hash thread, reading it there in blocks."""
        ident = (c.key, c.offsets)
        itemsize = torch.empty((), dtype=self.dtype(c.key)).element_size()
        nbytes = c.numel * itemsize
        h = self._hashers.get(ident)
        if h is not None and (h.gap or h.pos > 0 or h.queued):
            return  # being hashed (by reads or a job), or done; content_hash() completes the rest
        h = self._hashers[ident] = _ChunkHasher()
        h.queued = True
        start = c.data_offset

        def job():
            pos = 0
            while pos < nbytes:
                if self._closing:  # closed (an error, say): content_hash() is not coming
                    h.gap = True
                    return
                n = min(BLOCK_BYTES * 4, nbytes - pos)
                try:
                    m, delta = self._map(c, start + pos, n)
                except (OSError, ValueError, CheckpointMismatch):
                    h.gap = True  # content_hash() reads it again and reports the error
                    return
                data = memoryview(m)[delta:delta + n]
                h.update(pos, data)
                del data, m  # unmapped here
                pos += n

        file_hash_queue().submit(job, 0, 0)
        self.bytes_read += nbytes

    # -- content hash

    def adopt_hashes(self, key: str, other: "CheckpointReader", box_filter: Callable) -> int:
        """Take the chunk digests of ``other`` for the chunks of ``key`` that ``box_filter``
        accepts and that ``other`` stores in the same box and dtype - for bytes known to be
        identical (compared), so they need not be hashed twice. Returns how many."""
        wait_for_hashes(memory_only=True)  # (a chunk still being hashed from its file is not adopted)
        if other.dtype(key) != self.dtype(key):
            return 0
        theirs = {(c.offsets, c.sizes): c for c in other._chunks.get(key, [])}
        itemsize = torch.empty((), dtype=self.dtype(key)).element_size()
        n = 0
        for c in self._chunks[key]:
            o = theirs.get((c.offsets, c.sizes))
            if o is None or not box_filter(c.offsets, c.sizes):
                continue
            h = other._hashers.get((o.key, o.offsets))
            if h is None or h.gap or h.pos != o.numel * itemsize:
                continue
            mine = _ChunkHasher()
            mine.h, mine.pos = h.h.copy(), h.pos
            self._hashers[(c.key, c.offsets)] = mine
            n += 1
        return n

    def content_hash(self, keys: Sequence[str] | None = None) -> str:
        """``"xxh3-128:<hex>"``: :data:`HASH_ALGORITHM` over the model config and the
        bytes of every chunk of ``keys`` (default:
        all tensors), reading what no read has hashed yet. Independent of how the chunks
        are laid out in files."""
        top = _new_hash()
        top.update(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        self._loaded = None  # a cached chunk would not be hashed again
        wait_for_hashes()
        scratch = None
        for key in sorted(self._chunks if keys is None else keys):
            for c in sorted(self._chunks[key], key=lambda c: c.offsets):
                h = self._hasher(c)
                itemsize = torch.empty((), dtype=self.dtype(key)).element_size()
                if h.gap or h.pos < c.numel * itemsize:
                    h = self._hashers[(c.key, c.offsets)] = _ChunkHasher()
                    for _, (boff, bsz) in row_blocks(c.offsets, c.sizes, itemsize):
                        n = itemsize
                        for x in bsz:
                            n *= x
                        if scratch is None or scratch.numel() < n:
                            wait_for_hashes()
                            scratch = torch.empty(n, dtype=torch.uint8)
                        self.read(key, boff, bsz, out=scratch[:n].view(self.dtype(key)).view(bsz))
                    wait_for_hashes()
                    h = self._hashers[(c.key, c.offsets)]
                top.update(f"{key}|{list(c.offsets)}|{list(c.sizes)}|{self.dtype(key)}|".encode())
                top.update(h.h.digest())
        return f"{HASH_ALGORITHM}:" + top.hexdigest()

    def close(self) -> None:
        self._closing = True  # pending hashes of whole chunks stop
        wait_for_hashes()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._loaded = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- writing ------------------------------------------------------------------------------


_META_MODEL: tuple | None = None  # (config, dtype), model: the last one built


def meta_model(cfg: ModelConfig, dtype: torch.dtype):
    """The TP=PP=EP=1 megatron model of ``cfg`` with every parameter on the meta device.

    It holds no data; the last one is kept (a merge asks for the output's twice: for its
    tensor list and to save)."""
    global _META_MODEL
    from megatron_bar.model.builder import build_model

    platform.initialize()  # (again: the layout it was built in may have changed since)
    ident = (json.dumps(cfg.to_dict(), sort_keys=True), dtype)
    if _META_MODEL is None or _META_MODEL[0] != ident:
        _META_MODEL = ident, build_model(cfg, params_dtype=dtype, perform_initialization=False, device="meta")
    return _META_MODEL[1]


_EXPECTED_CACHE: dict[tuple[str, torch.dtype], dict] = {}


def expected_tensors(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (global shape, dtype) of every tensor megatron saves for ``cfg``.

    Building the meta model costs ~0.1 s; a merge asks for the same config several
    times, so the answer is kept per (config, dtype) - a fresh dict each call."""
    ident = (json.dumps(cfg.to_dict(), sort_keys=True), dtype)
    hit = _EXPECTED_CACHE.get(ident)
    if hit is None:
        hit = _EXPECTED_CACHE[ident] = _expected_tensors(cfg, dtype)
    return dict(hit)


def _expected_tensors(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for v in nested_values(meta_model(cfg, dtype).sharded_state_dict()):
        if isinstance(v, (ShardedTensor, ShardedTensorFactory)):
            data = v.data
            if isinstance(v, ShardedTensorFactory):
                # the factory's key is the stored key; its global shape is that of the
                # tensor it shards (experts and layers prepended)
                sh = v.build()
                sh = next(iter(nested_values(sh)))
                out[v.key] = (tuple(sh.global_shape), data.dtype)
            else:
                out[v.key] = (tuple(v.global_shape), data.dtype)
    return out


@dataclass
class StoredBlob:
    """A stored chunk to be copied into the output verbatim (see ``stored_blob``)."""

    reader: CheckpointReader
    chunk: _Chunk

    def copy_to(self, fd: int, pos: int) -> int:
        """Copy the archive to ``fd`` at ``pos`` (in the kernel where it can); its length."""
        c = self.chunk
        src = self.reader._fd(c.file)
        done = 0
        while done < c.blob_length:
            try:
                got = os.copy_file_range(src, fd, c.blob_length - done, c.blob_offset + done, pos + done)
            except OSError:
                got = 0
            if got <= 0:  # not supported here: through user space
                data = os.pread(src, min(c.blob_length - done, 64 << 20), c.blob_offset + done)
                if not data:
                    raise CheckpointMismatch(f"{self.reader.dir / c.file}: unexpected end of file")
                got = os.pwrite(fd, data, pos + done)
            done += got
        self.reader.hash_in_background(c)
        return c.blob_length


class ChunkSource(abc.ABC):
    """Where :func:`write_checkpoint` gets the chunks it writes.

    :meth:`fill` is all a source must have (a plain function ``fill(key, offsets, sizes)``
    is wrapped in one); the rest lets a source that copies stored chunks, computes a chunk
    ahead and bounds its own memory (the merge's composer) say so:

    * :meth:`stored`: the :class:`StoredBlob` that ``fill`` would return for a chunk, or
      None - asked without computing anything, so that stored chunks are copied while
      computed ones are being computed (and ``fill`` is not asked for them);
    * :attr:`first`: ``(key, offsets, sizes)`` of a chunk already being computed ahead: it
      is asked for first among the tensors (:meth:`drop_first` if it is not in the plan);
    * :attr:`computes_ahead`: ``fill`` may be called ahead of the writer as far as it lets
      it (it bounds the memory, waiting inside until chunks are :meth:`release`\ d), and
      ``fill`` of :attr:`first` on a thread of its own beside the others - so ``fill``
      must be safe from two threads. Otherwise one chunk is filled while the one before is
      written, and each is dropped once written;
    * :meth:`stop`: the writer has stopped - a ``fill`` waiting for memory should give up.
    """

    first: tuple | None = None
    computes_ahead = False

    @abc.abstractmethod
    def fill(self, key: str, offsets, sizes):
        """Chunk ``(offsets, sizes)`` of ``key`` (global coordinates): a tensor of ``sizes``
        or a :class:`StoredBlob` of an input holding exactly that chunk."""

    def stored(self, key: str, offsets, sizes) -> "StoredBlob | None":
        return None

    def release(self, chunk: torch.Tensor) -> None:
        """The writer is done with a chunk :meth:`fill` returned."""

    def stop(self) -> None:
        """The writer has stopped."""

    def drop_first(self) -> None:
        """:attr:`first` is not a chunk of this checkpoint."""


class _FillFunction(ChunkSource):
    """A plain function ``fill(key, offsets, sizes)`` as a source."""

    def __init__(self, fill: Callable):
        self._fill = fill

    def fill(self, key: str, offsets, sizes):
        return self._fill(key, offsets, sizes)


class _LazyPlanner(MCoreSavePlanner):
    """megatron's save planner, except that tensor data comes from a :class:`ChunkSource`."""

    def __init__(self, source: ChunkSource, **kwargs):
        super().__init__(**kwargs)
        self.source = source

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        chunk = write_item.tensor_data.chunk
        return self.source.fill(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes))

    def stored_data(self, write_item) -> "StoredBlob | None":
        if write_item.type == WriteItemType.BYTE_IO:
            return None
        chunk = write_item.tensor_data.chunk
        return self.source.stored(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes))


def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None."""
    import ctypes

    try:
        f = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return f


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
# Buffered output (where O_DIRECT is refused): written bytes are handed to the disk
# (writeback started, not waited for) every this many bytes, so that the final fsync
# waits for the tail only.
WRITEBACK_BYTES = 32 << 20
# O_DIRECT: file offsets, lengths and memory addresses of writes are multiples of this
# (covers 512- and 4096-byte logical blocks).
_DIRECT_ALIGN = 4096
# The output's staging buffers: small writes (archive headers, computed chunks) are
# gathered in one and written in aligned blocks of this size, while the next one fills.
STAGING_BYTES = 4 << 20
STAGING_BUFFERS = 3
# A stored chunk copied to the output is mapped this much at a time.
COPY_WINDOW_BYTES = 16 << 20
# Bytes handed to the output's write thread and not yet written: beyond this, the writer
# waits (bounds the mapped input windows and staging buffers held for writes).
WRITES_IN_FLIGHT_BYTES = 40 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class _OutputFile(io.RawIOBase):
    """The output data file, written front to back - with ``O_DIRECT`` where the
    filesystem takes it - by a thread of its own.

    A merge writes hundreds of MB that nobody reads back soon: through the page cache
    every byte costs a kernel copy into a cache page and a writeback later (the largest
    CPU cost of a merge on a small machine); ``O_DIRECT`` hands the disk the bytes where
    they are. Small writes go through aligned staging buffers; a stored input chunk
    (:meth:`copy_blob`) is written straight from a read-only mapping of its input file,
    placed at an output offset with the same alignment as its bytes in the mapping (up
    to ``_DIRECT_ALIGN - 1`` zero bytes of padding before it: nothing refers to them).
    Where ``O_DIRECT`` is refused (tmpfs, some network filesystems) the same writes go
    through the page cache. :meth:`finish` fsyncs: the output is as durable either way.

    An ``O_DIRECT`` write returns when the disk has the bytes: done by the caller, the
    disk's time (about a third of a merge) would add to everything else the writer does.
    The writes are therefore made on the ``merge-write`` thread, in order, while the
    caller goes on - at most :data:`WRITES_IN_FLIGHT_BYTES` behind; each keeps the memory
    it writes from (a staging buffer, an input mapping) until it is done. A failed write
    is raised by the caller's next write, :meth:`copy_blob` or :meth:`finish`.
    """

    def __init__(self, path: str):
        super().__init__()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = bool(_O_DIRECT)
        self.fd = -1
        if self.direct:
            try:
                self.fd = os.open(path, flags | _O_DIRECT, 0o644)
            except OSError:
                self.direct = False
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o644)
        self._stages = [mmap.mmap(-1, STAGING_BYTES) for _ in range(STAGING_BUFFERS)]  # page-aligned
        self._stage_writes: list = [None] * STAGING_BUFFERS  # the pending write of each
        self._current = 0
        self._sview = memoryview(self._stages[0])
        self.start = 0  # file offset of the staging buffer's first byte
        self.fill = 0  # bytes in the staging buffer
        self.padded = False  # a final block was padded: finish() cuts the file to length
        self._hinted = 0  # buffered mode: bytes whose writeback was started (write thread)
        self._writes = BackgroundQueue("merge-write", WRITES_IN_FLIGHT_BYTES)

    # -- io.RawIOBase (what torch.save and dcp's _write_item use)

    def writable(self):
        return True

    def tell(self) -> int:
        return self.start + self.fill

    def flush(self) -> None:
        pass  # (data reaches the file in aligned blocks; finish() writes the rest)

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        n, done = len(mv), 0
        while done < n:
            k = min(n - done, STAGING_BYTES - self.fill)
            self._sview[self.fill:self.fill + k] = mv[done:done + k]
            self.fill += k
            done += k
            if self.fill == STAGING_BYTES:
                self._flush_stage()
        return n

    # -- the rest

    def _submit(self, data: memoryview, pos: int):
        """Write ``data`` at ``pos`` on the write thread; ``data`` must stay unchanged
        until the returned future is done (the job keeps its memory alive until then)."""
        return self._writes.submit_mapped(lambda: self._pwrite(data, pos), len(data))

    def _pwrite(self, data: memoryview, pos: int) -> None:  # on the write thread
        done = 0
        while done < len(data):
            try:
                got = os.pwrite(self.fd, data[done:], pos + done)
            except OSError as e:
                if not self.direct or e.errno != errno.EINVAL:
                    raise
                # the filesystem took O_DIRECT at open but not these writes: buffered from now on
                import fcntl

                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_O_DIRECT)
                self.direct = False
                continue
            if got <= 0:
                raise OSError(f"short write to the output at offset {pos + done}")
            done += got
        self._hint(pos + done)

    def _hint(self, end: int) -> None:
        """Buffered mode: start the writeback of what is written before ``end``."""
        if not self.direct and _SYNC_FILE_RANGE is not None and end - self._hinted >= WRITEBACK_BYTES:
            # a hint: errors, if any, are reported by the final fsync
            _SYNC_FILE_RANGE(self.fd, self._hinted, end - self._hinted, _SYNC_FILE_RANGE_WRITE)
            self._hinted = end

    def _flush_stage(self, final: bool = False) -> None:
        """Hand the staging buffer to the write thread and go on in the next one; unless
        ``final``, it ends on an aligned offset."""
        n = self.fill
        if n:
            w = n
            if final and self.direct:  # the last block, padded; finish() cuts the file to length
                w = -(-n // _DIRECT_ALIGN) * _DIRECT_ALIGN
                self._sview[n:w] = bytes(w - n)
                self.padded = True
            self._stage_writes[self._current] = self._submit(self._sview[:w], self.start)
            self._current = (self._current + 1) % STAGING_BUFFERS
            pending = self._stage_writes[self._current]
            if pending is not None:
                pending.result()  # the next buffer's last write is done: it may be refilled
            self._sview = memoryview(self._stages[self._current])
        self.start += n
        self.fill = 0

    def copy_blob(self, blob: "StoredBlob") -> tuple[int, int]:
        """Append a stored input chunk's archive as it is; returns ``(offset, length)``."""
        c = blob.chunk
        if not self.direct:  # in the kernel (copy_file_range), after the writes before it
            self._flush_stage(final=True)
            self._writes.wait_all()
            offset = self.start
            length = blob.copy_to(self.fd, offset)
            self.start = offset + length
            self._hint(self.start)
            return offset, length
        align = _DIRECT_ALIGN
        # a byte's address in a mapping and its file offset agree modulo the alignment (a
        # mapping starts on a page of the file): padded so, the output offset does too
        pad = (c.blob_offset - self.tell()) % align
        if pad:
            self.write(bytes(pad))
        offset = self.tell()
        done = 0
        while done < c.blob_length:  # a window at a time: what is mapped at once is bounded
            n = min(c.blob_length - done, COPY_WINDOW_BYTES)
            m, delta = blob.reader._map(c, c.blob_offset + done, n)
            src = memoryview(m)[delta:delta + n]
            head = min((-self.tell()) % align, n)
            self.write(src[:head])
            mid = (n - head) // align * align
            if mid:  # at an aligned offset, and so is the source: straight from the mapping
                self._flush_stage()
                self._submit(src[head:head + mid], self.start)  # (keeps the mapping until written)
                self.start += mid
            self.write(src[head + mid:])
            del src, m  # unmapped once written
            done += n
        blob.reader.bytes_read += c.blob_length
        blob.reader.hash_in_background(c)
        return offset, c.blob_length

    def finish(self, sync: bool) -> None:
        """Write what is staged, cut the file to its length and (``sync``) fsync it."""
        end = self.tell()
        self._flush_stage(final=True)
        self._writes.wait_all()
        if self.padded:
            os.ftruncate(self.fd, end)
        if sync:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            # every write handed over ends before its file and memory go (errors, if this
            # is closed after one, were raised already or are not the first)
            self._writes.shutdown()
            self._stage_writes = [None] * STAGING_BUFFERS
            os.close(self.fd)
            self.fd = -1
            self._sview.release()
            for m in self._stages:
                # (a failed write's traceback may still hold a view of one: it is then
                # unmapped with the traceback)
                with contextlib.suppress(BufferError):
                    m.close()
        super().close()


class _SerialWriter(FileSystemWriter):
    """Writes the plan's items one after another into one file, keeping none of them."""

    def write_data(self, plan, planner) -> torch.futures.Future:
        file_name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        path = self.fs.concat_path(self.path, file_name)
        items = sorted(plan.items, key=lambda wi: wi.type != WriteItemType.BYTE_IO)
        # Stored chunks (copied as they are) need no computing: they are copied while the
        # compute thread works on the next computed item, so that a long computation (the
        # mean of an embedding) does not leave the writer idle.
        source: ChunkSource = planner.source
        stored_of = planner.stored_data
        computed, copies = [], []
        for item in items:
            blob = stored_of(item)
            if blob is None:
                computed.append(item)
            else:
                copies.append((item, blob))
        copies.reverse()  # popped from the end, in plan order
        if copies:
            # The largest computed chunks first (the embedding, the LM head): they are
            # computed while the writer has copies to make.
            tensors = [i for i in computed if i.type != WriteItemType.BYTE_IO]
            tensors.sort(key=lambda wi: -math.prod(wi.tensor_data.chunk.sizes))
            computed = [i for i in computed if i.type == WriteItemType.BYTE_IO] + tensors
        first = source.first
        first_item = None
        if first is not None:
            # the chunk being computed ahead (see write_checkpoint) goes first, in the place
            # of the first tensor
            key, offsets, sizes = first
            at = [j for j, i in enumerate(computed) if i.type != WriteItemType.BYTE_IO]
            hit = [j for j in at if computed[j].index.fqn == key
                   and tuple(computed[j].tensor_data.chunk.offsets) == tuple(offsets)
                   and tuple(computed[j].tensor_data.chunk.sizes) == tuple(sizes)]
            if hit:
                computed[at[0]], computed[hit[0]] = computed[hit[0]], computed[at[0]]
                first_item = computed[at[0]]
            else:
                source.drop_first()  # not in this plan: its memory is given back
        results = []
        # The computed items are computed in order on a thread while the writer writes:
        # the arithmetic and the reads overlap the writes and copies (both release the
        # GIL). A source that computes ahead (the merge's, in its ChunkRing) is asked as far
        # ahead as its memory lets it; any other one item ahead of the writer.
        import queue

        ready: queue.Queue = queue.Queue()
        ahead = threading.Semaphore(len(computed) + 1 if source.computes_ahead else 1)
        stop = threading.Event()

        def hand_over(item):
            try:
                ready.put((item, planner.resolve_data(item), None))
            except BaseException as e:  # noqa: BLE001 - handed to the writer
                ready.put((None, None, e))

        threads = []

        def produce():
            try:
                for item in computed:
                    ahead.acquire()
                    if stop.is_set():
                        return
                    if item is first_item and source.computes_ahead:
                        # being computed ahead: handed over when done, on a thread of its
                        # own, while this one goes on with the next items
                        t = threading.Thread(target=hand_over, args=(item,), name="merge-first", daemon=True)
                        threads.append(t)
                        t.start()
                        continue
                    ready.put((item, planner.resolve_data(item), None))
            except BaseException as e:  # noqa: BLE001 - handed to the writer
                ready.put((None, None, e))

        def copy(out, item, blob):
            offset, length = out.copy_blob(blob)
            results.append(WriteResult(index=item.index, size_in_bytes=length,
                                       storage_data=_StorageInfo(file_name, offset, length)))

        producer = threading.Thread(target=produce, name="merge-compute", daemon=True)
        producer.start()
        try:
            with _OutputFile(path) as out:
                written = 0
                while written < len(computed) or copies:
                    try:
                        item, data, error = ready.get_nowait()
                    except queue.Empty:
                        if copies:  # nothing computed yet: a copy meanwhile
                            copy(out, *copies.pop())
                            continue
                        item, data, error = ready.get()
                    if error is not None:
                        raise error
                    ahead.release()
                    written += 1
                    if isinstance(data, StoredBlob):
                        copy(out, item, data)
                        continue
                    chunk = data
                    if item.type != WriteItemType.BYTE_IO:
                        data = data.detach().contiguous()
                        if data.untyped_storage().nbytes() != data.nbytes:
                            data = data.clone()
                    results.append(_write_item(self.transforms, out, data, item, file_name,
                                               self.serialization_format))
                    del data
                    if item.type != WriteItemType.BYTE_IO:
                        source.release(chunk)
                    del chunk
                out.finish(sync=self.sync_files)
        finally:
            stop.set()
            for _ in range(len(computed) + 1):  # (wakes the producer wherever it waits)
                ahead.release()
            source.stop()
            producer.join()
            for t in threads:
                t.join()
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(results)
        return fut


class _LazySaveStrategy(SaveShardedStrategy):
    """torch_dist format (what megatron's default strategy writes), computed lazily."""

    def __init__(self, source: ChunkSource):
        super().__init__("torch_dist", 1)
        self.source = source

    @property
    def can_handle_sharded_objects(self):
        return True

    def save(self, sharded_state_dict, checkpoint_dir):
        state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state_dict = mcore_to_pyt_state_dict(state_dict, False)
        dcp_save(
            pyt_state_dict,
            storage_writer=_SerialWriter(str(checkpoint_dir), thread_count=1),
            planner=_LazyPlanner(self.source, dedup_replicated_tensors=False, flatten_state_dict=False),
        )


@contextlib.contextmanager
def _no_zip_crc32():
    """``torch.save`` without the CRC-32 of each zip record, for the archives written here.

    Nothing that reads a dist checkpoint checks them: ``torch.load`` (and so dcp and
    megatron) loads an archive whose data bytes were changed without a word (torch 2.13),
    and documents that it loads archives saved without them. Computing them costs the
    writer a pass over every computed byte (~0.08 s of a merge of two 360 MB experts); a
    stored archive copied as it is keeps its own. The setting is torch's (process-wide):
    restored on the way out."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def write_checkpoint(cfg: ModelConfig, dtype: torch.dtype, directory: Path,
                     source: ChunkSource | Callable) -> None:
    """Write the dist checkpoint of ``cfg`` into the existing folder ``directory``, each
    chunk from ``source``: a :class:`ChunkSource`, or a function ``fill(key, offsets,
    sizes)`` returning the chunk (a tensor of ``sizes``, in the global coordinates megatron
    stores ``key`` in), called once per chunk, in turn, on a thread of the writer's."""
    if not isinstance(source, ChunkSource):
        source = _FillFunction(source)
    sharded = meta_model(cfg, dtype).sharded_state_dict()
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _no_zip_crc32():
            dist_checkpointing.save(sharded, str(directory),
                                    sharded_strategy=_LazySaveStrategy(source))
    except CheckpointException as e:
        # torch.distributed.checkpoint wraps what failed (a full disk, a bad input chunk)
        # with its rank's traceback; the error itself is what the caller can act on
        inner = [f[0] for f in e.failures.values() if isinstance(f, tuple) and f and isinstance(f[0], BaseException)]
        if not inner:
            raise
        raise inner[0] from e
    cfg.save(directory)
