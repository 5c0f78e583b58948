"""Shared by the tests: tiny HF reference models, batches, and a torchrun launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Small enough for 2 CPU cores, shaped to catch layout bugs: GQA (4 query heads over 2
# kv groups), a vocabulary that no TP size divides, several experts with top-2 routing.
TINY = dict(
    vocab_size=1001,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    pad_token_id=1,
    eos_token_id=2,
    bos_token_id=None,
)


def tiny_hf_model(moe: bool, seed: int = 0, **overrides):
    """A random transformers Olmo 2 / FlexOlmo with non-unit norm weights."""
    from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    if moe:
        kw.setdefault("num_experts", 4)
        kw.setdefault("num_experts_per_tok", 2)
        model = FlexOlmoForCausalLM(FlexOlmoConfig(**kw))
    else:
        model = Olmo2ForCausalLM(Olmo2Config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)  # decisive routing, no near-ties between layouts
    return model.eval()


def batch(n: int, seq: int, vocab: int = TINY["vocab_size"], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def torchrun(nproc: int, script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun with ``nproc`` CPU processes (gloo); raise on failure."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(_free_port()), str(script), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script.name} {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def run_tool(tool: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SmallDisk:
    """A tmpfs of a few KiB mounted on a folder (fixture ``small_disk``): a full disk on demand."""

    def __init__(self, root: Path, size_kib: int):
        self.root = root
        self.size_kib = size_kib

    def mount(self) -> str | None:
        """Mount it; returns why it could not be mounted (then the test skips), or None."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_kib}k", "tmpfs",
                                   str(self.root)], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"mount not available: {e}"
        return None if proc.returncode == 0 else f"cannot mount a tmpfs here (root needed): {proc.stderr.strip()}"

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.root)], capture_output=True, timeout=30)


def perturbed_policy(path, scale: float = 0.3, seed: int | None = 0):
    """The checkpoint at ``path`` loaded, with its expert 1 and router moved apart from the
    anchor (seeded unless ``seed`` is None), so that routing changes what the MoE computes
    (a dense checkpoint loads unchanged)."""
    import megatron_bar

    policy = megatron_bar.load_model(path)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.gpt.named_parameters():
            if "local_experts.1" in name or "router" in name:
                p.add_(scale * torch.randn_like(p))
    return policy


def perturbed_bar2_worker(bar2_dir):
    """A rollout worker holding :func:`perturbed_policy` of the tiny 2-expert BAR MoE."""
    from megatron_bar.convert.hf_io import hf_config_from_model_config
    from megatron_bar.rl.rollout import RolloutWorker
    from megatron_bar.rl.weights import gather_hf_state_dict

    policy = perturbed_policy(bar2_dir)
    worker = RolloutWorker(hf_config_from_model_config(policy.config, torch.float32))
    worker.set_weights(gather_hf_state_dict(policy.gpt, policy.config), 1)
    return worker
