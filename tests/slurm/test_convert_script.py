"""slurm/convert.sh: syntax, --help, a missing setting, and a real run outside Slurm."""

import os
import shutil
import subprocess

import pytest

from helpers import REPO
from megatron_bar.model.config import ModelConfig

SCRIPT = REPO / "slurm" / "convert.sh"


def run(env_extra, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(env_extra, PYTHONWARNINGS="ignore")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_syntax_and_help():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = run({}, "--help")
    assert proc.returncode == 0 and "HF_DIR" in proc.stdout and "DIRECTION" in proc.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    assert subprocess.run(["shellcheck", str(SCRIPT)]).returncode == 0


def test_missing_setting_is_a_clear_error():
    proc = run({"HF_DIR": "/nonexistent"})
    assert proc.returncode != 0 and "SAVE" in proc.stderr


def test_converts_outside_slurm(hf_dense_dir, tmp_path):
    import sys

    proc = run({"HF_DIR": str(hf_dense_dir), "SAVE": str(tmp_path / "out"), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert ModelConfig.load(tmp_path / "out").num_layers == 2
