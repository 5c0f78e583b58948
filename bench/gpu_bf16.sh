#!/usr/bin/env bash
# bf16 training throughput on one GPU at OLMo-2-0425-1B's shapes, sequence 4096: the dense
# Olmo 2 and its 2-expert BAR MoE against transformers (SDPA, bf16, fused AdamW), tokens/s
# per GPU, MFU and torch.profiler tables of both sides. Keep everything it prints:
#   bash bench/gpu_bf16.sh 2>&1 | tee bench_gpu_bf16.txt
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--preset olmo2-1b --dtype bf16 --steps 6 --warmup 2 --profile 2)
python bench/train_throughput.py "${common[@]}"
# the MoE at batch 1: both models' training state shares one GPU's memory, and the local
# spec's attention keeps s x s probabilities per head (no Transformer Engine)
python bench/train_throughput.py "${common[@]}" --moe --batch 1
