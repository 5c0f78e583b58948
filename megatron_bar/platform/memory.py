"""A measured memory peak over a stretch of code, on this rank.

GPU: the CUDA caching allocator's peak (``max_memory_allocated``) after a reset, above what
was allocated when the stretch began. CPU: the kernel's resident-set high-water mark
(``VmHWM`` in ``/proc/self/status``), reset when the stretch begins by writing 5 to
``/proc/self/clear_refs`` (Linux >= 4.0), above the resident size at that moment. Before
the CPU baseline, ``malloc_trim(0)`` hands glibc's freed heap pages back to the kernel, so
memory the stretch reuses from an earlier step is paged in again and counted, not hidden
in the allocator's free lists. The kernel's mark sees every page touched, including the
short-lived peaks a sampling thread would miss.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from dataclasses import dataclass

import torch

from megatron_bar.platform import has_gpu


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1)) * 1024


def _release_free_heap() -> None:
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)


@dataclass
class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.baseline``, ``m.peak`` and ``m.above_baseline``
    (bytes): what the rank held when the stretch began, its peak during it, and the
    difference - the memory the stretch itself needed."""

    baseline: int = 0
    peak: int = 0

    @property
    def above_baseline(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if has_gpu():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            _release_free_heap()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident size
            self.baseline = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if has_gpu():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = _status_kb("VmHWM")


def resident_bytes() -> int:
    """What this rank's data holds now: the CUDA allocator's allocated bytes on GPU; on CPU
    the anonymous resident memory (``RssAnon``: not the shared libraries' code pages, which
    a first step pages in) after freed heap pages went back to the kernel."""
    gc.collect()
    if has_gpu():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    _release_free_heap()
    return _status_kb("RssAnon")


def adam_implementation() -> str:
    """Which Adam megatron's optimizer runs here (megatron.core.optimizer imports Transformer
    Engine's FusedAdam, else apex's, else torch's AdamW): ``fused``, or torch's ``foreach``
    (its default on CUDA tensors) or ``single_tensor`` (its default on CPU tensors)."""
    if has_gpu():
        for module in ("transformer_engine.pytorch.optimizers", "apex.optimizers"):
            try:
                __import__(module)
                return "fused"
            except ImportError:
                pass
        return "foreach"
    return "single_tensor"
