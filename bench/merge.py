"""Merging K expert checkpoints against a plain copy of the same bytes.

    python bench/merge.py                                  # K = 2 and 4, ~360 MiB each (bf16)
    python bench/merge.py --experts 2 --hidden 512 --layers 4
    python bench/merge.py --repeat 3 --compare /work/main   # also merge with another checkout's code

Writes max(K) synthetic 2-expert domain checkpoints of the given size (same anchor, every shared
parameter and expert 1 different per domain - the worst case: everything shared is
averaged), then, for each K of ``--experts`` (the first K of them), ``--repeat`` times in alternation:

* merge: ``megatron_bar.bar.merge.merge_experts`` of the K checkpoints, in a child process
  (so that its peak resident memory is its own: ``VmHWM`` of that process, which
  includes the ~0.5 GB that importing torch and megatron-core costs; ``merge_rss_growth_mb``
  is the part the merge itself adds). ``merge_s`` times the call, not the imports; it
  includes every check, the divergence report and the content hash of every input;
* copy: ``shutil.copytree`` of the same K checkpoint folders (the bytes the merge reads),
  fsyncing each file as the merge fsyncs its output.

The page cache is warm for both (the inputs are read once before the rounds), and the
disk idle (each is preceded by a ``sync``: neither pays for writeback pending from before).
Each round measures the merge and the copy back to back, so the two see the same machine
(a shared machine's load and the disk swing both by 2x from round to round); ``ratio`` is the median of
the per-round ratios. One line per K is a JSON object with ``merge_s``, ``copy_s`` (medians),
``ratio`` (median of merge / copy per round), ``ratio_min`` / ``ratio_max``,
``peak_rss_mb`` (the merge's, max over repeats) and ``largest_tensor_mb`` (the largest
tensor the merge writes at once: the embedding / LM head), plus the sizes. The LAST line
is a JSON object with those per K (``runs``) and ``peak_rss_spread``: the largest peak
over the smallest, minus 1 (how much the merge's memory grows with K).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=[2, 4], help="K: domain checkpoints to merge")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeat", type=int, default=5, help="merge / copy rounds (medians reported)")
    p.add_argument("--workdir", default=None, help="where to write (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--compare", metavar="CHECKOUT", default=None,
                   help="another checkout of this repository: each round also merges with its code (before / after "
                        "in one run: compare_merge_s, compare_ratio)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: OUT NAME=DIR ...
    return p.parse_args(argv)


def _dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def make_experts(args, root: Path) -> tuple[list[tuple[str, Path]], int]:
    """K synthetic domain checkpoints; returns them and the largest tensor's bytes."""
    import torch

    from megatron_bar.bar.merge_io import write_checkpoint
    from megatron_bar.model.config import ModelConfig
    from megatron_bar.utils.fs import atomic_output_dir

    cfg = ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
        num_layers=args.layers, num_attention_heads=args.heads, num_kv_heads=args.kv_heads,
        num_experts=2, moe_topk=2,
    )
    dtype = _dtype(args.dtype)
    largest = 0
    out = []
    for k in range(max(args.experts)):

        def fill(key, off, sz, k=k):
            nonlocal largest
            # the anchor (expert 0 of the expert tensors) is the same in every domain
            anchor = ".mlp.experts." in key and off[1] == 0
            g = torch.Generator().manual_seed(_seed(key, off, None if anchor else k))
            t = torch.empty(sz, dtype=torch.float32).normal_(0, 0.02, generator=g).to(dtype)
            largest = max(largest, t.nbytes)
            return t

        path = root / f"domain{k}"
        with atomic_output_dir(path) as tmp:
            write_checkpoint(cfg, dtype, tmp, fill)
        out.append((f"domain{k}", path))
    return out, largest


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def copy_folders(folders, dest: Path) -> float:
    t0 = time.perf_counter()
    for src in folders:
        target = dest / Path(src).name
        shutil.copytree(src, target)
        for p in target.rglob("*"):
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    return time.perf_counter() - t0


def _read_through(folders) -> None:
    """Read every file of ``folders`` once, so that every round finds them in the page
    cache (the first merge must not read its inputs from the disk while the copy after
    it finds them cached)."""
    buf = bytearray(16 << 20)
    for folder in folders:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass


def _settle() -> None:
    """Before a timed merge or copy: the disk finishes what is pending (the inputs just
    generated, the last output deleted), so that neither pays for the other's writeback (a
    deleted folder may leave journal work). The page cache stays warm."""
    if hasattr(os, "sync"):
        os.sync()


def _own_peak_rss() -> int | None:
    """This process's peak resident memory in bytes (Linux: VmHWM), else None.

    Not ``ru_maxrss``: the child is started by (v)fork + exec, and Linux carries the
    parent's peak RSS into the child's ``ru_maxrss`` at exec - which made it report the
    bench's own peak (it has just generated the checkpoints) instead of the merge's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # no /proc: the caller falls back to ru_maxrss
        return None
    return None


def run_child(out: str, experts: list[str]) -> None:
    """In the child: merge, then print the time and this process's peak RSS."""
    import resource
    import warnings

    warnings.filterwarnings("ignore")
    import psutil

    from megatron_bar.bar.merge import merge_experts, parse_named_dirs

    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    merge_experts(parse_named_dirs(experts), out, print_fn=lambda *a: None)
    seconds = time.perf_counter() - t0
    peak = _own_peak_rss()
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"merge_s": seconds, "peak_rss": peak, "rss_before": before}))


def merge_in_child(out: Path, experts, code: str | None = None) -> dict:
    """The merge in a child process, with the code of checkout ``code`` if given."""
    cmd = [sys.executable, __file__, "--child", str(out)] + [f"{n}={p}" for n, p in experts]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MEGATRON_BAR_LOG_LEVEL": "WARNING"}
    if code is not None:
        env["PYTHONPATH"] = str(Path(code).resolve())
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"merge failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        run_child(args.child[0], args.child[1:])
        return
    if min(args.experts) < 1:
        raise SystemExit("--experts must be at least 1")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        all_experts, largest = make_experts(args, root / "inputs")
        model_bytes = _folder_bytes(all_experts[0][1])
        print(f"{len(all_experts)} synthetic domain checkpoints of {model_bytes / 2**20:.0f} MiB "
              f"({args.dtype}) written in {time.perf_counter() - t0:.1f}s", flush=True)
        _read_through([p for _, p in all_experts])
        runs = []
        for k in args.experts:
            experts = all_experts[:k]
            in_bytes = sum(_folder_bytes(p) for _, p in experts)
            merges, copies, peaks, growth, others = [], [], [], [], []
            out_bytes = 0
            for r in range(args.repeat):
                out = root / f"merged{r}"
                _settle()
                res = merge_in_child(out, experts)
                out_bytes = _folder_bytes(out)
                merges.append(res["merge_s"])
                peaks.append(res["peak_rss"])
                growth.append(res["peak_rss"] - res["rss_before"])
                shutil.rmtree(out)
                if args.compare:
                    _settle()
                    others.append(merge_in_child(out, experts, args.compare)["merge_s"])
                    shutil.rmtree(out)
                dest = root / f"copy{r}"
                dest.mkdir()
                _settle()
                copies.append(copy_folders([p for _, p in experts], dest))
                shutil.rmtree(dest)
                print(f"K={k} round {r}: merge {merges[-1]:.2f}s (peak RSS {peaks[-1] / 2**20:.0f} MiB), "
                      f"copy {copies[-1]:.2f}s" + (f", {args.compare}'s merge {others[-1]:.2f}s" if others else "")
                      + f" (load {os.getloadavg()[0]:.1f})", flush=True)
            ratios = [m / c for m, c in zip(merges, copies)]
            runs.append({
                "experts": k,
                "merge_s": round(statistics.median(merges), 3),
                "copy_s": round(statistics.median(copies), 3),
                "ratio": round(statistics.median(ratios), 3),
                "ratio_min": round(min(ratios), 3),
                "ratio_max": round(max(ratios), 3),
                "peak_rss_mb": round(max(peaks) / 2**20, 1),
                "merge_rss_growth_mb": round(max(growth) / 2**20, 1),
                "largest_tensor_mb": round(largest / 2**20, 1),
                "model_mb": round(model_bytes / 2**20, 1),
                "input_mb": round(in_bytes / 2**20, 1),
                "output_mb": round(out_bytes / 2**20, 1),
            })
            if others:
                runs[-1].update(compare_merge_s=round(statistics.median(others), 3),
                                compare_ratio=round(statistics.median(m / c for m, c in zip(others, copies)), 3))
            print(json.dumps(runs[-1]), flush=True)
        peaks = [r["peak_rss_mb"] for r in runs]
        print(json.dumps({"runs": runs, "peak_rss_spread": round(max(peaks) / min(peaks) - 1, 3)}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
