"""Kill the trainer with SIGKILL, restart the same command: nothing changes.

Every run goes through the real CLI (``python -m megatron_bar.train``) in its own process
group, and is killed with SIGKILL. With one OpenMP thread, CPU training is deterministic,
so "nothing changes" is bit-exact: the final weights (``torch.equal`` on every tensor of
``megatron_bar.load_model(final).gpt``), the scheduler state and every row of
``metrics.jsonl`` equal those of one uninterrupted run (the module fixture ``baseline``,
which checkpoints every step and keeps them all, so any checkpoint left by a killed run
can be compared with the uninterrupted run's checkpoint of the same step).

The random choices (which step, which moment) are seeded, so a failure reproduces.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

STEPS = 12
SEED = 20240607  # the kill schedule; change it to explore other moments


def train_config(tiny_base, toy_data, output_dir: Path, interval: int, keep_last: int) -> dict:
    return {
        "model": {"load": str(tiny_base["bar2"])},
        "data": {
            "datasets": [
                {"path": str(toy_data["tool_use"]), "kind": "chat", "weight": 0.5, "domain": "tool_use"},
                {"path": str(toy_data["general"]), "kind": "chat", "weight": 0.5, "domain": "general"},
            ],
            "seq_length": 128,
            # the grown vocabulary must be rebuilt identically on resume
            "add_special_tokens": ["<tool_call>", "</tool_call>"],
        },
        "optim": {"lr": 3.0e-3, "schedule": "cosine", "warmup_steps": 3, "clip_grad": 1.0},
        "train": {
            "stage": "sft", "steps": STEPS, "global_batch_size": 8, "micro_batch_size": 4,
            "seed": 1234, "log_interval": 1, "output_dir": str(output_dir),
        },
        "checkpoint": {"interval": interval, "keep_last": keep_last},
    }


# -- reading what a run left ---------------------------------------------------------------

_weights_cache: dict[str, dict[str, torch.Tensor]] = {}


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's model, as ``megatron_bar.load_model`` loads it."""
    import megatron_bar

    key = str(Path(path).resolve())
    if key not in _weights_cache:
        gpt = megatron_bar.load_model(path).gpt
        _weights_cache[key] = {
            k: v.detach().clone() for k, v in gpt.state_dict().items() if isinstance(v, torch.Tensor)
        }
    return _weights_cache[key]


def assert_same_weights(got: Path, expected: Path) -> None:
    a, b = weights(got), weights(expected)
    assert a.keys() == b.keys(), f"{got} and {expected} hold different tensors"
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{got} differs from {expected} in {len(differ)} tensors, e.g. {differ[:3]}"


def metrics_rows(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def logged_steps(output_dir: Path) -> int:
    """Complete lines in metrics.jsonl (read while the run writes it)."""
    try:
        return (Path(output_dir) / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def train_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "train_state.json").read_text())


def iteration_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("iter_*"))


def incomplete_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob(".iter_*.incomplete"))


def check_latest(root: Path, baseline: "Baseline") -> int:
    """``latest`` names a complete checkpoint that loads and equals the uninterrupted run's
    checkpoint of its step; returns that step (0 when nothing was saved yet)."""
    from megatron_bar.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(root)  # raises if `latest` names an incomplete folder
    if latest is None:
        assert not (root / "latest").exists()
        return 0
    assert latest.parent == root and re.fullmatch(r"iter_\d{7}", latest.name), (
        f"latest names {latest}: not a finished iter_ folder"
    )
    step = train_state(latest)["step"]
    assert latest.name == f"iter_{step:07d}"
    assert_same_weights(latest, baseline.checkpoint(step))
    assert train_state(latest) == train_state(baseline.checkpoint(step))
    return step


def assert_equals_baseline(output_dir: Path, baseline: "Baseline") -> None:
    root = output_dir / "checkpoints"
    final = root / f"iter_{STEPS:07d}"
    assert (root / "latest").read_text().strip() == final.name
    assert_same_weights(final, baseline.checkpoint(STEPS))
    assert train_state(final) == train_state(baseline.checkpoint(STEPS))
    rows, expected = metrics_rows(output_dir), baseline.rows
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows == expected, "the loss curve differs from the uninterrupted run's:\n" + "\n".join(
        f"  step {b['step']}: loss {a['loss']!r} vs {b['loss']!r}" for a, b in zip(rows, expected) if a != b
    )
    assert not incomplete_dirs(root), f"temporary checkpoint folders left: {incomplete_dirs(root)}"


# -- running and killing -------------------------------------------------------------------


@dataclass
class Launch:
    """One trainer process, in its own process group, output to files."""

    cmd: list[str]
    cwd: Path
    env: dict
    log: Path
    proc: subprocess.Popen = field(init=False)

    def __post_init__(self):
        self._out = open(self.log.with_suffix(".out"), "w")
        self._err = open(self.log.with_suffix(".err"), "w")
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.cwd, env=self.env, stdout=self._out, stderr=self._err,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.with_suffix(".out").read_text() + self.log.with_suffix(".err").read_text()

    def kill(self) -> None:
        """SIGKILL the run's process group (the trainer and the helper processes that
        megatron's checkpoint writer starts), if still running."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group only
        self.proc.wait()
        self._out.close()
        self._err.close()

    def kill_when(self, condition, delay: float = 0.0, timeout: float = 180.0) -> None:
        """SIGKILL ``delay`` seconds after ``condition()`` first holds."""
        deadline = time.monotonic() + timeout
        try:
            while not condition():
                if self.proc.poll() is not None:
                    pytest.fail(f"the run ended ({self.proc.returncode}) before the kill:\n{self.output()[-4000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no kill point within {timeout} s:\n{self.output()[-4000:]}")
                time.sleep(0.002)
            if delay:
                time.sleep(delay)
        finally:
            self.kill()
        assert self.proc.returncode == -signal.SIGKILL

    def finish(self, timeout: float = 300.0) -> str:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.kill()
        out = self.output()
        assert self.proc.returncode == 0, f"the run failed ({self.proc.returncode}):\n{out[-4000:]}"
        return out


class Baseline:
    """The uninterrupted run, with a checkpoint at every step, all kept. It runs in the
    background (next to the first test's own run, one core each) until first needed."""

    def __init__(self, launch: Launch, output_dir: Path):
        self._launch, self.output_dir, self._rows = launch, output_dir, None

    def _wait(self) -> None:
        if self._rows is not None:
            return
        self._launch.finish()
        root = self.output_dir / "checkpoints"
        assert iteration_dirs(root) == [f"iter_{s:07d}" for s in range(1, STEPS + 1)]
        rows = metrics_rows(self.output_dir)
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert rows[-1]["loss"] < rows[0]["loss"]
        # The comparisons below mean something only if the checkpoints load what trained.
        first, last = weights(root / "iter_0000001"), weights(root / f"iter_{STEPS:07d}")
        assert any(not torch.equal(first[k], last[k]) for k in first)
        self._rows = rows

    @property
    def rows(self) -> list[dict]:
        self._wait()
        return self._rows

    def checkpoint(self, step: int) -> Path:
        self._wait()
        return self.output_dir / "checkpoints" / f"iter_{step:07d}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_base, toy_data, train_cli):
    root = tmp_path_factory.mktemp("baseline")
    out = root / "run"
    config = train_cli.write_config(root / "config.yaml", train_config(tiny_base, toy_data, out, 1, 0))
    launch = Launch(train_cli.command(config), root, train_cli.env(), root / "baseline")
    yield Baseline(launch, out)
    launch.kill()  # only if a test failed before waiting for it


def _setup(tmp_path, tiny_base, toy_data, train_cli, interval: int, keep_last: int):
    out = tmp_path / "run"
    config = train_cli.write_config(
        tmp_path / "config.yaml", train_config(tiny_base, toy_data, out, interval, keep_last)
    )
    counter = iter(range(100))

    def launch() -> Launch:
        return Launch(train_cli.command(config), tmp_path, train_cli.env(), tmp_path / f"attempt{next(counter)}")

    return out, out / "checkpoints", launch


# -- the tests -----------------------------------------------------------------------------


def test_sigkill_at_a_random_step_then_restart_equals_uninterrupted(
    tmp_path, tiny_base, toy_data, train_cli, baseline
):
    out, root, launch = _setup(tmp_path, tiny_base, toy_data, train_cli, interval=3, keep_last=2)
    kill_step = random.Random(SEED).randint(4, STEPS - 1)  # past the first checkpoint (step 3)

    launch().kill_when(lambda: logged_steps(out) >= kill_step)
    resume_step = check_latest(root, baseline)
    assert resume_step >= 3 and resume_step % 3 == 0, resume_step
    assert resume_step <= kill_step <= logged_steps(out)

    log = launch().finish()
    assert f"resumed from {root / f'iter_{resume_step:07d}'} at step {resume_step}" in log, log[-3000:]
    assert_equals_baseline(out, baseline)
    assert iteration_dirs(root) == ["iter_0000009", "iter_0000012"]  # keep_last=2


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_latest(
    tmp_path, tiny_base, toy_data, train_cli, baseline
):
    """A checkpoint every step and kills while one is being written (the first at once when
    its temporary folder appears, the second a random moment later): after each kill
    ``latest`` names a complete checkpoint equal to the uninterrupted run's, a temporary
    folder is never taken for a checkpoint, and the final restart finishes the run exactly."""
    out, root, launch = _setup(tmp_path, tiny_base, toy_data, train_cli, interval=1, keep_last=2)
    rng = random.Random(SEED)
    frontier, kills = 0, []
    for i in range(2):
        # A step no earlier attempt reached, so its temporary folder is this attempt's own.
        target = frontier + rng.randint(1, 3)
        if target >= STEPS:
            break
        delay = 0.0 if i == 0 else rng.uniform(0.0, 0.4)
        tmp_dir = root / f".iter_{target:07d}.incomplete"
        launch().kill_when(tmp_dir.exists, delay=delay)
        left = incomplete_dirs(root)
        # `latest` is a complete checkpoint equal to the uninterrupted run's. (With a delay
        # the run may have got past `target` before the kill landed, so no bound on it.)
        resume_step = check_latest(root, baseline)
        kills.append({"target": target, "delay": round(delay, 3), "latest": resume_step, "incomplete": left})
        steps_seen = [int(re.search(r"\d+", n).group()) for n in left]
        frontier = max([resume_step, logged_steps(out), *steps_seen])
    print("kills:", kills)
    assert len(kills) == 2, kills
    assert any(k["incomplete"] for k in kills), f"no kill landed during a checkpoint write: {kills}"

    log = launch().finish() + f"\nkills: {kills}"
    resume_step = kills[-1]["latest"]
    if resume_step:
        assert f"resumed from {root / f'iter_{resume_step:07d}'} at step {resume_step}" in log, log[-3000:]
    assert_equals_baseline(out, baseline)
    assert iteration_dirs(root) == ["iter_0000011", "iter_0000012"]


def test_resume_ignores_stale_temporary_and_unmarked_checkpoints(
    tmp_path, tiny_base, toy_data, train_cli, baseline
):
    """What two kills can leave: ``iter_0000009`` complete but never made ``latest`` (killed
    between the rename and the marker update), a ``.iter_0000012.incomplete`` full of
    garbage (killed mid-write), a half-written marker and a torn last line of metrics. The restart resumes from
    ``latest`` (step 6), replaces both, and finishes as the uninterrupted run."""
    from megatron_bar.train.checkpoint import latest_checkpoint

    out, root, launch = _setup(tmp_path, tiny_base, toy_data, train_cli, interval=3, keep_last=2)
    root.mkdir(parents=True)
    for step in (6, 9):
        shutil.copytree(baseline.checkpoint(step), root / f"iter_{step:07d}")
    (root / "latest").write_text("iter_0000006\n")
    (root / ".latest.tmp").write_text("iter_00000")
    garbage = root / ".iter_0000012.incomplete"
    garbage.mkdir()
    (garbage / "metadata.json").write_text("{not json")
    (garbage / "train_state.json").write_text(json.dumps({"step": 12}))
    (garbage / "__0_0.distcp").write_bytes(os.urandom(4096))
    # the metrics of steps 1-9 and a torn line of step 10 (issue 27: it used to stop the resume)
    torn = json.dumps(baseline.rows[9])[:-30]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in baseline.rows[:9]) + torn)
    assert latest_checkpoint(root) == root / "iter_0000006"

    log = launch().finish()
    assert f"resumed from {root / 'iter_0000006'} at step 6" in log, log[-3000:]
    assert f"{out / 'metrics.jsonl'}:10: dropped a torn last line" in log, log[-3000:]
    assert_equals_baseline(out, baseline)
    assert iteration_dirs(root) == ["iter_0000009", "iter_0000012"]
    assert_same_weights(root / "iter_0000009", baseline.checkpoint(9))
    assert not (root / ".latest.tmp").exists()
