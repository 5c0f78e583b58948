"""TP=2 and DP=2 training (two gloo processes under torchrun, through the CLI) follows the
one-process loss curve within 1e-4 over 20 steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_bar.train.config import load_config
from megatron_bar.train.metrics import read_metrics
from megatron_bar.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "tiny" / "sft_tool_use.yaml"
STEPS = 20


@pytest.fixture(scope="module")
def setup(tiny_base, toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    paths = {**tiny_base, **toy_data}
    datasets = json.dumps([
        {"path": str(paths["tool_use"]), "kind": "chat", "weight": 0.5, "domain": "tool_use"},
        {"path": str(paths["general"]), "kind": "chat", "weight": 0.5, "domain": "general"},
    ])
    overrides = [f"model.load={paths['bar2']}", f"data.datasets={datasets}",
                 f"train.steps={STEPS}", "checkpoint.interval=1000", "optim.lr=3e-3",
                 "train.log_interval=1000"]
    out = root / "single"
    train(load_config(CONFIG, overrides + [f"train.output_dir={out}"]))
    return overrides, [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def _torchrun(overrides, out, parallel):
    from helpers import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "megatron_bar.train", str(CONFIG),
           *overrides, f"train.output_dir={out}", *parallel]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


@pytest.mark.parametrize("parallel", [["parallel.tp=2"], []], ids=["tp2", "dp2"])
def test_two_process_losses_match_one_process(setup, tmp_path, parallel):
    overrides, single = setup
    losses = _torchrun(overrides, tmp_path / "run", parallel)
    assert len(losses) == len(single) == STEPS
    assert single[-1] < single[0]
    worst = max(abs(a - b) for a, b in zip(losses, single))
    assert worst <= 1e-4, f"max loss difference {worst:.2e}: {losses} vs {single}"
