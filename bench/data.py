"""The data path at scale: preprocessing throughput and the indexed dataloader's speed.

    python bench/data.py                       # ~2.5M tokens of synthetic text
    python bench/data.py --docs 40000 --rounds 3

One process, on the same files, in the same run:

1. **preprocessing tokens/s**: ``megatron_bar.data.preprocess`` (the code behind
   ``tools/preprocess_data.py``, text mode: read, parse, tokenize, write shards, join,
   sha256, summary) with 1 and with ``--workers`` worker processes, against a plain loop
   over the Hugging Face ``tokenizers`` batch encoder (``json.loads`` each line,
   ``encode_batch`` 1024 texts at a time, count ids; its Rust thread pool uses every core).
   The two worker counts alternate over ``--rounds`` rounds (the fastest of each counts),
   so changes in machine load fall on both alike.
2. **dataloader samples/s**: ``IndexedTrainingData.microbatches`` over the dataset just
   written (megatron's BlendedMegatronDatasetBuilder + MaskedGPTDataset, collation, the
   [b, 1, s, s] document attention mask), against the samples/s a training step of a small
   model consumes: the trainer's step (megatron DDP + optimizer, ``forward_backward``) on
   those very microbatches. A bigger model consumes fewer samples per second, so a ratio
   above 1 here holds a fortiori for real models.

The tokenizer is a byte-level BPE (``--vocab``) trained on the synthetic corpus, so nothing
is downloaded. The last line is a JSON object with the figures and the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--docs", type=int, default=20000, help="documents in the synthetic JSONL")
    p.add_argument("--vocab", type=int, default=16384, help="BPE vocabulary size")
    p.add_argument("--workers", type=int, default=2, help="the worker count compared with 1")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of 1 vs --workers")
    p.add_argument("--seq", type=int, default=512, help="dataloader / training sequence length")
    p.add_argument("--batch", type=int, default=8, help="sequences per training step")
    p.add_argument("--steps", type=int, default=6, help="timed training steps (and loader steps x 4)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the small model")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    return p.parse_args(argv)


def _quiet():
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("megatron", "megatron.core", "megatron_bar"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -- inputs ---------------------------------------------------------------------------------


def write_corpus(path: Path, docs: int, seed: int) -> int:
    """Zipf-distributed pseudo-words, 50-400 per document, some digits and punctuation."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "tu", "re", "sa", "no", "vi", "pe", "da", "xo", "qu", "ze", "fi",
                 "the", "and", "ing", "er", "on", "st"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    weights = [1.0 / (k + 1) for k in range(len(words))]
    size = 0
    with path.open("w") as f:
        for _ in range(docs):
            n = rng.randint(50, 400)
            text = " ".join(rng.choices(words, weights, k=n))
            text += f". {rng.randint(0, 10**6)} items, {rng.random():.3f} rate!"
            line = json.dumps({"text": text}) + "\n"
            size += len(line)
            f.write(line)
    return size


def train_tokenizer(corpus: Path, out: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with corpus.open() as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(5000), f)]
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}))
    return out


# -- 1. preprocessing -----------------------------------------------------------------------


def reference_loop(corpus: Path, tokenizer_dir: Path) -> tuple[float, int]:
    """The plain loop: json.loads every line, encode_batch 1024 texts, count ids (+ EOS)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    t0, tokens, batch = time.perf_counter(), 0, []
    with corpus.open("rb") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1024:
                tokens += sum(len(e.ids) + 1 for e in tok.encode_batch(batch, add_special_tokens=False))
                batch = []
    if batch:
        tokens += sum(len(e.ids) + 1 for e in tok.encode_batch(batch, add_special_tokens=False))
    return time.perf_counter() - t0, tokens


def preprocess_run(corpus: Path, tokenizer_dir: Path, prefix: Path, workers: int):
    from megatron_bar.data.preprocess import PreprocessConfig, preprocess

    t0 = time.perf_counter()
    result = preprocess(PreprocessConfig([str(corpus)], str(prefix), str(tokenizer_dir), "text",
                                         workers=workers, progress=False, overwrite=True))
    return time.perf_counter() - t0, result.summary


# -- 2. dataloader against a training step --------------------------------------------------


def loader_and_step(prefix: Path, tokenizer_dir: Path, args):
    import torch

    from megatron_bar import platform
    from megatron_bar.data.preprocess import build_tokenizer
    from megatron_bar.model.builder import build_model
    from megatron_bar.model.config import ModelConfig
    from megatron_bar.train.config import DataConfig, DatasetConfig
    from megatron_bar.train.data import build_training_data
    from megatron_bar.train.engine import forward_backward, make_optimizer, wrap_ddp

    tok = build_tokenizer(str(tokenizer_dir), "text")
    t0 = time.perf_counter()
    data = build_training_data(
        DataConfig([DatasetConfig(str(prefix), "text", format="indexed", domain="synthetic")], seq_length=args.seq),
        tok, seed=args.seed)
    build_s = time.perf_counter() - t0

    loader_steps = 4 * args.steps
    t0 = time.perf_counter()
    for step in range(loader_steps):
        data.microbatches(step, args.batch, args.batch, 0, 1)
    loader_s = time.perf_counter() - t0
    loader_sps = loader_steps * args.batch / loader_s

    platform.initialize(seed=args.seed)
    _quiet()
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
                      num_layers=args.layers, num_attention_heads=8, num_kv_heads=4, rope_theta=10000.0,
                      max_position_embeddings=args.seq)
    model = build_model(cfg, calculate_per_token_loss=True)
    ddp = wrap_ddp(model)
    optimizer = make_optimizer(ddp, lr=1e-3, min_lr=1e-3, weight_decay=0.0, clip_grad=1.0,
                               adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)
    ddp.train()
    times = []
    for step in range(args.steps + 1):  # the first is warmup
        mbs = data.microbatches(step, args.batch, args.batch, 0, 1)
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(ddp, mbs, cfg.vocab_size)
        optimizer.step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    params = sum(p.numel() for p in model.parameters())
    return dict(index_build_s=build_s, loader_samples_per_s=loader_sps, step_s=step_s,
                step_samples_per_s=args.batch / step_s, params=params, torch_threads=torch.get_num_threads(),
                samples_per_mixture_epoch=len(data))


def main(argv=None) -> int:
    args = parse_args(argv)
    _quiet()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="megatron_bar_bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = work / "corpus.jsonl"
        size = write_corpus(corpus, args.docs, args.seed)
        tokenizer_dir = train_tokenizer(corpus, work / "tokenizer", args.vocab)
        cores = os.cpu_count()
        print(f"corpus: {args.docs} documents, {size / 1e6:.1f} MB JSONL; byte-level BPE vocab {args.vocab}; "
              f"{cores} cores; load average {os.getloadavg()[0]:.2f}")

        ref_s, ref_tokens = reference_loop(corpus, tokenizer_dir)
        runs = {1: [], args.workers: []}
        summary = None
        for r in range(args.rounds):
            for w in ((1, args.workers) if r % 2 == 0 else (args.workers, 1)):
                seconds, summary = preprocess_run(corpus, tokenizer_dir, work / "ds", w)
                runs[w].append(seconds)
                print(f"  round {r + 1}: preprocess with {w} worker(s): {seconds:.2f}s")
        if summary.tokens != ref_tokens:
            print(f"error: preprocess wrote {summary.tokens} tokens, the reference loop counted {ref_tokens}")
            return 1
        t1, tw = min(runs[1]), min(runs[args.workers])
        tps = {"reference": ref_tokens / ref_s, "1": summary.tokens / t1, str(args.workers): summary.tokens / tw}
        print(f"\npreprocessing {summary.tokens:,} tokens ({summary.documents:,} documents), best of {args.rounds}:")
        print(f"  plain tokenizers encode_batch loop     {ref_s:8.2f}s  {tps['reference']:>12,.0f} tokens/s")
        print(f"  preprocess, 1 worker                    {t1:8.2f}s  {tps['1']:>12,.0f} tokens/s")
        print(f"  preprocess, {args.workers} workers                   {tw:8.2f}s  {tps[str(args.workers)]:>12,.0f} tokens/s")
        print(f"  speedup {args.workers} workers / 1: {t1 / tw:.2f}x;  {args.workers} workers / reference loop: "
              f"{tps[str(args.workers)] / tps['reference']:.2f}x")

        loader = loader_and_step(work / "ds", tokenizer_dir, args)
        ratio = loader["loader_samples_per_s"] / loader["step_samples_per_s"]
        print(f"\ndataloader (seq {args.seq}, batch {args.batch}; index build {loader['index_build_s']:.2f}s for "
              f"{loader['samples_per_mixture_epoch']} samples):")
        print(f"  IndexedTrainingData.microbatches        {loader['loader_samples_per_s']:>10,.1f} samples/s")
        print(f"  training step ({loader['params'] / 1e6:.1f} M params, {loader['torch_threads']} threads) consumes "
              f"{loader['step_samples_per_s']:>8,.1f} samples/s ({loader['step_s']:.3f}s/step)")
        print(f"  loader / step: {ratio:.1f}x (> 1: the step never waits on the loader)")
        result = {
            "tokens": summary.tokens,
            "reference_tokens_per_s": round(tps["reference"]),
            "preprocess_tokens_per_s_1_worker": round(tps["1"]),
            f"preprocess_tokens_per_s_{args.workers}_workers": round(tps[str(args.workers)]),
            "speedup_workers": round(t1 / tw, 3),
            "workers": args.workers,
            "ratio_vs_reference": round(tps[str(args.workers)] / tps["reference"], 3),
            "loader_samples_per_s": round(loader["loader_samples_per_s"], 1),
            "step_samples_per_s": round(loader["step_samples_per_s"], 2),
            "loader_vs_step": round(ratio, 2),
            "cores": cores,
            "load_average": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(result))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
