"""Run an untrusted Python program (a policy's code completion) and capture its output.

Code rewards execute thousands of programs written by a policy that is being
optimised to make them "pass".  This module contains the damage such a program
can do to the training host.  It has two layers, and reports which ones this
machine supports through :func:`probe_isolation`.

Kernel layer (needs root, or unprivileged user namespaces; probed once):

* **Private network** -- the child calls ``unshare(CLONE_NEWNET | CLONE_NEWIPC)``
  before it execs the interpreter. The new network namespace has only a
  loopback device, and it is down, so connecting anywhere fails, including
  127.0.0.1 of the host. SysV IPC objects die with the namespace. When not
  root, ``CLONE_NEWUSER`` is added, which makes it work unprivileged where the
  kernel allows that.
* **Private uid** -- as root, the child drops to a uid used by no one else,
  ``SANDBOX_UID_BASE + its pid``, with no supplementary groups. So file
  permissions apply (it cannot write the trainer's files or read ``/root``),
  it cannot signal the trainer or other sandboxes, and ``RLIMIT_NPROC``
  (not enforced for root) now counts only this sandbox's processes. We use a
  uid per sandbox rather than ``nobody`` because concurrent sandboxes would
  otherwise share one process budget and could signal each other. If that
  uid cannot be used (for example, a user namespace that maps few uids), the
  child drops to ``nobody`` instead. If the interpreter lies where the new uid
  cannot read it (e.g. a venv under a 0700 ``/root``), the system
  ``python3`` is used. The program runs with ``-S``, so it sees only the
  standard library either way.
* **Resource limits** (set in every mode): ``RLIMIT_AS`` (memory),
  ``RLIMIT_CPU``, ``RLIMIT_NPROC``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``,
  and ``RLIMIT_CORE = 0``.
* **Cleanup** -- the child starts its own session, and the wall-clock timeout
  SIGKILLs the whole process group. After every run (not only timeouts), the
  group is killed again. With a private uid, every process left under that
  uid is killed too, which also catches processes that escaped with
  ``setsid()``. Top-level files that uid left in ``/tmp``, ``/var/tmp`` and
  ``/dev/shm`` are removed. The working directory is always deleted.

Python layer (always on unless ``python_guard=False``): a ``sys.addaudithook``
hook is installed before the program runs. It refuses:

* non-``AF_UNIX`` sockets, and any ``connect``/``bind``/``sendto``/
  ``sendmsg`` or name lookup;
* signalling any process but itself (``os.kill``/``os.killpg``);
* creating processes (``fork``, ``exec*``, ``posix_spawn``, ``system``,
  ``subprocess``), because a new interpreter would not carry the hook;
* importing ``ctypes``/``_posixsubprocess``, which could go around it;
* writing, creating, renaming, linking, chmod-ing or deleting a path outside
  its working directory (``/dev/null`` is allowed);
* opening ``/proc/<pid>/...`` of another process (e.g. the trainer's
  ``environ``), which matters when it runs as the caller's uid.

Threads are allowed. Audit hooks are a tripwire, not a security boundary: the
CPython docs say so, and for example ``os.pidfd_open`` together with
``signal.pidfd_send_signal`` has no audit event. The layer stops ordinary
code from doing damage by accident. Against a determined adversary, only the
kernel layer holds.

Not contained on any machine:

* reading world-readable files (e.g. ``/etc/passwd``, the code of the repo);
* CPU and memory bandwidth, so a program can slow its neighbours down for up
  to ``timeout_s``;
* with only the kernel layer, files in world-writable directories below the
  top level (top-level ones are removed). The Python layer refuses such
  writes.

Without root and without user namespaces, there is no private network and no
private uid. Then the Python layer is what stops network use and writes
outside the working directory, and ``RLIMIT_NPROC`` counts all of the
caller's processes.

``preexec_fn`` runs between fork and exec. It only makes system calls
(``unshare``, ``chown``, ``setrlimit``, ``setgroups``, ``setgid``,
``setuid``), so it takes no Python-level locks held by other threads of the
trainer.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import pwd
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Literal

logger = logging.getLogger(__name__)

__all__ = [
    "SANDBOX_UID_BASE",
    "Isolation",
    "SandboxResult",
    "probe_isolation",
    "run_python",
]

# Sandbox uids are SANDBOX_UID_BASE + pid of the sandbox, i.e. unique among the
# live sandboxes of the machine. They are far above the ranges that distributions,
# systemd and /etc/subuid hand out (pid_max is at most 2**22).
SANDBOX_UID_BASE = 2_000_000_000

# Limits that are not worth a parameter each.
MAX_PROCESSES = 32  # RLIMIT_NPROC: processes + threads of the sandbox uid
MAX_FILE_BYTES = 16 << 20  # RLIMIT_FSIZE: largest file it may write
MAX_OPEN_FILES = 64  # RLIMIT_NOFILE
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20  # kept per stream; the rest is read and dropped

CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

_POLL_S = 0.01  # how often the output pump checks whether the program exited
_PIPE_CHUNK = 1 << 16
_SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

UidMode = Literal["private", "nobody", "none"]


@dataclasses.dataclass
class SandboxResult:
    """Outcome of one :func:`run_python` call.

    ``returncode`` is negative when a signal ended the program (Popen's
    convention), and ``killed_by`` then names the signal. ``SIGKILL`` comes
    after a wall-clock timeout, ``SIGXCPU`` after the CPU limit.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    killed_by: str | None
    duration_s: float
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        """The program ran to completion and exited with status 0."""
        return self.returncode == 0 and not self.timed_out


@dataclasses.dataclass(frozen=True)
class Isolation:
    """What the kernel layer does on this machine (see the module docstring).

    Attributes:
        interpreter: Python executable that runs the program.
        unshare_flags: namespaces each sandbox gets; 0 means it shares the
            host's network.
        uid_mode: "private" (a fresh uid per sandbox), "nobody", or "none"
            (runs as the caller).
    """

    interpreter: str
    unshare_flags: int = 0
    uid_mode: UidMode = "none"

    @property
    def private_network(self) -> bool:
        return bool(self.unshare_flags & CLONE_NEWNET)

    def describe(self) -> str:
        network = "private network" if self.private_network else "host network"
        return f"{network}, uid mode {self.uid_mode!r}, interpreter {self.interpreter}"


# --------------------------------------------------------------------------- #
# Python layer: the audit hook that runs before the program.
# --------------------------------------------------------------------------- #

# Passed to the interpreter with -c. argv[1] is the program's file, relative to
# the working directory. It runs in __main__, so `if __name__ == "__main__":`
# works. Every helper is a local of the installer, which is deleted before the
# program starts, so the program cannot patch what the hook calls.
_RUNNER = r'''
def _install_guard():
    import os, sys
    workdir = os.path.realpath(os.getcwd())
    getpid, fsdecode, isabs = os.getpid, os.fsdecode, os.path.isabs
    join, readlink, realpath = os.path.join, os.readlink, os.path.realpath
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    af_unix = 1
    no_processes = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
                    "os.system", "subprocess.Popen"}
    no_network = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                  "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                  "socket.getnameinfo"}
    no_imports = {"ctypes", "_ctypes", "_posixsubprocess"}
    # event -> [(index of a path argument, index of its dir_fd argument or None)]
    path_events = {
        "os.chmod": [(0, 2)], "os.chown": [(0, 3)], "os.link": [(0, 2), (1, 3)],
        "os.mkdir": [(0, 2)], "os.remove": [(0, 1)], "os.rename": [(0, 2), (1, 3)],
        "os.rmdir": [(0, 1)], "os.symlink": [(1, 2)], "os.truncate": [(0, None)],
        "os.utime": [(0, 3)], "shutil.rmtree": [(0, 1)],
    }

    def inside_workdir(path, dir_fd):
        if isinstance(path, int):
            return True  # an already open descriptor
        path = fsdecode(path)
        if path == "/dev/null":
            return True
        if dir_fd is not None and dir_fd >= 0 and not isabs(path):
            path = join(readlink("/proc/self/fd/%d" % dir_fd), path)
        resolved = realpath(path)
        return resolved == workdir or resolved.startswith(workdir + "/")

    def other_process(path):
        # /proc/<pid>/... of another process, e.g. the trainer's environ or memory.
        if isinstance(path, int):
            return False
        path = fsdecode(path)
        if isabs(path) and not path.startswith("/proc/"):
            return False  # skip realpath for the common case (imports)
        parts = realpath(path).split("/")
        return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != getpid()

    def refuse(event, args):
        raise PermissionError("sandbox: %s%r is not allowed" % (event, tuple(args)))

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (flags or 0) & write_flags or any(c in (mode or "") for c in "wax+")
            if (writes and not inside_workdir(path, None)) or other_process(path):
                refuse(event, args)
        elif event in path_events:
            for path_i, fd_i in path_events[event]:
                if not inside_workdir(args[path_i], None if fd_i is None else args[fd_i]):
                    refuse(event, args)
        elif event == "socket.__new__":
            if args[1] != af_unix:
                refuse(event, args[1:])
        elif event in no_network or event in no_processes:
            refuse(event, args)
        elif event in ("os.kill", "os.killpg"):
            if event == "os.killpg" or args[0] != getpid():
                refuse(event, args)
        elif event == "import" and args[0] in no_imports:
            refuse(event, args[:1])

    sys.addaudithook(hook)


_install_guard()
del _install_guard
'''

_PROGRAM_RUNNER = r'''
import sys
__file__ = sys.argv[1]
sys.argv = sys.argv[1:]
with open(__file__, encoding="utf-8") as _f:
    _code = compile(_f.read(), __file__, "exec")
del _f, sys
exec(_code)
'''

_PROGRAM_FILE = "main.py"


# --------------------------------------------------------------------------- #
# Kernel layer: what the child does between fork and exec.
# --------------------------------------------------------------------------- #

_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> None:
    """Move the calling process into new namespaces (os.unshare exists from 3.12)."""
    if hasattr(os, "unshare"):
        os.unshare(flags)
        return
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare({flags:#x}): {os.strerror(errno)}")


def _private_uid(pid: int) -> int:
    """The uid (and gid) of the sandbox whose process id is ``pid``."""
    return SANDBOX_UID_BASE + pid


def _rlimits(timeout_s: float, memory_mb: int) -> dict[int, tuple[int, int]]:
    """(soft, hard) per resource, computed in the parent.

    The CPU hard limit is one second above the soft one, so a CPU-bound
    program gets SIGXCPU (which ``killed_by`` reports) before SIGKILL. The
    wall clock normally fires first anyway. No value goes above the caller's
    own hard limit, which a non-root caller could not raise.
    """
    cpu_s = int(timeout_s) + 1
    wanted = {
        resource.RLIMIT_AS: (memory_mb << 20,) * 2,
        resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),
        resource.RLIMIT_NPROC: (MAX_PROCESSES,) * 2,
        resource.RLIMIT_FSIZE: (MAX_FILE_BYTES,) * 2,
        resource.RLIMIT_NOFILE: (MAX_OPEN_FILES,) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    limits = {}
    for which, (soft, hard) in wanted.items():
        ceiling = resource.getrlimit(which)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        limits[which] = (soft, hard)
    return limits


def _make_preexec(
    isolation: Isolation, workdir: str, limits: dict[int, tuple[int, int]]
) -> Callable[[], None]:
    """Build the function the child runs after fork, before exec.

    The order matters: namespaces and chown need root, so they come before
    the uid drop, and setgid must come before setuid.
    """
    # Looked up here, in the parent: reading /etc/passwd after fork is not safe.
    nobody = pwd.getpwnam("nobody") if isolation.uid_mode == "nobody" else None

    def sandbox_ids() -> tuple[int, int] | None:
        if isolation.uid_mode == "private":
            uid = _private_uid(os.getpid())
            return uid, uid
        if nobody is not None:
            return nobody.pw_uid, nobody.pw_gid
        return None  # keep the caller's ids

    def preexec() -> None:
        if isolation.unshare_flags:
            _unshare(isolation.unshare_flags)
        ids = sandbox_ids()
        if ids is not None:
            os.chown(workdir, *ids)
        for which, soft_hard in limits.items():
            resource.setrlimit(which, soft_hard)
        if ids is not None:
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])

    return preexec


# --------------------------------------------------------------------------- #
# Cleanup after each run.
# --------------------------------------------------------------------------- #


def _pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # it exited while we looked
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def _kill_uid(uid: int, deadline_s: float = 10.0) -> None:
    """SIGKILL every process of a private sandbox uid, including ones that left the group,
    and wait until none is left.

    This repeats because processes can fork while we scan (RLIMIT_NPROC bounds how many
    there can be), and because a SIGKILLed process is still listed until the kernel has
    torn it down, which on a loaded machine takes a while.
    """
    end = time.monotonic() + deadline_s
    pause = 0.001
    while time.monotonic() < end:
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    logger.warning("sandbox uid %d still had processes %.0f s after SIGKILL", uid, deadline_s)


def _remove_scratch_files(uid: int) -> None:
    """Remove top-level entries a private sandbox uid left in world-writable dirs."""
    for scratch in _SCRATCH_DIRS:
        try:
            entries = list(os.scandir(scratch))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def _cleanup(pid: int, isolation: Isolation) -> None:
    """Kill what the program left running, whatever happened to the program itself.

    ``pid`` must not have been reaped yet. Its pid is then still taken, so the
    group id cannot have been reused by an unrelated process.
    """
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if isolation.uid_mode == "private":
        uid = _private_uid(pid)
        _kill_uid(uid)
        _remove_scratch_files(uid)


def _remove_workdir(path: str) -> None:
    """Delete the working directory, even if the program made parts of it unreadable."""

    def make_writable_and_retry(func, failed_path, _exc_info):
        os.chmod(os.path.dirname(failed_path), 0o700)
        os.chmod(failed_path, 0o700)
        func(failed_path)

    try:
        shutil.rmtree(path, onerror=make_writable_and_retry)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- #
# Feeding stdin and collecting capped output.
# --------------------------------------------------------------------------- #


def _has_exited(pid: int) -> bool:
    """Whether the child exited, without reaping it (WNOWAIT keeps its pid taken)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


@dataclasses.dataclass
class _Pumped:
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool


def _pump(proc: subprocess.Popen, stdin: bytes, deadline: float, max_output_bytes: int) -> _Pumped:
    """Write stdin and read stdout/stderr until the program exits or the deadline passes.

    A single selector loop is used rather than ``communicate()``, for two
    reasons. Output beyond ``max_output_bytes`` is dropped, not buffered (a
    program can print GBs in a few seconds). And we stop when the program
    exits, even if a background child still holds the pipes open.
    """
    out_fd, err_fd, in_fd = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    kept = {out_fd: bytearray(), err_fd: bytearray()}
    truncated = timed_out = False
    written = 0
    sel = selectors.DefaultSelector()
    for fd in kept:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    if stdin:
        os.set_blocking(in_fd, False)
        sel.register(in_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()

    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            events = sel.select(min(remaining, _POLL_S))
            for key, _ in events:
                if key.fd == in_fd:
                    try:
                        written += os.write(in_fd, stdin[written : written + _PIPE_CHUNK])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # it stopped reading; that is its business
                        written = len(stdin)
                    if written >= len(stdin):
                        sel.unregister(in_fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(key.fd, _PIPE_CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                room = max(max_output_bytes - len(kept[key.fd]), 0)
                truncated |= len(chunk) > room
                kept[key.fd] += chunk[:room]
            readers_open = any(fd in sel.get_map() for fd in kept)
            # Done once the program has exited and either its output is drained,
            # or nothing arrived during a poll interval (then background children
            # hold the pipes open, and the cleanup kills them).
            if (not readers_open or not events) and _has_exited(proc.pid):
                break
    finally:
        sel.close()
    return _Pumped(bytes(kept[out_fd]), bytes(kept[err_fd]), timed_out, truncated)


# --------------------------------------------------------------------------- #
# Public entry points.
# --------------------------------------------------------------------------- #


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # real-time signals have no name
        return f"signal {signum}"


def _spawn_and_collect(
    code: str,
    stdin: str,
    timeout_s: float,
    memory_mb: int,
    isolation: Isolation,
    python_guard: bool,
    max_output_bytes: int,
) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="bar-sandbox-")
    try:
        with open(os.path.join(workdir, _PROGRAM_FILE), "w", encoding="utf-8") as f:
            f.write(code)
        runner = (_RUNNER if python_guard else "") + _PROGRAM_RUNNER
        start = time.monotonic()
        proc = subprocess.Popen(
            # -I: ignore PYTHON* env vars and user site; -S: no site-packages;
            # -B: do not write .pyc files into a shared stdlib.
            [isolation.interpreter, "-I", "-S", "-B", "-c", runner, _PROGRAM_FILE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir},
            start_new_session=True,
            preexec_fn=_make_preexec(isolation, workdir, _rlimits(timeout_s, memory_mb)),
        )
        try:
            pumped = _pump(proc, stdin.encode("utf-8"), start + timeout_s, max_output_bytes)
        finally:
            _cleanup(proc.pid, isolation)
            returncode = proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
        duration_s = time.monotonic() - start
    finally:
        _remove_workdir(workdir)
    return SandboxResult(
        returncode=returncode,
        stdout=pumped.stdout.decode("utf-8", errors="replace"),
        stderr=pumped.stderr.decode("utf-8", errors="replace"),
        timed_out=pumped.timed_out,
        killed_by=_signal_name(-returncode) if returncode < 0 else None,
        duration_s=duration_s,
        output_truncated=pumped.truncated,
    )


def _works(isolation: Isolation) -> bool:
    """Try a trivial program under ``isolation``. Any failure means "not here"."""
    try:
        result = _spawn_and_collect(
            "import sys; assert sys.version_info >= (3, 8)", "", 10.0, 512, isolation, True, 4096
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.ok


@functools.lru_cache(maxsize=None)
def probe_isolation() -> Isolation:
    """Find the strongest kernel isolation this machine allows. The result is cached.

    Each candidate is tried by actually running a program, so what is
    reported is what works. The order is: namespaces (private network and
    IPC, else network only), then, as root, a private uid, else ``nobody``,
    with ``sys.executable`` or else the system ``python3``.
    """
    is_root = os.geteuid() == 0
    userns = 0 if is_root else CLONE_NEWUSER
    flags = next(
        (
            f
            for f in (userns | CLONE_NEWNET | CLONE_NEWIPC, userns | CLONE_NEWNET)
            if _works(Isolation(sys.executable, f, "none"))
        ),
        0,
    )
    if is_root:
        system_python = shutil.which("python3", path="/usr/bin:/bin")
        interpreters = [sys.executable] + ([system_python] if system_python else [])
        for uid_mode in ("private", "nobody"):
            for interpreter in interpreters:
                candidate = Isolation(interpreter, flags, uid_mode)
                if _works(candidate):
                    return candidate
    return Isolation(sys.executable, flags, "none")


def run_python(
    code: str,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    *,
    python_guard: bool = True,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    isolation: Isolation | None = None,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a contained Python process (see the module docstring).

    Args:
        code: program source.
        stdin: text fed to its standard input.
        timeout_s: wall-clock limit, interpreter start-up included. After it,
            the process group is SIGKILLed and ``timed_out`` is True.
        memory_mb: address-space limit (``RLIMIT_AS``). Going past it raises
            ``MemoryError`` in the program.
        python_guard: install the audit-hook layer (turn it off only to test
            the kernel layer alone).
        max_output_bytes: bytes kept per stream; ``output_truncated`` tells
            when more was written.
        isolation: override :func:`probe_isolation` (tests, or to weaken it
            on purpose).

    Returns:
        A :class:`SandboxResult`. The program's failures are reported in it,
        never raised. An exception here means the sandbox could not start.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    return _spawn_and_collect(
        code,
        stdin,
        timeout_s,
        memory_mb,
        isolation if isolation is not None else probe_isolation(),
        python_guard,
        max_output_bytes,
    )
