"""The weight-sync channel: the trainer's rank 0 broadcasts tensors to the rollout workers
over a process group of their own, not through Ray's object store.

The pattern is the one open-instruct (``setup_model_update_group``), verl and NeMo-RL use
for trainer -> vLLM updates: rank 0 hosts a ``TCPStore`` on its node; each worker is told
the address through Ray and joins a group of ``1 + workers`` members (rank 0 = the
trainer), built from torch's public backend classes
(:func:`megatron_bar.platform.standalone_process_group`: gloo on CPU, NCCL when every member
has a GPU). A sync then sends only the small layout through Ray - names, shapes, dtypes and
how they fall into buckets (:class:`Bucket`) - and the tensors follow by broadcast, one
flat contiguous buffer per bucket, which each worker unflattens into its model in place.

A group is never repaired: when a member dies the fleet builds a new one with every worker
(a new key prefix in the same store: ``weight_sync/<generation>/``). Closing the old group
on rank 0 closes its connections, so a surviving worker that still waits on a broadcast
fails at once instead of at the timeout.
"""

from __future__ import annotations

import datetime
import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_bar import platform


class ChannelError(RuntimeError):
    """This worker is not in the group the trainer broadcasts on (it was restarted, or the
    group was rebuilt without it)."""


@dataclass(frozen=True)
class ChannelAddress:
    """Where and how to join one generation of the group (sent to the workers through Ray)."""

    host: str
    port: int
    generation: int
    size: int  # 1 + the number of workers
    backend: str  # gloo | nccl
    timeout_s: float


@dataclass(frozen=True)
class Bucket:
    """One broadcast: the tensors of one dtype, in order, as one flat buffer."""

    dtype: str  # torch dtype name, e.g. "float32"
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def numels(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def nbytes(self) -> int:
        return sum(self.numels) * self.torch_dtype.itemsize


def plan_buckets(state: dict[str, torch.Tensor], limit_bytes: float) -> list[Bucket]:
    """``state``'s tensors in buckets of one dtype and at most ``limit_bytes`` each (a
    tensor larger than that is a bucket of its own), in ``state``'s order within a dtype."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in state.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    buckets = []
    for dtype, names in by_dtype.items():
        current: list[str] = []
        size = 0
        for name in names:
            nbytes = state[name].numel() * state[name].element_size()
            if current and size + nbytes > limit_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(name)
            size += nbytes
        if current:
            buckets.append(current)
    return [Bucket(str(state[b[0]].dtype).removeprefix("torch."), tuple(b),
                   tuple(tuple(state[n].shape) for n in b)) for b in buckets]


def _join(store: dist.Store, address: ChannelAddress, rank: int):
    prefix = dist.PrefixStore(f"weight_sync/{address.generation}/", store)
    return platform.standalone_process_group(prefix, rank, address.size, address.timeout_s, address.backend)


def _drop(owner) -> None:
    """End ``owner.group``: ``abort`` frees an NCCL communicator; a gloo group's connections
    close when the object goes, which dropping the last reference here makes happen now."""
    if owner.group is None:
        return
    owner.group.abort()
    owner.group = None
    gc.collect()


class WeightSender:
    """Rank 0's end: hosts the store, builds each generation of the group, broadcasts."""

    def __init__(self, host: str, port: int, workers: int, backend: str, timeout_s: float):
        self.host, self.workers, self.backend, self.timeout_s = host, workers, backend, timeout_s
        # port 0: the OS picks a free one (read back from the store)
        self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
        self.generation = -1
        self.group = self.device = None

    def next_address(self) -> ChannelAddress:
        self.generation += 1
        return ChannelAddress(self.host, self.store.port, self.generation, self.workers + 1, self.backend,
                              self.timeout_s)

    def connect(self, address: ChannelAddress) -> None:
        """Join ``address``'s group as rank 0; blocks until every worker has joined too."""
        self.close()
        self.group, self.device = _join(self.store, address, 0)

    def send(self, state: dict[str, torch.Tensor], buckets: list[Bucket]) -> int:
        """Broadcast ``buckets`` of ``state``; the bytes put on the wire."""
        if self.group is None:
            raise ChannelError("the weight channel is not connected")
        sent = 0
        for bucket in buckets:
            parts = [state[n].detach().reshape(-1) for n in bucket.names]
            flat = (torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()).to(self.device)
            wire = flat.view(torch.uint8)  # any dtype goes as bytes: bit for bit, on every backend
            self.group.broadcast(wire, 0).wait()
            sent += wire.numel()
        platform.synchronize()
        return sent

    def close(self) -> None:
        """Drop the group: its connections close, and a member still waiting on it fails."""
        _drop(self)


class WeightReceiver:
    """A rollout worker's end of one generation of the group."""

    def __init__(self, address: ChannelAddress, rank: int):
        self.address = address
        self.store = dist.TCPStore(address.host, address.port, is_master=False,
                                   timeout=datetime.timedelta(seconds=address.timeout_s))
        self.group, self.device = _join(self.store, address, rank)

    def receive(self, buckets: list[Bucket], targets: dict[str, torch.Tensor]) -> int:
        """Every bucket, copied into ``targets`` (name -> the tensor it goes into, in place);
        the bytes received. All buckets are received even when a name is unknown, so that
        the broadcasts stay in step with the other members; the error follows."""
        unknown = [n for b in buckets for n in b.names if n not in targets]
        received = 0
        for bucket in buckets:
            wire = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
            self.group.broadcast(wire, 0).wait()
            received += wire.numel()
            if unknown:
                continue
            parts = wire.view(bucket.torch_dtype).split(bucket.numels)
            for name, shape, part in zip(bucket.names, bucket.shapes, parts):
                targets[name].copy_(part.view(shape))
        if unknown:
            raise KeyError(f"weights for the rollout model: unknown tensor {unknown[0]!r}")
        return received

    def close(self) -> None:
        _drop(self)
