"""The GPU path on one GPU, checked against the CPU path and transformers.

    python scripts/gpu_check.py --out /tmp/gpu_check     # needs CUDA; writes report.json

1. A tiny Olmo 2 and its 2-expert upcycle (``megatron_bar.demo.tiny``), the MoE exported to
   HF FlexOlmo (``tools/convert_mcore_to_hf.py``): next-token logits of the megatron model
   on the GPU (NCCL process group) against transformers' on the GPU, in fp32.
2. The GPU-built model has the CPU-built model's parameter names (one code path).
3. SFT steps (``python -m megatron_bar.train``, stage ``sft``) from the same checkpoint and
   data on the GPU and on CPU: first-step losses, last losses, tokens/s of each.

Prints one JSON object (also ``<out>/report.json``). Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _names_on_cpu(path: Path) -> list[str]:
    code = ("import json, sys, megatron_bar; "
            "print(json.dumps(sorted(megatron_bar.load_model(sys.argv[1]).state_dict())))")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                         check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _train(cfg_path: Path, cpu: bool) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(min(8, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "megatron_bar.train", str(cfg_path)], env=env, cwd=REPO,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"training ({'cpu' if cpu else 'gpu'}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out_dir = Path(yaml.safe_load(cfg_path.read_text())["train"]["output_dir"])
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    speeds = re.findall(r"\| ([\d.]+)(k?) tok/s", proc.stdout)  # the trainer's step lines
    tok_s = float(speeds[-1][0]) * (1000 if speeds[-1][1] else 1) if speeds else None
    return {"first_loss": losses[0], "first5_mean": sum(losses[:5]) / 5, "last5_mean": sum(losses[-5:]) / 5,
            "steps": len(losses), "wall_s": round(seconds, 1), "tokens_per_s": tok_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 1
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    import megatron_bar
    from megatron_bar import platform
    from megatron_bar.demo import domains as D
    from megatron_bar.demo.tiny import TinyModelSpec, build_tiny_base
    from megatron_bar.eval.generate import _forward

    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "transformer_engine": platform.has_transformer_engine()}
    spec = TinyModelSpec(vocab_size=480, hidden_size=128, intermediate_size=512, num_layers=4,
                         num_attention_heads=4, num_kv_heads=2, max_position_embeddings=512)
    D.write_domain_data(out / "data", D.DataSizes(sft=400, rl=8, test=8, midtrain=8, pretrain=50), 0)
    paths = build_tiny_base(out / "models", spec, seed=0, corpus=D.tokenizer_corpus(0), with_moe=True)
    moe = paths["bar2"]
    hf_dir = out / "hf"
    subprocess.run([sys.executable, str(REPO / "tools" / "convert_mcore_to_hf.py"), "--load", str(moe),
                    "--save", str(hf_dir)], check=True, cwd=REPO, capture_output=True)

    # 1. logits against transformers, both on the GPU
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(5, spec.vocab_size, (4, 48))
    real = torch.ones_like(ids, dtype=torch.bool)
    model = megatron_bar.load_model(moe, params_dtype=torch.float32)
    on = next(model.parameters()).device
    with torch.no_grad():
        ours = _forward(model, "megatron", ids.to(on), real.to(on)).float().cpu()
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()
        theirs = _forward(hf, "hf", ids.cuda(), real.cuda()).float().cpu()
    diff = float((ours - theirs).abs().max())
    report["logits"] = {"model_device": str(on), "max_abs_diff_vs_transformers": diff,
                        "argmax_agree": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())}

    # 2. the same parameter names as on CPU
    gpu_names = sorted(model.state_dict())
    cpu_names = _names_on_cpu(moe)
    report["same_parameter_names_as_cpu"] = gpu_names == cpu_names
    del model, hf
    platform.shutdown()

    # 3. SFT on the GPU and on CPU, same checkpoint, data and seed
    runs = {}
    for where in ("gpu", "cpu"):
        cfg = {
            "model": {"load": str(moe)},
            "data": {"datasets": [{"path": str(out / "data" / "sft" / f"{d}.jsonl"), "kind": "chat",
                                   "weight": 1.0, "domain": d} for d in ("safety", "general")],
                     "seq_length": 128},
            "optim": {"lr": 3e-3, "schedule": "constant", "warmup_steps": 0},
            "train": {"stage": "sft", "steps": a.steps, "global_batch_size": 8, "micro_batch_size": 8,
                      "seed": 1234, "log_interval": max(1, a.steps // 4), "output_dir": str(out / f"sft_{where}")},
            "checkpoint": {"interval": 100000, "keep_last": 1},
        }
        path = out / f"sft_{where}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        runs[where] = _train(path, cpu=where == "cpu")
    report["sft"] = runs
    ok = (diff < 1e-3 and report["same_parameter_names_as_cpu"]
          and runs["gpu"]["last5_mean"] < runs["gpu"]["first5_mean"]
          and abs(runs["gpu"]["first_loss"] - runs["cpu"]["first_loss"]) < 0.05 * runs["cpu"]["first_loss"])
    report["ok"] = bool(ok)
    text = json.dumps(report, indent=1)
    (out / "report.json").write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
