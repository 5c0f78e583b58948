"""Preemption: a signal before the time limit becomes a checkpoint and a requeue.

Slurm warns a job before its time limit (``#SBATCH --signal=USR1@300``), ``scancel
--signal=USR1`` does the same by hand, and preemption or the time limit itself sends
SIGTERM. On any of these the training loop finishes the step it is in, writes a
checkpoint, and the process exits with :data:`REQUEUE_EXIT_CODE`; the Slurm script
(``slurm/common.sh``) turns that code into ``scontrol requeue``, and the requeued job
resumes from ``latest`` - the step after the last one done, nothing repeated.

Every rank must stop at the same step (a checkpoint is a collective), yet a signal may
reach the ranks at different moments, or reach only some of them. So the flag each rank's
handler sets is combined over the world once per step (:meth:`Preemption.requested`, one
all-reduce of one number): any rank signalled stops every rank, after the same step.

Use (the SFT-style trainer does this; the RLVR trainer can do the same)::

    with Preemption() as preempt:
        while step < total_steps:
            ...one optimizer step...
            step += 1
            final = preempt.end_of_step(step, total_steps, cfg.checkpoint.interval, save) or final

where ``save(step)`` writes a checkpoint (every rank calls it) and returns its folder.
``end_of_step`` saves when the interval or the end is reached, or when a stop was
requested, and in the last case raises :class:`Preempted` - a ``SystemExit`` with code
:data:`REQUEUE_EXIT_CODE`, so ``finally`` blocks run (shutting down a Ray fleet, say)
and the process exits with that code without a traceback.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megatron_bar import platform

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry". The Slurm
# scripts requeue on it; any other non-zero code is a real failure and is not retried.
REQUEUE_EXIT_CODE = 75

# SIGUSR1: Slurm's early warning (--signal) or scancel --signal=USR1; SIGTERM: preemption,
# the time limit, scancel. (SIGINT stays a KeyboardInterrupt for interactive runs.)
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint: exit code :data:`REQUEUE_EXIT_CODE`."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int | None):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


class Preemption:
    """Signal handlers for the duration of a ``with`` block (restored afterwards)."""

    def __init__(self, signals=PREEMPT_SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None  # the first signal this process received
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            # stderr, unbuffered: lands in slurm-<job>.out at once.
            print(f"received {signal.Signals(signum).name}: checkpointing after this step, then "
                  f"exiting with code {REQUEUE_EXIT_CODE} (requeue)", file=sys.stderr, flush=True)

    def __enter__(self) -> "Preemption":
        # Python delivers signals to the main thread only; elsewhere (a test calling train()
        # from a worker thread) there is nothing to install.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self) -> bool:
        """Whether any rank was signalled. A collective: every rank calls it at every step."""
        flag = 1 if self.signum is not None else 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([flag], dtype=torch.int32, device=platform.device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return bool(flag)

    def end_of_step(self, step: int, total_steps: int, interval: int,
                    save: Callable[[int], Path]) -> Path | None:
        """Checkpoint when due (every ``interval`` steps and at the end) or when a stop was
        requested; after a requested stop before the end, raise :class:`Preempted`.
        Returns the checkpoint written at this step, if any."""
        stop = self.requested() and step < total_steps
        due = step % interval == 0 or step == total_steps
        path = save(step) if (due or stop) else None
        if stop:
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"preempted after step {step}/{total_steps}: checkpoint {path}; exiting with "
                      f"code {REQUEUE_EXIT_CODE} for a requeue", file=sys.stderr, flush=True)
            raise Preempted(step, path, self.signum)
        return path
