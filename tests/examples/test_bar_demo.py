"""The README's demo, in its quick form, end to end: every output exists and is
well-formed, and the states that are robust at this size hold."""

import json
import subprocess
import sys

import pytest

from helpers import REPO

from megatron_bar.demo import domains as D

# The quick demo takes a few minutes on 2 idle cores; the fixture's run counts against the
# first test, so allow for a loaded machine (no timing is asserted).
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bar_demo") / "run"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "bar_demo.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_outputs_exist_and_are_well_formed(quick_run):
    out, stdout = quick_run
    result = json.loads((out / "results.json").read_text())
    cols = [*D.DOMAINS, "general", "overall"]
    assert result["columns"] == cols
    rows = result["table"]
    for row in ("base", *[f"expert: {d}" for d in D.DOMAINS], "BAR", "BAR (HF FlexOlmo export)",
                "BAR, 4 of 5 experts active", "BAR + code v2 (upgrade)", "monolithic retraining",
                "sequential training", "dense weight merging", "expert: tool_use, frozen embeddings",
                "expert: safety, domain data only"):
        assert row in rows, row
        assert set(rows[row]) == set(cols)
        assert all(0.0 <= v <= 100.0 for v in rows[row].values()), (row, rows[row])
        mean5 = sum(rows[row][c] for c in cols[:-1]) / 5
        assert abs(rows[row]["overall"] - mean5) < 0.05, row
    for png in ("results.png", "reward_curves.png", "router_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    md = (out / "results.md").read_text()
    assert "| BAR |" in md and "## The method's findings" in md and "## Cost" in md
    assert "| BAR |" in stdout
    assert {c["claim"] for c in result["claims"]} and all(isinstance(c["reproduced"], bool) for c in result["claims"])
    assert (out / "models" / "export_hf" / "config.json").is_file()


def test_robust_states(quick_run):
    out, _ = quick_run
    result = json.loads((out / "results.json").read_text())
    t = result["table"]
    # Without trainable embeddings and LM head the new <tool_call> token cannot be emitted.
    assert t["expert: tool_use, frozen embeddings"]["tool_use"] == 0.0
    # The HF FlexOlmo export is the same model: within a prompt's worth of the megatron scores.
    assert abs(t["BAR (HF FlexOlmo export)"]["overall"] - t["BAR"]["overall"]) <= 100 / (5 * 16) + 1e-6
    cost = result["cost"]
    # BAR's upgrade retrains one expert and the router; monolithic retraining redoes everything.
    up = cost["upgrade_one_domain"]
    assert up["BAR (new code expert + router)"] < up["monolithic retraining (retrain everything)"]
    growth = [g["monolithic: add one more"] for g in cost["growth"]]
    assert growth == sorted(growth) and growth[-1] > growth[0]
    # reward curves were recorded for each RLVR run
    for label in ("math", "code"):
        assert (out / "stages" / f"bar_{label}_rl" / "metrics.jsonl").is_file()
