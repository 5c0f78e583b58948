"""Progress line, metrics to JSONL and TensorBoard, and the loss-curve plot."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def format_rate(per_s: float, unit: str) -> str:
    """``512 tok/s``, ``12.3k tok/s``, ``1.25M tok/s``: three significant digits at any scale."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_s >= scale:
            return f"{per_s / scale:.3g}{prefix} {unit}"
    return f"{per_s:.3g} {unit}"


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Appends one JSON line per step to ``metrics.jsonl`` (and TensorBoard when installed)
    and prints a progress line. On resume, lines after the resumed step are dropped, so
    the file of a resumed run equals that of an uninterrupted one; the history up to the
    resumed step is kept. The file is only ever appended to, or replaced whole through a
    temporary file and a rename, so a kill at any moment leaves the history intact (at most
    a torn last line, which the next resume drops with a warning)."""

    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int = 0,
                 enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.path = Path(output_dir) / "metrics.jsonl"
        self._t0 = time.perf_counter()
        self._tokens = 0
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keep_history_until(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"),
                                         purge_step=start_step + 1)
            except ImportError:
                self._tb = None

    def _keep_history_until(self, start_step: int) -> None:
        if not self.path.exists():
            if start_step:
                log.warning("%s: not found; the metrics of steps 1-%d are lost", self.path, start_step)
            return
        records, torn = _read_records(self.path)
        kept = [(line, r) for line, r in records if r["step"] <= start_step]
        steps = {r["step"] for _, r in kept}
        missing = [s for s in range(1, start_step + 1) if s not in steps]
        if missing:
            log.warning("%s: holds no metrics for %d of the steps 1-%d before the resumed "
                        "checkpoint (first: step %d); they are lost", self.path, len(missing),
                        start_step, missing[0])
        if torn or len(kept) < len(records):
            _replace_text(self.path, "".join(line + "\n" for line, _ in kept))

    def log(self, step: int, metrics: dict, tokens: int, print_line: bool = True) -> None:
        """``step`` is 1-based (the number of optimizer steps done)."""
        self._tokens += tokens
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._t0
        done = step - self.start_step
        tokens_per_s = self._tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total_steps - step) if done else 0.0
        record = {"step": step, **metrics}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise type(e)(e.errno, f"{self.path}: cannot append the metrics of step {step} "
                                   f"({e.strerror})") from e
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
            self._tb.add_scalar("tokens_per_s", tokens_per_s, step)
        if print_line:
            parts = [f"step {step}/{self.total_steps}"]
            for key in ("loss", "lr", "grad_norm"):
                if key in metrics:
                    parts.append(f"{key} {metrics[key]:.4g}")
            parts += [format_rate(tokens_per_s, "tok/s"), f"ETA {_format_duration(eta)}"]
            print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def check_metrics_file(output_dir: str | Path) -> None:
    """A ``metrics.jsonl`` that a resume would stop on (a bad line before the last) is an
    error naming file and line: called before the checkpoint loads, which may take minutes."""
    path = Path(output_dir) / "metrics.jsonl"
    if path.is_file():
        _read_records(path, warn=False)


def _read_records(path: Path, warn: bool = True) -> tuple[list[tuple[str, dict]], bool]:
    """``(line, record)`` of every complete line, and whether the last line is torn (cut
    short by a kill: no newline at its end, or not a record). A bad line elsewhere is an
    error naming the file and line."""
    lines = path.read_text().split("\n")
    if lines[-1] == "":
        lines.pop()  # the file ends with a newline
    records, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as e:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not a metrics record ({e}); fix or remove "
                                 "the line") from None
            if warn:
                log.warning("%s:%d: dropped a torn last line (a run killed while writing it): %.60r",
                            path, number, line)
            torn = True
            continue
        records.append((line, record))
    return records, torn


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a torn last line is dropped with a warning."""
    return [record for _, record in _read_records(Path(path))[0]]


def plot_loss_curve(metrics_path: str | Path, out_png: str | Path, title: str = "training loss"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (token mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
