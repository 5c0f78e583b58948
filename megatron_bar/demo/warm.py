"""A warm interpreter for the demo's steps: torch, megatron-core and the project imported once,
each step run in a fork of it.

Every demo step is a command line a cluster user runs (``python -m megatron_bar.train CFG``,
``python tools/merge_experts.py ...``). Run as fresh processes, each of the demo's dozens
of steps first spends seconds of CPU importing torch, megatron-core, transformers and
matplotlib - more than most of the quick demo's stages spend training (bench/README.md,
"Figures behind design choices"). This server imports them once;
for each step it forks, and the child becomes the step: the step's log as stdout and stderr,
its environment, working directory and torch thread count, the random state of a fresh
interpreter, ``sys.argv`` as the command line gives it, and the entry point run by ``runpy``
as ``__main__`` - the same code path the command runs, without the imports.

Protocol (a Unix socket, one connection per step): the client sends one JSON line
``{"argv", "cwd", "env", "log", "threads"}``; the forked child runs the step and answers
its exit code as one line. A child that dies without answering (a signal, an abort) is
reported by the client as a failed step. The server exits when its stdin closes, i.e.
when the process that started it ends, however it ends.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import random
import runpy
import select
import shutil
import signal
import socket
import sys
import threading
import traceback

# What the demo's steps import; each import error is left for the step that needs it. Not
# the modules the steps run with `-m` (runpy executes those afresh as __main__, and a copy
# already imported would exist twice).
PRELOAD = ("torch", "megatron.core", "megatron_bar.train.trainer", "megatron_bar.rl.trainer",
           "megatron_bar.rl.fleet", "megatron_bar.rl.rewards", "megatron_bar.bar.merge",
           "megatron_bar.eval", "megatron_bar.convert.hf_io", "transformers", "matplotlib.pyplot",
           "ray", "math_verify")


def serve(path: str) -> None:
    for name in PRELOAD:
        with contextlib.suppress(Exception):  # the step that needs it reports it
            importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    # nothing more to say: the client stops reading, so a later write could fill the pipe
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [], 1.0)
        _reap()
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1024):
            return  # the demo ended
        if listener in readable:
            conn, _ = listener.accept()
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                listener.close()
                _become_step(conn)  # never returns
            conn.close()


def _reap() -> None:
    """Collect the steps that have ended (ChildProcessError: none left)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            continue


def _become_step(conn: socket.socket) -> None:
    code = 1
    try:
        request = json.loads(conn.makefile("r").readline())
        _enter(request)
        code = _run(request["argv"])
    except BaseException:  # noqa: BLE001 - reported in the step's log and exit code
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            atexit._run_exitfuncs()  # what a normal interpreter exit runs (e.g. ray.shutdown)
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(f"{code}\n".encode())
        finally:
            os._exit(code)


def _enter(request: dict) -> None:
    """Make this fork look like a fresh process started with the request's command line."""
    fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import numpy as np
    import torch

    random.seed()
    np.random.seed()

    torch.seed()  # a fresh interpreter's default generator starts from a random seed too
    # OMP_NUM_THREADS is read when torch loads, so in a fork it is set here
    torch.set_num_threads(int(request["threads"]))


def _run(argv: list[str]) -> int:
    args = argv[1:]  # argv[0] is the interpreter
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path[0] = os.getcwd()  # as `python -m` sets it
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path[0] = ""
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(args)
            sys.path[0] = os.path.dirname(os.path.abspath(args[0]))  # as `python script.py` sets it
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)
        return 1
    return 0


class WarmInterpreter:
    """The client: starts the server, runs steps through it, stops it."""

    def __init__(self, cwd: str | os.PathLike, env: dict[str, str]):
        import subprocess
        import tempfile

        # a Unix socket's path is limited to ~100 bytes, so not in the (possibly deep) run folder
        self._dir = tempfile.mkdtemp(prefix="bar-warm-")
        self.path = os.path.join(self._dir, "socket")
        self.proc = subprocess.Popen([sys.executable, "-m", "megatron_bar.demo.warm", self.path], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        # started now, waited for at the first step: the imports overlap whatever runs first
        self._ready = False
        self._lock = threading.Lock()

    def _wait_ready(self) -> None:
        with self._lock:
            if self._ready:
                return
            said = []
            for line in self.proc.stdout:  # import-time chatter, then "ready"
                if line.strip() == "ready":
                    self._ready = True
                    return
                said.append(line)
            self.proc.wait()
            raise RuntimeError(f"the warm interpreter did not start (exit {self.proc.returncode}):\n"
                               + "".join(said)[-3000:])

    def run(self, argv: list[str], cwd: str | os.PathLike, env: dict[str, str], log: str | os.PathLike,
            threads: int) -> int:
        """Run one step (its log already opened by the caller); returns its exit code,
        -1 if it died without one."""
        self._wait_ready()
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": env, "log": str(log),
                   "threads": threads}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.path)
            s.sendall((json.dumps(request) + "\n").encode())
            answer = b""
            while chunk := s.recv(64):
                answer += chunk
        return int(answer) if answer.strip() else -1

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    serve(sys.argv[1])
