"""The warm interpreter runs a step as a fresh interpreter would: same output, exit codes,
failures reported with the log."""

import sys
import textwrap

import pytest

from megatron_bar.demo.jobs import Job, JobGraph, StepFailed

# What a step can see of its process: argv, cwd, environment, threads, torch's default
# generator, the main module's name and sys.path[0].
PROBE = textwrap.dedent("""
    import os, random, sys, torch
    print("argv", sys.argv[1:], os.path.basename(sys.argv[0]))
    print("cwd", os.getcwd())
    print("env", os.environ.get("OMP_NUM_THREADS"), os.environ.get("RAY_ADDRESS"))
    print("threads", torch.get_num_threads())
    print("seed", torch.initial_seed(), random.random())
    print("main", __name__, os.path.realpath(sys.path[0]))
""")


def _run(tmp_path, warm, jobs):
    g = JobGraph(tmp_path / ("warm" if warm else "cold"), tmp_path, parallel=2, warm=warm)
    for job in jobs:
        g.add(job)
    g.run()
    return {j.name: (g.run_dir / "logs" / f"{j.name}.log").read_text().split("\n", 1)[1] for j in jobs}


def _unseeded(logs):
    """The logs without their random seeds, and the seeds."""
    seeds = [line for text in logs.values() for line in text.splitlines() if line.startswith("seed ")]
    return {k: "\n".join(l for l in v.splitlines() if not l.startswith("seed ")) for k, v in logs.items()}, seeds


def test_a_warm_step_sees_what_a_fresh_interpreter_sees(tmp_path):
    (tmp_path / "probe_mod.py").write_text(PROBE)
    (tmp_path / "probe_script.py").write_text(PROBE)

    def jobs():
        return [Job("module", command=lambda: [sys.executable, "-m", "probe_mod", "a", "--b"], threads=2),
                Job("script", command=lambda: [sys.executable, str(tmp_path / "probe_script.py"), "x"]),
                Job("inline", command=lambda: [sys.executable, "-c", PROBE, "y"])]

    cold = _run(tmp_path, False, jobs())
    warm = _run(tmp_path, True, jobs())
    (cold, _), (warm, seeds) = _unseeded(cold), _unseeded(warm)
    assert warm == cold
    # unseeded generators start from random seeds, as in fresh interpreters: not one shared state
    assert len(seeds) == 3 and len(set(seeds)) == 3, seeds
    assert "threads 2" in warm["module"] and "threads 1" in warm["script"]
    assert "argv ['a', '--b'] probe_mod.py" in warm["module"]
    assert "main __main__" in warm["script"]


@pytest.mark.parametrize("warm", [True, False])
@pytest.mark.parametrize("body, expected", [
    ("import sys; print('partial output'); sys.exit(3)", "exit code 3"),
    ("print('partial output'); raise ValueError('bad input in line 7')", "ValueError: bad input in line 7"),
    ("import os, signal; print('partial output', flush=True); os.kill(os.getpid(), signal.SIGKILL)",
     "died without an exit code"),
])
def test_a_failed_step_stops_the_graph_with_its_log(tmp_path, warm, body, expected):
    g = JobGraph(tmp_path, tmp_path, parallel=1, warm=warm)
    g.add(Job("bad", command=lambda: [sys.executable, "-c", body]))
    g.add(Job("after", command=lambda: [sys.executable, "-c", "pass"], deps=("bad",)))
    with pytest.raises(StepFailed) as e:
        g.run()
    message = str(e.value)
    assert "step bad failed" in message and "partial output" in message
    if warm or "SIGKILL" not in body:
        assert expected in message
    else:
        assert "exit code -9" in message
    assert not (tmp_path / "logs" / "after.log").exists()
