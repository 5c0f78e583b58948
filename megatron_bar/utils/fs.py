"""Output folders that appear only when complete, and a full disk as a clear error."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


class DiskFullError(OSError):
    """The filesystem of an output ran out of space (a user error: free some, or write elsewhere)."""


# Free space below which a failed write is taken for a full disk even when the writer's own
# error does not say so (torch's zip writer reports "unexpected pos N vs M").
_NEARLY_FULL_BYTES = 1 << 20


def format_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _mentions_no_space(exc: BaseException, seen: set[int] | None = None) -> bool:
    """``exc`` or anything it wraps (cause, context, torch's CheckpointException failures,
    a worker's error text) is ENOSPC."""
    seen = set() if seen is None else seen
    if exc is None or id(exc) in seen:
        return False
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if "No space left on device" in str(exc) or "[Errno 28]" in str(exc):
        return True
    wrapped = [e for e, _ in getattr(exc, "failures", {}).values()] if hasattr(exc, "failures") else []
    return any(_mentions_no_space(e, seen) for e in (exc.__cause__, exc.__context__, *wrapped))


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_free_space(final: Path, need_bytes: int | None) -> None:
    """Refuse to start writing ``final`` when its filesystem has less than ``need_bytes`` free."""
    if not need_bytes:
        return
    free = shutil.disk_usage(_existing_parent(final)).free
    if free < need_bytes:
        raise DiskFullError(
            f"{final}: not enough disk space: needs about {format_bytes(need_bytes)}, "
            f"{format_bytes(free)} free",
        )


def disk_full_error(exc: BaseException, final: Path, tmp: Path,
                    need_bytes: int | None) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``final`` and the space needed when ``exc`` (raised
    while writing into ``tmp``) came from a full disk; None otherwise."""
    if isinstance(exc, DiskFullError):
        return None
    try:
        free = shutil.disk_usage(_existing_parent(tmp)).free
    except OSError:
        return None
    if not (_mentions_no_space(exc) or free < _NEARLY_FULL_BYTES):
        return None
    available = free + _folder_bytes(tmp)
    estimate = f", about {format_bytes(need_bytes)} estimated" if need_bytes else ""
    return DiskFullError(
        f"{final}: no space left on device: the output needs more than the "
        f"{format_bytes(available)} that was free{estimate}; nothing was kept"
    )


def incomplete_path(final: Path) -> Path:
    """Where an output is written before it is renamed into place (same filesystem)."""
    return final.parent / f".{final.name}.incomplete"


def check_output_free(path: str | Path) -> Path:
    path = Path(path)
    if path.exists():
        raise OutputExistsError(f"{path}: output path already exists; choose another or remove it")
    return path


@contextlib.contextmanager
def atomic_output_dir(final: str | Path, *, is_writer: bool = True, barrier=None,
                      need_bytes: int | None = None):
    """Yield a temporary folder; on success rename it to ``final``, on error remove it.

    ``is_writer`` is rank 0 of a distributed job (the one that creates, renames and
    cleans up); ``barrier`` is called so that every rank has finished writing before the
    rename. A stale temporary folder from a killed run is removed first. ``need_bytes``
    (an estimate of the output's size) is checked against the free space before anything
    is written; a write that fills the disk anyway becomes a :class:`DiskFullError` that
    names ``final`` (on every rank).
    """
    final = check_output_free(final)
    tmp = incomplete_path(final)
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if barrier:
        barrier()
    try:
        # After the barrier and before any rank writes (megatron's save coordinates the
        # ranks before its first write): every rank sees the same free space and refuses alike.
        check_free_space(final, need_bytes)
    except DiskFullError:
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        yield tmp
        if barrier:
            barrier()
        if is_writer:
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    except BaseException as e:
        full = disk_full_error(e, final, tmp, need_bytes) if isinstance(e, Exception) or hasattr(
            e, "failures") else None
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from e
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
