"""Progress line, metrics to JSONL and TensorBoard, and the loss-curve plot."""

from __future__ import annotations

import json
import time
from pathlib import Path


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
    """Writes one JSON line per step to ``metrics.jsonl`` (and TensorBoard when installed)
    and prints a progress line. On resume, lines after the resumed step are dropped, so
    the file of a resumed run equals that of an uninterrupted one."""

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
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= start_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"),
                                         purge_step=start_step + 1)
            except ImportError:
                self._tb = None

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
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
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


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
