"""The RLVR trainer's log-probs come from the vocabulary-sharded logits: at TP=2 (two gloo
processes, each holding half the vocabulary, padding rows included) they equal the
one-process log-probs, which equal transformers' log_softmax(logits / T) of the same
model; the policy gradient through them matches too."""

import sys
from pathlib import Path

import torch

from helpers import torchrun
from megatron_bar import platform
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import load_weights
from megatron_bar.model.config import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import logprob_worker  # noqa: E402

TOL = 1e-5
TEMPERATURE = 0.7


def test_tp2_logprobs_and_policy_gradient_match_tp1_and_transformers(mcore_dense_dir, hf_dense_dir,
                                                                    tmp_path):
    from transformers import AutoModelForCausalLM

    platform.initialize()
    ref_lp, ref_model, _ = logprob_worker.logprobs_and_grads(mcore_dense_dir, TEMPERATURE)
    ref_grads = {n: p.main_grad.detach().clone() for n, p in ref_model.named_parameters()}

    # independent reference: transformers' logits of the model the checkpoint came from
    hf = AutoModelForCausalLM.from_pretrained(hf_dense_dir).eval()
    with torch.no_grad():
        for mb, lp in zip(logprob_worker.microbatches(), ref_lp):
            logits = hf(mb.tokens).logits.float() / TEMPERATURE
            expected = torch.log_softmax(logits, -1).gather(-1, mb.labels.unsqueeze(-1)).squeeze(-1)
            assert (lp - expected).abs().max().item() <= 1e-4

    torchrun(2, Path(logprob_worker.__file__), str(mcore_dense_dir), str(tmp_path), "2", str(TEMPERATURE))
    tp2_lp = torch.load(tmp_path / "logprobs.pt")
    assert len(tp2_lp) == len(ref_lp)
    for a, b in zip(tp2_lp, ref_lp):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= TOL

    cfg = ModelConfig.load(tmp_path / "grads")
    grads_model = build_model(cfg, perform_initialization=False)
    load_weights(grads_model, cfg, tmp_path / "grads")
    grads = dict(grads_model.named_parameters())
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        assert ref.abs().max() > 0, f"{name}: reference gradient is zero"
        diff = (grads[name] - ref).abs().max().item()
        assert diff <= TOL, f"{name}: policy gradient differs by {diff:.2e} at TP=2"
