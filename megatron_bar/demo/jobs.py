"""A small job graph for the demo: each step a subprocess (the tools and trainers a cluster
user runs), at most ``parallel`` at a time, in dependency order, with a progress display.

Each training stage runs in its own process, as on a cluster: megatron's process-group
and parallel state are per process, and a fresh process per stage is the robust way to
run many stages. By default the processes are forks of a warm interpreter
(:mod:`megatron_bar.demo.warm`) that imported torch and megatron-core once, which saves
each step those imports; ``warm=False`` starts each as a new interpreter. The log of each step is kept in ``<run>/logs/<name>.log``; a failed step
stops the demo with the tail of its log.

Progress (rich): one bar over the whole demo weighted by each step's estimated cost,
the running steps, and the time left estimated from the costs done so far.

Scheduling: of the steps whose dependencies are done, the one heading the longest chain
of estimated cost still to run starts first (critical-path order), so that long chains
such as the sequential baseline do not run alone at the end while a core idles.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megatron_bar.demo.warm import WarmInterpreter
from megatron_bar.utils.errors import UserError

# One thread per process by default, so that two steps share the 2 cores of a laptop
# without oversubscribing them. A step's thread count is fixed by the graph (Job.threads),
# never by what else happens to run, so CPU training stays bit-for-bit reproducible.
STEP_ENV = {"PYTHONWARNINGS": "ignore",
            "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0",
            # each RLVR stage starts its own local Ray, never joining one found on the machine
            "RAY_ADDRESS": "local"}


class StepFailed(UserError):
    """A demo step failed (non-zero exit, its log's tail in the message) or none can run."""


@dataclass
class Job:
    name: str
    command: Callable[[], list[str]] | None = None  # argv, built when the job starts
    fn: Callable[[], None] | None = None  # or in-process work (main thread only)
    deps: tuple[str, ...] = ()
    cost: float = 10.0  # estimated seconds: the progress bar's weight
    label: str = ""
    retries: int = 0  # re-runs after a failure (the stage resumes from its checkpoint)
    threads: int = 1  # torch threads: more only for steps that run alone by construction
    done_at: float = field(default=0.0, init=False)
    seconds: float = field(default=0.0, init=False)


def run_command(argv: list[str], log: Path, cwd: Path, retries: int = 0, threads: int = 1,
                warm: WarmInterpreter | None = None) -> None:
    for attempt in range(retries + 1):
        try:
            return _run_once(argv, log if attempt == 0 else log.with_suffix(f".retry{attempt}.log"), cwd,
                             threads, warm)
        except StepFailed:
            if attempt == retries:
                raise


def _run_once(argv: list[str], log: Path, cwd: Path, threads: int = 1, warm: WarmInterpreter | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **STEP_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("w") as f:
        f.write("$ " + " ".join(map(str, argv)) + "\n")
        f.flush()
        if warm is None:
            code = subprocess.run(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if warm is not None:
        code = warm.run(argv, cwd, env, log, threads)
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        what = f"exit code {code}" if code != -1 else "the step's process died without an exit code (a signal?)"
        raise StepFailed(f"{what}; log {log}:\n{tail}")


class JobGraph:
    def __init__(self, run_dir: Path, cwd: Path, parallel: int = 2, console=None, warm: bool = True):
        self.run_dir, self.cwd, self.parallel, self.warm = run_dir, cwd, parallel, warm
        self.jobs: dict[str, Job] = {}
        self.console = console

    def add(self, job: Job) -> Job:
        if job.name in self.jobs:
            raise ValueError(f"job {job.name!r} added twice")
        missing = [d for d in job.deps if d not in self.jobs]
        if missing:
            raise ValueError(f"job {job.name!r} depends on unknown {missing}")
        self.jobs[job.name] = job
        return job

    def _log_done(self, job: Job, progress, task) -> None:
        t = progress.tasks[0]
        # time left from the pace so far, in estimated-cost units
        left = t.elapsed * (t.total - t.completed) / t.completed if t.completed and t.elapsed else 0.0
        progress.console.print(f"{time.strftime('%H:%M:%S')} done {job.label or job.name} ({job.seconds:.0f}s); "
                               f"{t.percentage:.0f}% of the demo, about {left / 60:.1f} min left",
                               soft_wrap=True, highlight=False)

    def critical_path(self) -> dict[str, float]:
        """Job name -> its cost plus the costliest chain of jobs that depend on it."""
        dependents: dict[str, list[str]] = {name: [] for name in self.jobs}
        for job in self.jobs.values():
            for d in job.deps:
                dependents[d].append(job.name)
        length: dict[str, float] = {}
        for name in reversed(list(self.jobs)):  # jobs are added after their dependencies
            length[name] = self.jobs[name].cost + max((length[d] for d in dependents[name]), default=0.0)
        return length

    def run(self) -> dict[str, float]:
        """Run every job; returns job name -> seconds."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        total = sum(j.cost for j in self.jobs.values())
        done: set[str] = set()
        running: dict[Future, Job] = {}
        lock = threading.Lock()
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                            TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                            console=self.console, transient=False, refresh_per_second=2)
        path = self.critical_path()
        # longest remaining chain first; ties keep the order the jobs were added in
        pending = sorted(self.jobs.values(), key=lambda j: -path[j.name])
        warm = None
        if self.warm and any(j.command is not None for j in self.jobs.values()):
            warm = WarmInterpreter(self.cwd, {**os.environ, **STEP_ENV})
        # the warm interpreter closes last: after the pool has waited for every running step
        with (warm or contextlib.nullcontext()), progress, ThreadPoolExecutor(self.parallel) as pool:
            task = progress.add_task("demo", total=total)

            def describe():
                names = ", ".join(j.label or j.name for j in running.values())
                progress.update(task, description=f"{len(done)}/{len(self.jobs)} steps | running: {names or '-'}")

            while pending or running:
                ready = [j for j in pending if all(d in done for d in j.deps)]
                # in-process jobs run here, on the main thread, one at a time
                for job in ready:
                    if job.fn is not None and not running:
                        pending.remove(job)
                        t0 = time.time()
                        progress.update(task, description=f"{len(done)}/{len(self.jobs)} steps | running: {job.label or job.name}")
                        job.fn()
                        job.seconds = time.time() - t0
                        done.add(job.name)
                        progress.advance(task, job.cost)
                        self._log_done(job, progress, task)
                        break
                else:
                    for job in ready:
                        if job.command is not None and len(running) < self.parallel:
                            pending.remove(job)
                            argv = job.command()
                            log = self.run_dir / "logs" / f"{job.name}.log"
                            job.done_at = time.time()
                            running[pool.submit(run_command, argv, log, self.cwd, job.retries, job.threads, warm)] = job
                    describe()
                    if not running:
                        if pending and not any(all(d in done for d in j.deps) for j in pending):
                            raise StepFailed(f"no runnable job among {[j.name for j in pending]}")
                        continue
                    finished, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        job = running.pop(fut)
                        try:
                            fut.result()
                        except StepFailed as e:
                            for other in running:
                                other.cancel()
                            raise StepFailed(f"step {job.name} failed: {e}") from None
                        with lock:
                            job.seconds = time.time() - job.done_at
                            done.add(job.name)
                        progress.advance(task, job.cost)
                        self._log_done(job, progress, task)
                    describe()
        return {name: j.seconds for name, j in self.jobs.items()}


def python_module(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def python_script(path: Path, *args) -> list[str]:
    return [sys.executable, str(path), *map(str, args)]
