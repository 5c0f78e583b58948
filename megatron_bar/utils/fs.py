"""Output folders that appear only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


def incomplete_path(final: Path) -> Path:
    """Where an output is written before it is renamed into place (same filesystem)."""
    return final.parent / f".{final.name}.incomplete"


def check_output_free(path: str | Path) -> Path:
    path = Path(path)
    if path.exists():
        raise OutputExistsError(f"{path}: output path already exists; choose another or remove it")
    return path


@contextlib.contextmanager
def atomic_output_dir(final: str | Path, *, is_writer: bool = True, barrier=None):
    """Yield a temporary folder; on success rename it to ``final``, on error remove it.

    ``is_writer`` is rank 0 of a distributed job (the one that creates, renames and
    cleans up); ``barrier`` is called so that every rank has finished writing before the
    rename. A stale temporary folder from a killed run is removed first.
    """
    final = check_output_free(final)
    tmp = incomplete_path(final)
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if barrier:
        barrier()
    try:
        yield tmp
        if barrier:
            barrier()
        if is_writer:
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    except BaseException:
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
