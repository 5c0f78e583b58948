"""CPU tensors reused by the threads of a long streaming job (the merge), and torch's op
threads left to those threads while it runs."""

from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import torch


class BufferPool:
    """Tensors to reuse, taken by shape and dtype and given back (a fresh large tensor costs
    its page faults each time, more than the copy into it); shared by threads."""

    def __init__(self):
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            for i, t in enumerate(self._free):
                if t.shape == tuple(shape) and t.dtype == dtype:
                    return self._free.pop(i)
        return torch.empty(tuple(shape), dtype=dtype)

    def give(self, *tensors: torch.Tensor) -> None:
        with self._lock:
            self._free.extend(tensors)


@contextlib.contextmanager
def one_thread_per_op():
    """torch's ops on one thread each while it lasts: the merge's own threads use the cores,
    and an op split over two threads waits for the busier core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
