"""glibc's malloc keeping freed blocks while a streaming job runs
(``platform.memory.freed_host_memory_kept``), against the same allocations outside it: the
kernel's count of page faults says whether a freed block was reused or mapped afresh."""

import resource
import sys

import pytest
import torch

from megatron_bar.platform.memory import _status_kb, freed_host_memory_kept

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

SIZE = 48 << 20  # over glibc's largest sliding mmap threshold (32 MiB): mapped afresh each time by default
ROUNDS = 8


def _faults_of_fresh_tensors() -> int:
    """Page faults of ROUNDS tensors of SIZE, each allocated, filled and freed in turn,
    with small allocations in between (as a real job has)."""
    t = torch.empty(SIZE, dtype=torch.uint8)
    t.fill_(1)
    del t
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(ROUNDS):
        t = torch.empty(SIZE, dtype=torch.uint8)
        t.fill_(1)
        _ = [str(i) for i in range(1000)]
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_blocks_are_reused_while_it_lasts_and_returned_after():
    outside = _faults_of_fresh_tensors()
    with freed_host_memory_kept():
        _faults_of_fresh_tensors()  # (the heap grows to what the pattern needs)
        inside = _faults_of_fresh_tensors()
        held = _status_kb("RssAnon")
    released = _status_kb("RssAnon")
    # (with transparent huge pages a fresh mapping faults once per 2 MiB: 24 times a tensor)
    assert outside >= 20 * ROUNDS, f"{ROUNDS} fresh {SIZE >> 20} MiB tensors faulted only {outside} times"
    assert inside <= outside // 10, f"the freed blocks were not reused: {inside} faults vs {outside}"
    assert held - released >= SIZE, f"the kept heap was not returned: {held >> 20} -> {released >> 20} MiB"
