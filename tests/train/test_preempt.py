"""Preemption (megatron_bar/train/preempt.py): SIGUSR1 to a real training run makes it
finish the step in flight, write a checkpoint of that step and exit with code 75; the
same command then resumes there and ends with the same weights, scheduler state and loss
curve as a run that was never interrupted (bit-exact on CPU with one thread), without
training any step twice. The interrupted run is started by slurm/sft.sh (outside Slurm)
and the signal sent to the script's shell, as Slurm's --signal=B:USR1 does: the script
forwards it and exits 75. And the stop is collective: a signal that reaches one rank of
two stops both after the same step."""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import psutil

from helpers import REPO

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_resume's run and helpers
from test_resume import (  # noqa: E402
    Launch,
    assert_same_weights,
    logged_steps,
    metrics_rows,
    train_config,
    train_state,
)

from megatron_bar.train.preempt import REQUEUE_EXIT_CODE

STEPS = 12  # test_resume's run: 12 steps of the tiny SFT


def _launch(train_cli, tmp_path, name, config):
    return Launch(train_cli.command(config), tmp_path, train_cli.env(), tmp_path / name)


def test_signal_checkpoints_exits_75_and_resume_equals_uninterrupted(tmp_path, tiny_base, toy_data, train_cli):
    # interval 100: the only checkpoint before the end can come from the signal.
    base_out, out = tmp_path / "base", tmp_path / "run"
    base_cfg = train_cli.write_config(tmp_path / "base.yaml", train_config(tiny_base, toy_data, base_out, 100, 2))
    cfg = train_cli.write_config(tmp_path / "run.yaml", train_config(tiny_base, toy_data, out, 100, 2))
    baseline = _launch(train_cli, tmp_path, "baseline", base_cfg)  # on the other core meanwhile
    env = {k: v for k, v in train_cli.env().items() if not k.startswith("SLURM_")}
    env.update(CONFIG=str(cfg), PYTHON=sys.executable)
    first = Launch(["bash", str(REPO / "slurm" / "sft.sh")], tmp_path, env, tmp_path / "attempt0")
    try:
        # Deterministic, however loaded the machine: once the trainer has started (its
        # handlers are installed before the freeze table is printed), freeze it, signal the
        # script, and let it go only when the script has forwarded the signal.
        deadline = time.monotonic() + 240
        while "freeze policy" not in first.output():
            assert first.proc.poll() is None, f"the run ended before the signal:\n{first.output()[-3000:]}"
            assert time.monotonic() < deadline, first.output()[-3000:]
            time.sleep(0.01)
        (trainer,) = psutil.Process(first.proc.pid).children()
        trainer.suspend()  # SIGSTOP
        at_stop = logged_steps(out)
        assert at_stop < STEPS - 1, f"the run got to step {at_stop} before it could be stopped"
        first.proc.send_signal(signal.SIGUSR1)  # the script's shell; it forwards to the trainer
        while "received SIGUSR1" not in (out / "jobs.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        trainer.resume()  # SIGCONT: the pending SIGUSR1 is handled at once
        first.proc.wait(timeout=240)
    finally:
        first.kill()
    log = first.output()
    assert first.proc.returncode == REQUEUE_EXIT_CODE, f"exit {first.proc.returncode}:\n{log[-3000:]}"
    m = re.search(r"preempted after step (\d+)/12: checkpoint (\S+);", log)
    assert m, log[-3000:]
    stop = int(m.group(1))
    root = out / "checkpoints"
    assert at_stop <= stop <= at_stop + 1 and stop < STEPS  # the step in flight, then stop
    assert (root / "latest").read_text().strip() == f"iter_{stop:07d}" == m.group(2).rsplit("/", 1)[1]
    assert train_state(root / f"iter_{stop:07d}")["step"] == stop
    assert [r["step"] for r in metrics_rows(out)] == list(range(1, stop + 1))
    jobs_log = (out / "jobs.log").read_text()
    assert "received SIGUSR1" in jobs_log and "stopped for preemption (exit 75)" in jobs_log, jobs_log

    second = _launch(train_cli, tmp_path, "attempt1", cfg)
    log2 = second.finish()
    assert f"resumed from {root / f'iter_{stop:07d}'} at step {stop}" in log2, log2[-3000:]
    trained = [int(s) for s in re.findall(r"^step (\d+)/12 ", log2, re.M)]
    assert trained == list(range(stop + 1, STEPS + 1)), f"the resumed run trained steps {trained}"

    baseline.finish()
    final, expected = root / f"iter_{STEPS:07d}", base_out / "checkpoints" / f"iter_{STEPS:07d}"
    assert_same_weights(final, expected)
    assert train_state(final) == train_state(expected)
    assert metrics_rows(out) == metrics_rows(base_out)


# -- the collective stop, on two gloo ranks ---------------------------------------------------


def _two_ranks(rank: int, port: int, results):
    import os

    import torch.distributed as dist

    from megatron_bar.train.preempt import Preempted, Preemption

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    saved = []
    with Preemption() as preempt:
        try:
            for step in range(1, 6):
                if rank == 1 and step == 3:
                    os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told
                preempt.end_of_step(step, total_steps=10, interval=4, save=lambda s: saved.append(s) or f"ckpt{s}")
            results[rank] = ("finished", saved)
        except Preempted as e:
            results[rank] = ("preempted", saved, e.step, e.code, e.checkpoint)
    # handlers restored after the block
    results[f"handler{rank}"] = signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    dist.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_two_ranks, args=(port, results), nprocs=2, join=True)  # fresh processes, gloo
    for rank in (0, 1):
        # checkpoints at the interval (4) would come later: the step-3 save is the preemption's
        assert results[rank] == ("preempted", [3], 3, REQUEUE_EXIT_CODE, "ckpt3"), (rank, results[rank])
        assert results[f"handler{rank}"]


def test_checkpoints_when_due_and_a_signal_at_the_last_step_just_finishes():
    import os

    from megatron_bar.train.preempt import Preemption

    saved = []
    with Preemption() as preempt:
        for step in range(1, 8):
            if step == 7:
                os.kill(os.getpid(), signal.SIGTERM)  # during the last step: nothing left to resume
            preempt.end_of_step(step, total_steps=7, interval=3, save=saved.append)
    assert saved == [3, 6, 7] and preempt.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not preempt._handle
