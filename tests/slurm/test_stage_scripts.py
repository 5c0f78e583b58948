"""slurm/{midtrain,sft,router,merge,pipeline}.sh and common.sh: syntax, shellcheck, --help,
clear errors for missing or bad settings, the commands they would run (DRY_RUN=1) on this
machine and in a (faked) Slurm allocation, and pipeline.sh's dependency chain. (The
preemption path of a stage script for real: tests/train/test_preempt.py; on a real Slurm:
test_real_slurm.py.)"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest

from helpers import REPO

SLURM = REPO / "slurm"
SCRIPTS = ["common.sh", "convert.sh", "math_rlvr.sh", "midtrain.sh", "sft.sh", "router.sh", "merge.sh",
           "pipeline.sh"]
TINY = REPO / "examples" / "configs" / "tiny"


@pytest.fixture
def run(run_script):
    def run(name, env=None, *args, **kw):
        return run_script(SLURM / name, env or {}, *args, cwd=kw.pop("cwd", REPO), **kw)
    return run


@pytest.mark.parametrize("name", SCRIPTS)
def test_syntax_and_shellcheck(name):
    assert subprocess.run(["bash", "-n", str(SLURM / name)]).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(SLURM / name)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("name,words", [
    ("midtrain.sh", ["CONFIG", "INIT_FROM", "OUTPUT_DIR", "GPUS_PER_NODE", "DRY_RUN", "requeue"]),
    ("sft.sh", ["CONFIG", "INIT_FROM", "OUTPUT_DIR", "EXTRA_ARGS"]),
    ("router.sh", ["CONFIG", "router"]),
    ("merge.sh", ["SAVE", "EXPERTS", "BASE", "REPLACE"]),
    ("pipeline.sh", ["DOMAINS", "STAGES", "RUN_ROOT", "afterok", "SBATCH_ARGS", "DRY_RUN"]),
])
def test_help(name, words, run):
    proc = run(name, {}, "--help")
    assert proc.returncode == 0, proc.stderr
    for w in words:
        assert w in proc.stdout, f"{name} --help does not mention {w}"
    assert "#SBATCH" not in proc.stdout and "set -euo" not in proc.stdout


def test_sbatch_headers_requeue_and_warn_before_the_time_limit():
    for name in ("midtrain.sh", "sft.sh", "router.sh", "merge.sh", "math_rlvr.sh"):
        text = (SLURM / name).read_text()
        assert "#SBATCH --requeue" in text and "#SBATCH --open-mode=append" in text, name
        assert re.search(r"#SBATCH --signal=B:USR1@\d+", text), name
        assert "#SBATCH --output=slurm-%j.out" in text, name


@pytest.mark.parametrize("name,env,message", [
    ("sft.sh", {}, "CONFIG (the stage's YAML config"),
    ("midtrain.sh", {"CONFIG": "/nonexistent.yaml"}, "CONFIG=/nonexistent.yaml: file not found"),
    ("router.sh", {"CONFIG": str(TINY / "router.yaml"), "TP": "two"}, "TP must be a whole number"),
    ("sft.sh", {"CONFIG": str(TINY / "sft_tool_use.yaml"), "INIT_FROM": "/"},
     "/: not a checkpoint, and no checkpoints/latest in it"),
    ("merge.sh", {"EXPERTS": "a=x"}, "SAVE (the merged checkpoint to write) is required"),
    ("merge.sh", {"SAVE": "out"}, "EXPERTS (NAME=DIR ...) or BASE (a merged checkpoint) is required"),
    ("merge.sh", {"SAVE": "out", "BASE": "b"}, "BASE needs REPLACE and/or ADD"),
    ("merge.sh", {"SAVE": "out", "EXPERTS": "nodir"}, "'nodir' is not NAME=DIR"),
    ("pipeline.sh", {"STAGES": "sft pretrain"}, "STAGES: 'pretrain' is not midtrain, sft or rlvr"),
    ("pipeline.sh", {"CONFIG_DIR": "/nonexistent"}, "CONFIG_DIR=/nonexistent: not a folder"),
    ("pipeline.sh", {"DOMAINS": "legal"}, "domain 'legal': no config for any of STAGES"),
])
def test_bad_settings_fail_clearly(name, env, message, run):
    proc = run(name, {"DRY_RUN": "1", **env})
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ")


def test_pipeline_without_sbatch_says_so(path_without_slurm, run):
    proc = run("pipeline.sh", {"PATH": path_without_slurm})
    assert proc.returncode == 1 and "sbatch is not on PATH" in proc.stderr


def _dry_pipeline(run, env):
    proc = run("pipeline.sh", {"DRY_RUN": "1", **env})
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    summary = [line.split() for line in proc.stdout.splitlines() if line.startswith("DRY")]
    return commands, summary


def _vars(cmd):
    return dict(w.split("=", 1) for w in cmd[: cmd.index("sbatch")])


def test_pipeline_dry_run_chains_every_domain_then_merge_then_router(tmp_path, run):
    # A config dir where one domain has two stages: math midtrain -> sft.
    cfg = tmp_path / "configs"
    cfg.mkdir()
    for f in ("midtrain_math.yaml", "sft_tool_use.yaml", "router.yaml", "rlvr_digits.yaml"):
        shutil.copy(TINY / f, cfg / f)
    shutil.copy(TINY / "sft_tool_use.yaml", cfg / "math_sft.yaml")  # <domain>_<stage>.yaml also counts
    commands, summary = _dry_pipeline(run, {"CONFIG_DIR": str(cfg), "RUN_ROOT": str(tmp_path / "r"),
                                       "SBATCH_ARGS": "--partition=gpu", "SBATCH_ARGS_MERGE": "--mem=0",
                                       "EXTRA_ARGS_SFT": "train.log_interval=1"})
    jobs = {s[1]: s[0] for s in summary}
    assert list(jobs) == ["bar-digits-rlvr", "bar-math-midtrain", "bar-math-sft", "bar-tool_use-sft",
                          "bar-merge", "bar-router"]
    by_name = {c[c.index("sbatch") + 2].split("=", 1)[1]: c for c in commands}
    for name, cmd in by_name.items():
        assert "--parsable" in cmd and "--kill-on-invalid-dep=yes" in cmd and "--partition=gpu" in cmd
        assert _vars(cmd)["BAR_ROOT"] == str(REPO) and _vars(cmd)["DRY_RUN"] == "0"
    dep = {n: next((w.split(":", 1)[1] for w in c if w.startswith("--dependency=")), None)
           for n, c in by_name.items()}
    assert dep["bar-digits-rlvr"] is None and dep["bar-math-midtrain"] is None and dep["bar-tool_use-sft"] is None
    assert dep["bar-math-sft"] == jobs["bar-math-midtrain"]
    assert dep["bar-merge"].split(":") == [jobs["bar-digits-rlvr"], jobs["bar-math-sft"], jobs["bar-tool_use-sft"]]
    assert dep["bar-router"] == jobs["bar-merge"]
    assert [s[2:] for s in summary if s[1] == "bar-merge"] == [["after", dep["bar-merge"]]]

    r = tmp_path / "r"
    v = {n: _vars(c) for n, c in by_name.items()}
    assert by_name["bar-digits-rlvr"][-1].endswith("slurm/math_rlvr.sh")
    assert by_name["bar-math-sft"][-1].endswith("slurm/sft.sh")
    assert v["bar-math-midtrain"]["INIT_FROM"] == "" and v["bar-math-midtrain"]["OUTPUT_DIR"] == f"{r}/math/midtrain"
    assert v["bar-math-sft"]["INIT_FROM"] == f"{r}/math/midtrain"
    assert v["bar-math-sft"]["CONFIG"] == str(cfg / "math_sft.yaml")
    assert v["bar-math-sft"]["EXTRA_ARGS"] == "train.log_interval=1" == v["bar-tool_use-sft"]["EXTRA_ARGS"]
    assert v["bar-math-midtrain"]["EXTRA_ARGS"] == ""
    assert v["bar-merge"]["EXPERTS"].split() == [f"digits={r}/digits/rlvr", f"math={r}/math/sft",
                                                  f"tool_use={r}/tool_use/sft"]
    assert v["bar-merge"]["SAVE"] == f"{r}/merged" and "--mem=0" in by_name["bar-merge"]
    assert "--mem=0" not in by_name["bar-router"]
    assert v["bar-router"]["INIT_FROM"] == f"{r}/merged" and v["bar-router"]["CONFIG"] == str(cfg / "router.yaml")


def test_pipeline_dry_run_one_domain_upgrade_and_no_merge(run):
    commands, summary = _dry_pipeline(run, {"DOMAINS": "tool_use", "BASE": "ckpt/bar-merged"})
    assert [s[1] for s in summary] == ["bar-tool_use-sft", "bar-merge", "bar-router"]
    merge = _vars(commands[1])
    assert merge["BASE"] == "ckpt/bar-merged" and merge["EXPERTS"] == ""
    assert merge["REPLACE"].startswith("tool_use=") and merge["REPLACE"].endswith("/tool_use/sft")
    _, summary = _dry_pipeline(run, {"DOMAINS": "math", "MERGE": "0", "AFTER": "41"})
    assert [s[1:] for s in summary] == [["bar-math-midtrain", "after", "41"]]


def test_stage_dry_run_in_a_slurm_allocation(tmp_path, run):
    """Two nodes of 8 GPUs: srun starts 16 ranks with torch.distributed's variables from
    Slurm's; INIT_FROM (a run dir) becomes model.load = its latest checkpoint."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'gpu1\\ngpu2\\n'\n")
    (fake / "scontrol").chmod(0o755)
    prev = tmp_path / "math" / "midtrain"
    (prev / "checkpoints" / "iter_0000040").mkdir(parents=True)
    (prev / "checkpoints" / "latest").write_text("iter_0000040\n")
    proc = run("sft.sh", {"DRY_RUN": "1", "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[1-2]",
                          "SLURM_GPUS_ON_NODE": "8", "CONFIG": str(TINY / "sft_tool_use.yaml"),
                          "INIT_FROM": str(prev), "OUTPUT_DIR": "runs/x", "EP": "2",
                          "EXTRA_ARGS": "optim.lr=1e-5 train.steps=3"}, path_prefix=str(fake))
    assert proc.returncode == 0, proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("+ ")]
    cmd = shlex.split(line[2:])
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=8", "--export=ALL,MASTER_ADDR=gpu1,MASTER_PORT=21234"]
    assert cmd[4:6] == ["bash", "-c"] and "RANK=$SLURM_PROCID" in cmd[6] and "WORLD_SIZE=$SLURM_NTASKS" in cmd[6]
    assert cmd[cmd.index("-m") + 1: cmd.index("-m") + 2] == ["megatron_bar.train"]
    tail = cmd[cmd.index(str(TINY / "sft_tool_use.yaml")) + 1:]
    assert tail == ["parallel.ep=2", f"model.load={prev}/checkpoints/iter_0000040", "train.output_dir=runs/x",
                    "optim.lr=1e-5", "train.steps=3"]


def test_stage_dry_run_outside_slurm(run):
    proc = run("midtrain.sh", {"DRY_RUN": "1", "CONFIG": "examples/configs/tiny/midtrain_math.yaml",
                               "PYTHON": "py3"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "+ py3 -m megatron_bar.train examples/configs/tiny/midtrain_math.yaml\n"
    proc = run("router.sh", {"DRY_RUN": "1", "CONFIG": "examples/configs/tiny/router.yaml",
                             "GPUS_PER_NODE": "2", "TP": "2"})
    assert proc.stdout.startswith("+ python -m torch.distributed.run --standalone --nproc-per-node 2 -m "
                                  "megatron_bar.train examples/configs/tiny/router.yaml parallel.tp=2")


def test_merge_dry_run_resolves_run_dirs(tmp_path, run):
    for d in ("math", "code"):
        ck = tmp_path / d / "checkpoints"
        (ck / "iter_0000060").mkdir(parents=True)
        (ck / "latest").write_text("iter_0000060\n")
    direct = tmp_path / "direct"
    direct.mkdir()
    (direct / "model_config.json").write_text("{}")
    proc = run("merge.sh", {"DRY_RUN": "1", "SAVE": "out/merged", "WEIGHTS": "math=0.6,code=0.4", "TOPK": "2",
                            "EXPERTS": f"math={tmp_path}/math code={tmp_path}/code extra={direct}"})
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout.strip()[2:])
    assert cmd[1].endswith("tools/merge_experts.py")
    assert cmd[2:] == ["--save", "out/merged", "--experts", f"math={tmp_path}/math/checkpoints/iter_0000060",
                       f"code={tmp_path}/code/checkpoints/iter_0000060", f"extra={direct}",
                       "--weights", "math=0.6,code=0.4", "--topk", "2"]


def test_math_rlvr_dry_run_starts_from_the_stage_before(tmp_path, run):
    prev = tmp_path / "math" / "sft"
    (prev / "checkpoints").mkdir(parents=True)
    (prev / "checkpoints" / "latest").write_text("iter_0000060\n")
    proc = run("math_rlvr.sh", {"DRY_RUN": "1", "INIT_FROM": str(prev), "OUTPUT_DIR": "runs/rl",
                                "EXTRA_ARGS": "train.steps=5"})
    assert proc.returncode == 0, proc.stderr
    (train,) = [ln for ln in proc.stdout.splitlines() if "-m megatron_bar.rl" in ln]
    assert train.endswith(f"model.load={prev}/checkpoints/iter_0000060 train.output_dir=runs/rl train.steps=5")
