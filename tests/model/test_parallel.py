"""The same checkpoint at TP=2, EP=2 and PP=2 (two gloo processes) gives the logits and
the gradients of the one-process run, and the RLVR weight sync gathers exactly the HF
model's tensors from the shards."""

from pathlib import Path

import pytest
import torch

from helpers import torchrun
from megatron_bar import platform
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import load_weights
from megatron_bar.model.config import ModelConfig

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parallel_worker  # noqa: E402

WORKER = Path(parallel_worker.__file__)
TOL = 1e-5


def reference(ckpt):
    platform.initialize()
    logits, model, _, losses = parallel_worker.forward_backward_of(ckpt)
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    return logits, grads, losses


def read_grads(grads_dir):
    cfg = ModelConfig.load(grads_dir)
    platform.initialize()
    model = build_model(cfg, perform_initialization=False)
    load_weights(model, cfg, grads_dir)
    return dict(model.named_parameters())


@pytest.mark.parametrize(
    "moe,tp,pp,ep",
    [
        (False, 2, 1, 1),
        (False, 1, 2, 1),
        (True, 2, 1, 1),
        (True, 1, 1, 2),
        (True, 1, 2, 1),
    ],
    ids=["dense-tp2", "dense-pp2", "moe-tp2", "moe-ep2", "moe-pp2"],
)
def test_layout_matches_single_process(moe, tp, pp, ep, mcore_dense_dir, mcore_moe_dir, hf_dense_dir,
                                      hf_moe_dir, tmp_path):
    ckpt = mcore_moe_dir if moe else mcore_dense_dir
    ref_logits, ref_grads, ref_losses = reference(ckpt)
    torchrun(2, WORKER, str(ckpt), str(tmp_path), str(tp), str(pp), str(ep))

    logits = torch.cat([torch.load(p) for p in sorted(tmp_path.glob("logits_dp*.pt"))])
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits).abs().max().item() <= TOL
    # the vocab-parallel loss of each microbatch (DP ranks each hold their own microbatches)
    losses = torch.cat([torch.load(p) for p in sorted(tmp_path.glob("losses_dp*.pt"))])
    if pp == 1 and ep == 1:  # same microbatching as the reference
        assert losses.shape == ref_losses.shape
        assert (losses - ref_losses).abs().max().item() <= TOL

    grads = read_grads(tmp_path / "grads")
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        assert ref.abs().max() > 0, f"{name}: reference gradient is zero"
        diff = (grads[name] - ref).abs().max().item()
        assert diff <= TOL, f"{name}: gradient differs by {diff:.2e} at tp={tp} pp={pp} ep={ep}"

    # weight sync: the gathered HF state is the HF model the checkpoint was converted from
    from safetensors.torch import load_file

    hf_dir = hf_moe_dir if moe else hf_dense_dir
    expected = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        expected.update(load_file(f))
    gathered = torch.load(tmp_path / "hf_state.pt")
    assert set(gathered) == set(expected)
    for key, ref in expected.items():
        assert torch.equal(gathered[key].to(ref.dtype), ref), f"{key}: gathered weight differs"
