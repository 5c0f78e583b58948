"""The pipeline on a real Slurm (tests/slurm/real_slurm/run_real_slurm_test.sh): a one-node
slurmctld + slurmd on this machine, slurm/pipeline.sh with the tiny configs, a job
preempted with scancel --signal=USR1 and requeued, every output checked. About 3 minutes;
needs root. Runs only when asked:

    MEGATRON_BAR_REAL_SLURM=1 python -m pytest tests/slurm/test_real_slurm.py -s
    MEGATRON_BAR_REAL_SLURM=install ...   # apt-get install slurm-wlm munge first if missing
"""

import os
import subprocess

import pytest

from helpers import REPO

ASKED = os.environ.get("MEGATRON_BAR_REAL_SLURM", "")


@pytest.mark.skipif(ASKED not in ("1", "install"), reason="set MEGATRON_BAR_REAL_SLURM=1 to run on a real Slurm")
@pytest.mark.timeout(1800)
def test_pipeline_on_a_real_slurm(tmp_path):
    script = REPO / "tests" / "slurm" / "real_slurm" / "run_real_slurm_test.sh"
    args = ["--install"] if ASKED == "install" else []
    proc = subprocess.run(["bash", str(script), *args], env={**os.environ, "WORK": str(tmp_path / "work")},
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-20000:])
    assert proc.returncode == 0, f"{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert "all checks passed" in proc.stdout
