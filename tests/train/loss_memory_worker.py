"""Run under torchrun by test_loss_memory.py: one training step at vocabulary 100352,
sequence 2048, TP=2 on a tiny model, with the step's memory peak measured on each rank.

Writes OUT/rank{r}.json: the step's peak above what the rank held before it (the model,
its gradient buffers, the optimizer state - all allocated by a first step), the same
measurement around allocating one full fp32 copy of the logits (the control: the
measurement sees such a copy), the full copy's size, and the step's loss.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_bar import platform
from megatron_bar.model.builder import build_model
from megatron_bar.model.config import ModelConfig
from megatron_bar.platform.memory import PeakMemory
from megatron_bar.train.engine import Microbatch, forward_backward, make_optimizer, wrap_ddp

VOCAB, SEQ, BATCH = 100352, 2048, 1


def main():
    out = Path(sys.argv[1])
    platform.initialize(platform.ParallelLayout(tp=2))
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=128, num_layers=1,
                      num_attention_heads=4, num_kv_heads=2, max_position_embeddings=SEQ)
    model = build_model(cfg)
    model.config.calculate_per_token_loss = True
    ddp = wrap_ddp(model)
    optimizer = make_optimizer(ddp, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    mb = Microbatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), torch.ones(BATCH, SEQ))

    def step() -> float:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        result = forward_backward(ddp, [mb], VOCAB)
        optimizer.step()
        return (result.losses[0] / result.tokens[0]).item()

    first_loss = step()  # allocates the optimizer state: the model's own state is complete
    with PeakMemory() as step_memory:
        step()
    full_logits_bytes = BATCH * SEQ * VOCAB * 4
    with PeakMemory() as control:
        copy = torch.ones(BATCH, SEQ, VOCAB)
        del copy
    result = {"step_peak": step_memory.above_baseline, "control_peak": control.above_baseline,
              "full_logits_bytes": full_logits_bytes, "loss": first_loss}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    platform.shutdown()


if __name__ == "__main__":
    main()
