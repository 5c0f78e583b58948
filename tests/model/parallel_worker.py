"""Run under torchrun by test_parallel.py: one checkpoint at a parallel layout.

Loads CKPT at the layout, runs forward and backward of a fixed global batch through
megatron's DDP and schedule (each data-parallel rank takes its slice), and writes
  OUT/logits_dp{r}.pt  the logits of data-parallel rank r (its slice of the batch)
  OUT/losses_dp{r}.pt  its microbatches' losses (vocab-parallel cross entropy)
  OUT/hf_state.pt      the weights as the RLVR weight sync gathers them (HF layout, rank 0)
  OUT/grads/           the gradients, as a checkpoint of the same model (megatron's
                       dist checkpoint undoes the sharding, so the test reads them at TP=1)
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bar import platform
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import load_weights, save_model
from megatron_bar.model.config import ModelConfig
from megatron_bar.rl.weights import gather_hf_state_dict
from megatron_bar.train.engine import Microbatch, forward_backward, wrap_ddp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import batch  # noqa: E402

GLOBAL_BATCH, SEQ, MICROBATCHES = 4, 16, 2


def microbatches_for_this_rank():
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    tokens, labels = batch(GLOBAL_BATCH, SEQ)
    per_rank = GLOBAL_BATCH // dp_size
    tokens, labels = (t[dp_rank * per_rank : (dp_rank + 1) * per_rank] for t in (tokens, labels))
    mb = per_rank // MICROBATCHES
    return [
        Microbatch(tokens[i * mb : (i + 1) * mb], labels[i * mb : (i + 1) * mb], torch.ones(mb, SEQ))
        for i in range(MICROBATCHES)
    ]


def forward_backward_of(ckpt: Path):
    """(logits of this rank's slice or None, model whose params' main_grad hold the grads,
    config, the microbatches' losses or None)."""
    cfg = ModelConfig.load(ckpt)
    model = build_model(cfg)
    load_weights(model, cfg, ckpt)
    ddp = wrap_ddp(model)
    # the logits as evaluation reads them (gathered), then the training step's path (the
    # loss computed by the model from its vocabulary shard) for the losses and gradients
    kept = forward_backward(ddp, microbatches_for_this_rank(), cfg.vocab_size, forward_only=True,
                            keep_logits=True)
    logits = torch.cat(kept.logits) if kept.logits else None
    ddp.zero_grad_buffer()
    result = forward_backward(ddp, microbatches_for_this_rank(), cfg.vocab_size)
    losses = torch.stack(result.losses) if result.losses else None
    return logits, model, cfg, losses


def main():
    ckpt, out, tp, pp, ep = Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:6])
    platform.initialize(platform.ParallelLayout(tp=tp, pp=pp, ep=ep))
    logits, model, cfg, losses = forward_backward_of(ckpt)
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(logits, out / f"logits_dp{parallel_state.get_data_parallel_rank()}.pt")
        torch.save(losses, out / f"losses_dp{parallel_state.get_data_parallel_rank()}.pt")

    # The weight sync of RLVR: every shard gathered into the HF layout on rank 0.
    hf_state = gather_hf_state_dict(model, cfg)
    if dist.get_rank() == 0:
        torch.save(hf_state, out / "hf_state.pt")
    else:
        assert hf_state is None

    # Gradients into the weights, then save: the checkpoint re-assembles the shards.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.main_grad)
    save_model(model, cfg, out / "grads")
    dist.barrier()
    platform.shutdown()


if __name__ == "__main__":
    main()
