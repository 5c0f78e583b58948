"""Shared by the trainer tests: the tiny default inputs, built once per session, and a
runner for ``python -m megatron_bar.train`` as a subprocess.

* ``tiny_base``: ``{"dense": Path, "bar2": Path}`` from ``megatron_bar.demo.tiny.build_tiny_base``
  (a tiny Olmo 2 and its 2-expert BAR MoE, both with the SentencePiece tokenizer).
* ``toy_data``: ``{"tool_use": Path, "general": Path, "midtrain": Path}`` from
  ``megatron_bar.demo.toy_data.write_toy_sets``.
* ``train_cli``: runs the trainer CLI (one OpenMP thread, so CPU runs are reproducible).

Both are session-scoped and shared: tests must not modify them (copy first).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# One thread: CPU training is then bit-for-bit reproducible, and two runs fit on 2 cores.
TRAIN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


class TrainCLI:
    """``python -m megatron_bar.train`` as a subprocess (fixture ``train_cli``)."""

    @staticmethod
    def env() -> dict[str, str]:
        return {**os.environ, **TRAIN_ENV}

    @staticmethod
    def command(config: Path, *overrides: str) -> list[str]:
        return [sys.executable, "-m", "megatron_bar.train", str(config), *overrides]

    def run(self, config: Path, *overrides: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
        """Run to the end; the exit code is not checked."""
        return subprocess.run(
            self.command(config, *overrides), cwd=cwd, env=self.env(),
            capture_output=True, text=True, timeout=timeout,
        )

    @staticmethod
    def write_config(path: Path, data: dict) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path


@pytest.fixture(scope="session")
def train_cli() -> TrainCLI:
    return TrainCLI()
