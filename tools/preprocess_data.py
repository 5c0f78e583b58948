#!/usr/bin/env python
"""Tokenize JSONL / JSONL.gz / Parquet / HF ``save_to_disk`` data into a megatron indexed dataset.

    python tools/preprocess_data.py --input math/*.jsonl.gz --output-prefix data/math_sft \\
        --tokenizer runs/olmo2/tokenizer --mode chat --workers 16

Writes ``PREFIX.bin/.idx`` (tokens), in chat mode ``PREFIX.loss_mask.bin/.idx``, and
``PREFIX.summary.json``; prints the summary as one JSON line at the end. Use the dataset in a
training config as ``{path: PREFIX, kind: chat, format: indexed, weight: 0.5, domain: math}``.
Exit code 1 with ``error: ...`` naming the file (and line) on bad input; nothing is left at the prefix.
See megatron_bar/data/preprocess.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from megatron_bar.cli import run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", help="JSONL, JSONL.gz, Parquet files or save_to_disk folders")
    p.add_argument("--output-prefix", help="writes PREFIX.bin, PREFIX.idx, ... and PREFIX.summary.json")
    p.add_argument("--tokenizer", help="the model's tokenizer (folder or file load_tokenizer reads)")
    p.add_argument("--mode", choices=["text", "chat"], default="text")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--max-bad-lines", type=int, default=0, help="malformed lines skipped (and reported) before failing")
    p.add_argument("--add-special-tokens", nargs="*", default=[], help="as the training config's data.add_special_tokens")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at the prefix")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verify", metavar="PREFIX", help="only check an existing dataset (sizes, index, sha256) and exit")
    args = p.parse_args(argv)
    missing = [n for n in ("input", "output_prefix", "tokenizer") if not getattr(args, n)]
    if missing and not args.verify:
        p.error("required: " + ", ".join("--" + m.replace("_", "-") for m in missing))

    from megatron_bar.data.indexed import open_indexed
    from megatron_bar.data.preprocess import PreprocessConfig, preprocess

    if args.verify:
        src = open_indexed(args.verify, verify_checksums=True)
        print(json.dumps({"verified": args.verify, "documents": src.summary.documents, "tokens": src.summary.tokens}))
        return
    result = preprocess(
        PreprocessConfig(
            inputs=args.input,
            output_prefix=args.output_prefix,
            tokenizer=args.tokenizer,
            mode=args.mode,
            workers=args.workers,
            max_bad_lines=args.max_bad_lines,
            add_special_tokens=args.add_special_tokens,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    )
    s = result.summary
    print(
        f"wrote {result.prefix}: {s.documents} documents, {s.tokens} tokens ({s.loss_tokens} trained), "
        f"{s.skipped_lines} lines skipped, {result.seconds:.1f}s ({result.tokens_per_second:,.0f} tokens/s)",
        file=sys.stderr,
    )
    out = {k: v for k, v in asdict(s).items() if k != "files"}
    out.update(prefix=result.prefix, seconds=round(result.seconds, 3), tokens_per_second=round(result.tokens_per_second))
    print(json.dumps(out))


if __name__ == "__main__":
    run(main)
