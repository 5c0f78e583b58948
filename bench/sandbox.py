"""The code sandbox's cost: programs/s under bubblewrap against a bare ``subprocess.run``.

    python bench/sandbox.py
    python bench/sandbox.py --programs 200 --rounds 3

Two programs, each run ``--programs`` times from a process pool of 1 and of 2 workers
(spawned, as :class:`megatron_bar.rl.rewards.RewardPool` does):

* **trivial**: ``print(1)``, i.e. the start-up cost alone;
* **50 ms**: a CPU-bound loop calibrated here to take ~50 ms in a bare interpreter.

Each runs two ways: ``run_python`` (bubblewrap: namespaces, tmpfs, rlimits, the runner that
sets them) and a bare ``subprocess.run([interpreter, "-I", "-S", "-B", "-c", code])`` of
the same interpreter the sandbox uses. Every (program, way, workers) cell is measured once
per round, the rounds in turn, and the best round counts, so changes in machine load fall
on all cells alike. The last line is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import subprocess
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--programs", type=int, default=100, help="programs per cell")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all cells; the best counts")
    p.add_argument("--target-ms", type=float, default=50.0, help="bare run time of the CPU-bound program")
    return p.parse_args(argv)


def _run_one(way: str, interpreter: str, code: str) -> bool:
    if way == "sandbox":
        from megatron_bar.rl.sandbox import run_python

        return run_python(code, timeout_s=30.0).ok
    done = subprocess.run([interpreter, "-I", "-S", "-B", "-c", code], capture_output=True, timeout=30.0)
    return done.returncode == 0


def _calibrate(interpreter: str, target_ms: float) -> str:
    """A loop that takes ``target_ms`` of CPU in a bare interpreter (start-up excluded)."""
    probe = ("import time\nt = time.perf_counter()\nn = 0\nfor i in range(2_000_000): n += i\n"
             "print(time.perf_counter() - t)")
    seconds = min(float(subprocess.run([interpreter, "-I", "-S", "-c", probe], capture_output=True,
                                       text=True, check=True).stdout) for _ in range(3))
    iterations = int(2_000_000 * target_ms / 1000 / seconds)
    return f"n = 0\nfor i in range({iterations}): n += i\nprint(n)"


def _programs_per_s(pool, way: str, interpreter: str, code: str, count: int) -> float:
    start = time.perf_counter()
    results = list(pool.map(_run_one, [way] * count, [interpreter] * count, [code] * count))
    elapsed = time.perf_counter() - start
    if not all(results):
        raise SystemExit(f"error: a {way} run of {code[:40]!r} failed")
    return count / elapsed


def main(argv=None) -> dict:
    args = parse_args(argv)
    from megatron_bar.rl.sandbox import probe_isolation

    isolation = probe_isolation()
    interpreter = isolation.interpreter
    programs = {"trivial": "print(1)", "50ms": _calibrate(interpreter, args.target_ms)}
    print(f"sandbox: {isolation.describe()}")
    print(f"{args.programs} programs per cell, {args.rounds} rounds, best round counts")

    best: dict[tuple[str, str, int], float] = {}
    spawn = multiprocessing.get_context("spawn")
    pools = {w: concurrent.futures.ProcessPoolExecutor(w, mp_context=spawn) for w in (1, 2)}
    try:
        for workers, pool in pools.items():  # start the workers and import before timing
            list(pool.map(_run_one, ["sandbox", "bare"] * workers, [interpreter] * 2 * workers,
                          ["pass"] * 2 * workers))
        for _ in range(args.rounds):
            for name, code in programs.items():
                for way in ("sandbox", "bare"):
                    for workers, pool in pools.items():
                        rate = _programs_per_s(pool, way, interpreter, code, args.programs)
                        key = (name, way, workers)
                        best[key] = max(best.get(key, 0.0), rate)
    finally:
        for pool in pools.values():
            pool.shutdown()

    print(f"\n{'program':<9} {'workers':>7} {'sandbox/s':>10} {'bare/s':>8} {'ratio':>6} {'overhead ms':>12}")
    out = {}
    for name in programs:
        for workers in (1, 2):
            boxed, bare = best[(name, "sandbox", workers)], best[(name, "bare", workers)]
            overhead_ms = (1 / boxed - 1 / bare) * 1000 * workers  # per program, per worker
            print(f"{name:<9} {workers:>7} {boxed:>10.1f} {bare:>8.1f} {boxed / bare:>6.2f} {overhead_ms:>12.1f}")
            out[f"{name}_sandbox_per_s_{workers}w"] = round(boxed, 1)
            out[f"{name}_bare_per_s_{workers}w"] = round(bare, 1)
            out[f"{name}_ratio_{workers}w"] = round(boxed / bare, 3)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
