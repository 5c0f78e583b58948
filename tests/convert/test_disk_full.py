"""A full disk while writing an output is one ``error:`` line naming the output path and the
space needed, exit code 1, and nothing left behind (issue 27, items 3-6).

The tools are run for real onto a 64 KiB tmpfs (fixture ``small_disk``: skipped where the
machine does not allow mounting; CI runs as root). Those runs are refused by the free-space
check before writing; the writers that fill the disk part-way (safetensors, a megatron dist
checkpoint through torch's ``CheckpointException``, a plain file) are checked in-process with
no size estimate, so that the write itself hits ENOSPC.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import run_tool
from megatron_bar.cli import user_error
from megatron_bar.utils.fs import DiskFullError, atomic_output_dir, incomplete_path


def assert_disk_full_error(proc, out):
    why = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 1, why
    assert "Traceback" not in proc.stderr, why
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and sum(x.startswith("error:") for x in lines) == 1, why
    assert str(out) in lines[-1] and "needs about" in lines[-1] and "free" in lines[-1], why
    assert not out.exists() and not incomplete_path(out).exists(), why
    assert "wrote" not in proc.stdout, why


def test_tools_on_a_full_disk(small_disk, hf_dense_dir, mcore_dense_dir):
    runs = {
        "convert_hf_to_mcore.py": ["--hf-dir", str(hf_dense_dir), "--save", str(small_disk / "a")],
        "convert_mcore_to_hf.py": ["--load", str(mcore_dense_dir), "--save", str(small_disk / "b")],
        "upcycle.py": ["--load", str(mcore_dense_dir), "--save", str(small_disk / "c")],
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = dict(zip(runs, pool.map(lambda t: run_tool(t, *runs[t]), runs)))
    for tool, proc in procs.items():
        assert_disk_full_error(proc, small_disk / runs[tool][-1].rsplit("/", 1)[-1])


def _fill_in(small_disk, write):
    final = small_disk / "out"
    with pytest.raises(DiskFullError) as e:
        with atomic_output_dir(final) as tmp:
            write(tmp)
    assert str(final) in str(e.value) and "no space left" in str(e.value)
    assert not final.exists() and not incomplete_path(final).exists()
    assert user_error(e.value) is e.value
    return str(e.value)


def test_plain_write_that_fills_the_disk(small_disk):
    msg = _fill_in(small_disk, lambda tmp: (tmp / "big").write_bytes(b"x" * (1 << 20)))
    assert "the output needs more than the " in msg and "KiB that was free" in msg


def test_safetensors_shard_that_fills_the_disk(small_disk):
    from megatron_bar.convert.hf_io import SafetensorsWriter

    def write(tmp):
        writer = SafetensorsWriter(tmp)
        writer.add("w", torch.zeros(256, 1024))
        writer.close()

    _fill_in(small_disk, write)


def test_dist_checkpoint_that_fills_the_disk(small_disk, mcore_dense_dir):
    """megatron's save raises torch's CheckpointException (a BaseException) here."""
    from megatron_bar.convert import build_for_conversion, checkpoint_dtype
    from megatron_bar.model.checkpoint import load_weights, save_sharded
    from megatron_bar.model.config import ModelConfig

    cfg = ModelConfig.load(mcore_dense_dir)
    model = build_for_conversion(cfg, checkpoint_dtype(mcore_dense_dir))
    load_weights(model, cfg, mcore_dense_dir)
    _fill_in(small_disk, lambda tmp: save_sharded(model.sharded_state_dict(), tmp))
