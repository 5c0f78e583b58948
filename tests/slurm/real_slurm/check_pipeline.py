"""Check what run_real_slurm_test.sh left: every job of the chain completed in dependency
order, every stage trained to its last step, the preempted job resumed from its own
checkpoint without repeating a step, and the merged + router-trained model loads and runs.

    python tests/slurm/real_slurm/check_pipeline.py --work WORK --preempted JOB_ID

Exits 1 with a list of what failed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

FAILURES: list[str] = []


def check(ok: bool, what: str) -> bool:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILURES.append(what)
    return ok


def job_record(work: Path, job: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (values hold no spaces except Command/paths)."""
    text = (work / f"job-{job}.txt").read_text().strip()
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))


def when(value: str) -> datetime:
    return datetime.fromisoformat(value)


def latest_checkpoint(run_dir: Path) -> Path | None:
    marker = run_dir / "checkpoints" / "latest"
    return run_dir / "checkpoints" / marker.read_text().strip() if marker.is_file() else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--preempted", required=True, help="the job id sent SIGUSR1")
    args = p.parse_args()
    work, run_root = args.work, args.work / "runs" / "bar"

    # -- the chain ------------------------------------------------------------------------
    submitted = [line.split() for line in (work / "submitted.txt").read_text().splitlines()
                 if line.split() and line.split()[0].isdigit()]
    jobs = {fields[1]: fields[0] for fields in submitted}
    deps = {fields[1]: fields[3].split(":") if len(fields) > 3 else [] for fields in submitted}
    records = {name: job_record(work, job) for name, job in jobs.items()}
    check({"bar-math-midtrain", "bar-math-sft", "bar-tool_use-sft", "bar-merge", "bar-router"} <= set(jobs),
          f"pipeline.sh submitted every stage: {sorted(jobs)}")
    order = {"midtrain": 0, "sft": 1, "rlvr": 2}
    last_stage: dict[str, str] = {}
    for name in jobs:
        parts = name.split("-")
        if len(parts) == 3 and parts[2] in order:
            d = parts[1]
            if d not in last_stage or order[parts[2]] > order[last_stage[d].split("-")[2]]:
                last_stage[d] = name
    check(sorted(deps["bar-merge"]) == sorted(jobs[n] for n in last_stage.values()),
          f"the merge waits on every domain's last stage {sorted(last_stage.values())}: {deps['bar-merge']}")
    check(deps["bar-math-sft"] == [jobs["bar-math-midtrain"]], "math sft waits on math midtrain")
    check(deps["bar-router"] == [jobs["bar-merge"]], "the router waits on the merge")
    for name, rec in records.items():
        check(rec.get("JobState") == "COMPLETED" and rec.get("ExitCode") == "0:0",
              f"{name} (job {jobs[name]}): {rec.get('JobState')} exit {rec.get('ExitCode')}")
        for dep in deps[name]:
            dep_name = next(n for n, j in jobs.items() if j == dep)
            check(when(rec["StartTime"]) >= when(records[dep_name]["EndTime"]),
                  f"{name} started ({rec['StartTime']}) after {dep_name} ended ({records[dep_name]['EndTime']})")

    # -- every training stage ran to its last step ------------------------------------------
    stage_dirs = {name: run_root / Path(*name.split("-")[1:]) for name in jobs
                  if name not in ("bar-merge", "bar-router")}
    stage_dirs["bar-router"] = run_root / "router"
    for name, run_dir in stage_dirs.items():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        last = latest_checkpoint(run_dir)
        state = json.loads((last / "train_state.json").read_text()) if last else {}
        check(bool(rows) and [r["step"] for r in rows] == list(range(1, len(rows) + 1))
              and state.get("step") == len(rows),
              f"{name}: {len(rows)} steps logged, final checkpoint {last and last.name}")
        job_log = (run_dir / "jobs.log").read_text()
        check("finished" in job_log, f"{name}: jobs.log says finished")
        link = run_dir / "logs" / f"slurm-{jobs[name]}.out"
        check(link.is_file(), f"{name}: {link} leads to the Slurm output")

    math_sft_cfg = json.loads((stage_dirs["bar-math-sft"] / "config.json").read_text())
    check(Path(math_sft_cfg["model"]["load"]) == latest_checkpoint(stage_dirs["bar-math-midtrain"]),
          f"math sft started from math midtrain's last checkpoint: {math_sft_cfg['model']['load']}")

    # -- the preempted job ----------------------------------------------------------------
    pre = args.preempted
    pre_name = next(n for n, j in jobs.items() if j == pre)
    pre_dir = stage_dirs[pre_name]
    out = (work / f"slurm-{pre}.out").read_text()
    check(records[pre_name].get("Restarts") == "1", f"{pre_name} was requeued once "
          f"(Restarts={records[pre_name].get('Restarts')})")
    check("received SIGUSR1" in out, f"{pre_name}: the ranks got SIGUSR1")
    m = re.search(r"preempted after step (\d+)/(\d+): checkpoint (\S+);", out)
    if check(m is not None, f"{pre_name}: checkpointed on the signal"):
        k, total, ckpt = int(m.group(1)), int(m.group(2)), m.group(3)
        check(0 < k < total and ckpt.endswith(f"iter_{k:07d}"), f"preemption checkpoint at step {k} of {total}")
        check(f"resumed from {ckpt} at step {k}" in out, f"the requeued attempt resumed from step {k}")
        steps = Counter(int(s) for s in re.findall(rf"^step (\d+)/{total} ", out, re.M))
        repeated = sorted(s for s, c in steps.items() if c > 1)
        check(sorted(steps) == list(range(1, total + 1)) and not repeated,
              f"every step 1..{total} trained exactly once across both attempts (repeated: {repeated})")
    attempts = re.findall(r"start on .* \(attempt (\d+)\)", (pre_dir / "jobs.log").read_text())
    check(attempts == ["1", "2"], f"{pre_name}: jobs.log records attempts {attempts}")

    # -- the merged model, then the router-trained one ----------------------------------------
    manifest = json.loads((run_root / "merged" / "bar_manifest.json").read_text())
    domains = sorted(last_stage)
    names = sorted(e["name"] for e in manifest["experts"])
    check(names == domains, f"merged experts {names} = domains {domains}")
    import torch

    import megatron_bar

    merged = megatron_bar.load_model(run_root / "merged")
    routed = megatron_bar.load_model(latest_checkpoint(run_root / "router"))
    tokens = torch.randint(0, merged.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(tokens), routed(tokens)
    check(a.shape == (2, 32, merged.config.vocab_size) and bool(torch.isfinite(a).all()),
          f"the merged model ({merged.config.num_experts} experts) runs: logits {tuple(a.shape)}")
    check(bool(torch.isfinite(b).all()) and not torch.equal(a, b), "the router-trained model runs, differently")
    pa, pb = dict(merged.gpt.named_parameters()), dict(routed.gpt.named_parameters())
    moved = sorted(k for k in pa if not torch.equal(pa[k], pb[k]))
    check(bool(moved) and all("router" in k for k in moved),
          f"router training changed only router weights ({len(moved)} tensors)")

    if FAILURES:
        print(f"\n{len(FAILURES)} check(s) failed:\n  " + "\n  ".join(FAILURES), file=sys.stderr)
        sys.exit(1)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
