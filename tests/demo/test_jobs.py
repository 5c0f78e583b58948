"""The demo's job graph: critical-path order, so long chains do not run alone at the end."""

import sys

from megatron_bar.demo.jobs import Job, JobGraph


def _noop():
    return [sys.executable, "-c", "pass"]


def test_critical_path_sums_the_costliest_chain(tmp_path):
    g = JobGraph(tmp_path, tmp_path, parallel=1)
    g.add(Job("a", command=_noop, cost=1))
    g.add(Job("b", command=_noop, deps=("a",), cost=2))
    g.add(Job("c", command=_noop, deps=("a",), cost=7))
    g.add(Job("d", command=_noop, deps=("b", "c"), cost=3))
    assert g.critical_path() == {"a": 11.0, "b": 5.0, "c": 10.0, "d": 3.0}


def test_the_longest_chain_starts_first(tmp_path):
    g = JobGraph(tmp_path, tmp_path, parallel=1)
    g.add(Job("short", command=_noop, cost=1))  # added first, but heads the shorter chain
    g.add(Job("long1", command=_noop, cost=5))
    g.add(Job("long2", command=_noop, deps=("long1",), cost=5))
    seconds = g.run()
    assert set(seconds) == {"short", "long1", "long2"}
    # done_at is set when a job starts; one at a time, so the start order is the schedule
    order = sorted(g.jobs, key=lambda n: g.jobs[n].done_at)
    assert order[0] == "long1", order


def test_a_step_gets_the_thread_count_of_its_job_whatever_runs_beside_it(tmp_path):
    """Thread counts change CPU numerics; they come from the job, so runs reproduce."""
    script = "import os, torch; print('threads', os.environ['OMP_NUM_THREADS'], torch.get_num_threads())"
    g = JobGraph(tmp_path, tmp_path, parallel=2)
    g.add(Job("alone", command=lambda: [sys.executable, "-c", script], threads=2))
    g.add(Job("default", command=lambda: [sys.executable, "-c", script]))
    g.run()
    assert "threads 2 2" in (tmp_path / "logs" / "alone.log").read_text()
    assert "threads 1 1" in (tmp_path / "logs" / "default.log").read_text()
