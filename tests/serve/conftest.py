"""A small merged BAR model with names and a tokenizer: the tiny default's 2-expert
upcycle, given a distinct expert 1 and router row for each of two domains (the toy data's
``tool_use`` and ``general``), merged with ``merge_experts``."""

import shutil
from pathlib import Path

import pytest
import torch

from megatron_bar.bar.merge import merge_experts
from megatron_bar.bar.merge_io import CheckpointReader, local_slices, write_checkpoint
from megatron_bar.utils.fs import atomic_output_dir

DOMAINS = ("tool_use", "general")


def _domain_expert(src: Path, out: Path, seed: int) -> Path:
    """``src`` with expert 1 and the router moved, as a domain's stage 1 would."""
    g = torch.Generator().manual_seed(seed)
    r = CheckpointReader(src)
    cfg = r.config
    tensors = {k: r.read(k, (0,) * len(r.shape(k)), r.shape(k)) for k in r.keys()}
    for k, v in tensors.items():
        if ".mlp.experts." in k:
            v[:, 1] += torch.randn(v[:, 1].shape, generator=g) * 0.05
        elif k.endswith("router.weight"):
            v += torch.randn(v.shape, generator=g) * 0.5  # decisive routing
    with atomic_output_dir(out) as tmp:
        write_checkpoint(cfg, tensors["embedding.word_embeddings.weight"].dtype, tmp,
                         lambda k, o, s: tensors[k][local_slices((0,) * len(o), o, s)].clone())
        shutil.copytree(src / "tokenizer", tmp / "tokenizer")
    return out


@pytest.fixture(scope="session")
def bar_merged(tiny_base, tmp_path_factory) -> Path:
    """3 experts (anchor, tool_use, general), top-2, renormalised top-k."""
    root = tmp_path_factory.mktemp("serve")
    inputs = [(d, _domain_expert(tiny_base["bar2"], root / d, seed)) for seed, d in enumerate(DOMAINS)]
    out = root / "merged"
    merge_experts(inputs, out, print_fn=lambda *a: None)
    return out
