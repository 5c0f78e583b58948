"""Run under torchrun by test_rl_logprobs_parallel.py: the RLVR trainer's log-prob path at a
tensor-parallel layout.

Loads CKPT at TP, and writes (tensor-parallel rank 0)
  OUT/logprobs.pt  the label tokens' log-probs at TEMPERATURE, forward only (the old and
                   reference policies' path), one [b, s] tensor per microbatch
and the gradient of a policy-gradient-shaped loss (token mean of advantage x log-prob, through
the vocab-parallel log-probs, the update's path) as a checkpoint in OUT/grads/.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_bar import platform
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import load_weights, save_model
from megatron_bar.model.config import ModelConfig
from megatron_bar.train.engine import Microbatch, forward_backward, forward_logprobs, token_logprobs, wrap_ddp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import batch  # noqa: E402

BATCH, SEQ, MICROBATCHES = 4, 16, 2


def microbatches():
    tokens, labels = batch(BATCH, SEQ, seed=3)
    mask = torch.ones(BATCH, SEQ)
    mask[:, :5] = 0  # the prompt's label positions carry no loss
    advantages = torch.tensor([1.0, -0.5, 0.25, -2.0])
    mb = BATCH // MICROBATCHES
    out = []
    for i in range(MICROBATCHES):
        s = slice(i * mb, (i + 1) * mb)
        m = Microbatch(tokens[s], labels[s], mask[s])
        m.advantages = advantages[s]
        out.append(m)
    return out


def logprobs_and_grads(ckpt: Path, temperature: float):
    """(log-probs per microbatch, model whose params' main_grad hold the policy gradient)."""
    cfg = ModelConfig.load(ckpt)
    model = build_model(cfg)
    load_weights(model, cfg, ckpt)
    ddp = wrap_ddp(model)
    mbs = microbatches()
    logprobs = forward_logprobs(ddp, mbs, cfg.vocab_size, temperature)

    def loss_fn(logits, mb, out):
        lp = token_logprobs(logits, mb.labels, cfg.vocab_size, temperature)
        loss = -(lp * mb.advantages[:, None] * mb.loss_mask).sum() / mb.loss_mask.sum()
        return loss, {"loss": loss.detach()}

    ddp.zero_grad_buffer()
    forward_backward(ddp, mbs, cfg.vocab_size, loss_fn=loss_fn)
    return logprobs, model, cfg


def main():
    ckpt, out, tp, temperature = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    platform.initialize(platform.ParallelLayout(tp=tp))
    logprobs, model, cfg = logprobs_and_grads(ckpt, temperature)
    if dist.get_rank() == 0:
        torch.save(logprobs, out / "logprobs.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.main_grad)
    save_model(model, cfg, out / "grads")
    dist.barrier()
    platform.shutdown()


if __name__ == "__main__":
    main()
