#!/usr/bin/env python
"""Inference cost of a merged BAR model: top-k = N..1 and each quantization format.

    python bench/inference.py --run runs/bar_demo                  # a demo run folder
    python bench/inference.py --load CKPT --suites DIR [--calib CONFIG.yaml]
    python bench/inference.py --run runs/bar_demo --formats fp8 --drop safety --reps 3

For every row (the model at top-k = N, N-1, ..., 1; then fp8 / int8 / int4_awq at the
checkpoint's top-k, quantized with tools/quantize.py's code on the router stage's
sample; optional rows without a named expert) one fresh process loads the model and
measures:
- parameters: stored, served (dropped experts removed), active per token;
- weight MB at the deployed precision (quantized linears at 8 / 4 bits);
- forward tokens/s (median of --reps, batch x seq random tokens);
- peak memory (sampled RSS on CPU, the allocator peak on GPU).
Each row is then scored per domain: with ``megatron_bar.eval`` (greedy decoding on the
run's held-out suites, score 0-100) when it and the suites are there, else the mean
next-token loss per domain on ``--heldout`` files (or the last records of the run's SFT
files: a fallback that is not held out from training).

On CPU modelopt *fake*-quantizes: the quantized rows show the formats' effect on the
scores; their tokens/s and memory are those of the simulation (slower and larger than
fp32), the deployed size is the weight-MB column. The table goes to ``--out``
(inference.md, inference.png: score against active parameters and weight MB), and the
last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _final_checkpoint(stage_dir: Path) -> Path:
    latest = stage_dir / "checkpoints" / "latest"
    if not latest.is_file():
        raise SystemExit(f"error: {latest}: not found - has the router stage of the run finished?")
    return stage_dir / "checkpoints" / latest.read_text().strip()


def resolve_inputs(args) -> tuple[Path, Path | None, Path | None]:
    """(checkpoint, suites folder, calibration config) from --run or --load."""
    if args.run:
        run = Path(args.run)
        ckpt = _final_checkpoint(run / "stages" / "bar_router")
        suites = run / "data" / "test"
        return ckpt, suites if suites.is_dir() else None, run / "stages" / "bar_router" / "config.json"
    if not args.load:
        raise SystemExit("error: give --run DIR (a demo run) or --load CKPT")
    return Path(args.load), Path(args.suites) if args.suites else None, None


# -- one row, in its own process -------------------------------------------------------------


def measure_row(row: dict) -> dict:
    import torch

    from megatron_bar import platform
    from megatron_bar.model.load import load_model
    from megatron_bar.serve.cost import heldout_loss, param_counts, throughput

    torch.set_num_threads(row["threads"])
    model = load_model(row["path"], moe_topk=row.get("topk"), drop_experts=row.get("drop") or None)
    counts = param_counts(model, weight_bits=row.get("weight_bits"))
    speed = throughput(model, batch=row["batch"], seq=row["seq"], reps=row["reps"])
    scores, kind = {}, None
    if row.get("suites"):
        from megatron_bar.eval import evaluate

        scores = evaluate(model, Path(row["path"]) / "tokenizer", row["suites"],
                          max_new_tokens=row["max_new_tokens"])
        kind = "score"
    elif row.get("heldout"):
        from megatron_bar.data import load_tokenizer, read_jsonl

        tok = load_tokenizer(Path(row["path"]) / "tokenizer")
        records = {d: read_jsonl(p, "chat").records[-row["heldout_docs"]:] for d, p in row["heldout"].items()}
        scores = heldout_loss(model, tok, records)
        kind = "loss"
    platform.shutdown()
    return {**counts.as_dict(), **speed, "scores": scores, "score_kind": kind}


def run_row(row: dict) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(row["threads"])}
    proc = subprocess.run([sys.executable, __file__, "--row", json.dumps(row)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: row {row['label']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the table and the plot -------------------------------------------------------------------


def mean_score(scores: dict) -> float | None:
    vals = [v for d, v in scores.items() if d != "overall"]
    return scores.get("overall", sum(vals) / len(vals)) if vals else None


def write_report(rows: list[dict], out: Path, kind: str | None) -> str:
    domains = sorted({d for r in rows for d in r["scores"] if d != "overall"})
    unit = {"score": "score", "loss": "held-out loss"}.get(kind, "score")
    head = ["row", "params", "active/token", "weight MB", "tokens/s", "peak MB",
            *domains, f"mean {unit}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = mean_score(r["scores"])
        cells = [r["label"], f"{r['served'] / 1e6:.3f}M", f"{r['active_per_token'] / 1e6:.3f}M",
                 f"{r['weight_bytes'] / 2**20:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_memory_mb']:.0f}",
                 *[f"{r['scores'][d]:.2f}" if d in r["scores"] else "-" for d in domains],
                 "-" if m is None else f"{m:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, xlabel in ((axes[0], "active_per_token", "active parameters per token (M)"),
                            (axes[1], "weight_bytes", "weight MB at deployed precision")):
        for r in rows:
            m = mean_score(r["scores"])
            if m is None:
                continue
            x = r[key] / (1e6 if key == "active_per_token" else 2**20)
            marker = "s" if r.get("format") else "o"
            ax.scatter(x, m, marker=marker, s=40)
            ax.annotate(r["label"], (x, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"mean {unit}" + (" (lower is better)" if kind == "loss" else ""))
        ax.grid(alpha=0.3)
    fig.suptitle("BAR model: score against inference cost (o: top-k, s: quantized)")
    fig.tight_layout()
    fig.savefig(out / "inference.png", dpi=120)
    plt.close(fig)
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--run", help="demo run folder (stages/bar_router, data/test)")
    p.add_argument("--load", help="a merged BAR checkpoint (instead of --run)")
    p.add_argument("--suites", help="held-out suites for megatron_bar.eval (with --load)")
    p.add_argument("--calib", nargs="+", help="calibration: a router-stage config or domain=path.jsonl ...")
    p.add_argument("--heldout", nargs="+", default=None,
                   help="domain=path.jsonl: held-out loss instead of suites (last --heldout-docs records)")
    p.add_argument("--heldout-docs", type=int, default=16)
    p.add_argument("--formats", default="fp8,int8,int4_awq")
    p.add_argument("--drop", nargs="*", default=[], help="also rows without each named expert")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default="runs/bench/inference")
    args = p.parse_args()
    if args.row:
        print(json.dumps(measure_row(json.loads(args.row))))
        return

    from megatron_bar.cli import setup_logging
    from megatron_bar.model.config import ModelConfig
    from megatron_bar.serve import quantize as q

    setup_logging()
    ckpt, suites, calib_config = resolve_inputs(args)
    cfg = ModelConfig.load(ckpt)
    if not cfg.is_moe:
        raise SystemExit(f"error: {ckpt} is a dense model: the top-k rows need a MoE checkpoint")
    use_eval = False
    if suites is not None:
        try:
            import megatron_bar.eval  # noqa: F401

            use_eval = True
        except ImportError:
            print("megatron_bar.eval is not importable: reporting held-out loss instead")
    heldout = None
    if not use_eval:
        if args.heldout:
            heldout = {d: p for d, _, p in (x.partition("=") for x in args.heldout)}
        elif calib_config is not None:  # the run's SFT files; their last records
            from megatron_bar.train.config import load_config

            data = load_config(calib_config).data
            heldout = {d.domain or Path(d.path).stem: d.path for d in data.datasets}
        else:
            raise SystemExit("error: no suites and no --heldout data to score the rows on")
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        q.get_format(f)

    common = {"batch": args.batch, "seq": args.seq, "reps": args.reps, "threads": args.threads,
              "max_new_tokens": args.max_new_tokens, "suites": str(suites) if use_eval else None,
              "heldout": heldout, "heldout_docs": args.heldout_docs}
    rows = [{**common, "label": f"top-{k} of {cfg.num_experts}", "path": str(ckpt), "topk": k}
            for k in range(cfg.num_experts, 0, -1)]
    rows += [{**common, "label": f"without {name}", "path": str(ckpt), "drop": [name]} for name in args.drop]

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        if formats:
            if args.calib:
                calib = (q.calibration_from_config(ckpt, args.calib[0]) if len(args.calib) == 1
                         and "=" not in args.calib[0] else
                         q.calibration_set(ckpt, q.parse_calib_args(args.calib), source="--calib"))
            elif calib_config is not None:
                calib = q.calibration_from_config(ckpt, calib_config)
            else:
                raise SystemExit("error: quantized rows need calibration data: --calib or --run")
            for f in formats:
                out = Path(tmp) / f
                q.quantize_checkpoint(ckpt, out, f, calib, progress=False)
                rows.append({**common, "label": f"{f} (top-{cfg.moe_topk})", "path": str(out),
                             "format": f, "weight_bits": q.FORMATS[f].weight_bits})
        results = []
        for row in rows:
            print(f"measuring {row['label']} ...", flush=True)
            results.append({**row, **run_row(row)})

    kind = results[0]["score_kind"]
    table = write_report(results, Path(args.out), kind)
    print()
    print(f"checkpoint {ckpt}; scores: {'megatron_bar.eval on ' + str(suites) if use_eval else 'held-out loss'}")
    print(table)
    print(f"\nwrote {args.out}/inference.md and inference.png")
    keep = ("label", "topk", "drop", "format", "total", "served", "active_per_token", "weight_bytes",
            "tokens_per_s", "peak_memory_mb", "scores")
    print(json.dumps({"checkpoint": str(ckpt), "score_kind": kind, "batch": args.batch, "seq": args.seq,
                      "rows": [{k: r.get(k) for k in keep} for r in results]}))


if __name__ == "__main__":
    main()
