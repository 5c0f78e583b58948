"""The README's demo command runs and its checks pass (it exits non-zero otherwise)."""

import subprocess
import sys

from helpers import REPO


def test_foundation_demo(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "foundation_demo.py"), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| megatron dense vs transformers Olmo2 |" in proc.stdout
    assert (tmp_path / "hf-bar2" / "config.json").is_file()
