"""Shared by the slurm/ script tests: running a script, and a PATH without Slurm."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SLURM_COMMANDS = {"scontrol", "sbatch", "srun", "squeue", "scancel", "sinfo", "salloc", "sacct"}


@pytest.fixture(scope="session")
def path_without_slurm(tmp_path_factory) -> str:
    """A PATH holding this machine's /usr/bin and /bin commands but not Slurm's, so that
    "scontrol is not on PATH" can be tested on a machine where Slurm is installed."""
    bin_dir = tmp_path_factory.mktemp("no-slurm-bin")
    for d in ("/usr/bin", "/bin"):
        for exe in Path(d).iterdir():
            link = bin_dir / exe.name
            if exe.name not in SLURM_COMMANDS and not link.exists():
                link.symlink_to(exe)
    return str(bin_dir)


def _run_script(script: Path, env_extra: dict, *args: str, cwd: Path, timeout: int = 60,
               path_prefix: str | None = None) -> subprocess.CompletedProcess:
    """``bash SCRIPT ARGS`` with the environment minus any SLURM_* variable, plus ``env_extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(env_extra)
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session")
def run_script():
    """``run_script(script, env_extra, *args, cwd=..., timeout=60, path_prefix=None)``."""
    return _run_script
