"""What a served model costs: parameters (stored, served, active per token), weight
bytes at the deployed precision, forward tokens/s and peak memory, and a per-domain
held-out loss for when no evaluation suite is at hand."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass

import torch

from megatron_bar import platform


@dataclass
class ParamCounts:
    total: int  # every parameter the module holds
    served: int  # without dropped experts
    active_per_token: int  # shared parameters + the top-k experts of every layer
    weight_bytes: int  # at the deployed precision (quantized linears at their bit width)

    def as_dict(self) -> dict:
        return asdict(self)


def _expert_index(name: str) -> tuple[int, int] | None:
    """(layer, expert) of a ``decoder.layers.L.mlp.experts.local_experts.E.*`` parameter."""
    if ".mlp.experts.local_experts." not in name:
        return None
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]), int(parts[parts.index("local_experts") + 1])


def param_counts(model, weight_bits: int | None = None) -> ParamCounts:
    """Counts for a :class:`~megatron_bar.model.load.CausalLM` (one rank, EP = 1).

    ``weight_bits``: the bit width of the quantized linear weights (those whose modelopt
    weight quantizer is enabled); other tensors count at their dtype.
    """
    cfg = model.config
    selection = getattr(model, "expert_selection", None)
    dropped = set(selection.dropped) if selection else set()
    topk = list(selection.layer_topk) if selection else [cfg.moe_topk] * cfg.num_layers
    quantized = set()
    if weight_bits is not None:
        for name, m in model.gpt.named_modules():
            wq = getattr(m, "weight_quantizer", None)
            if wq is not None and getattr(wq, "is_enabled", False):
                quantized.add(f"{name}.weight")
    total = served = shared = nbytes = 0
    per_expert: dict[tuple[int, int], int] = {}
    for name, p in model.gpt.named_parameters():
        n = p.numel()
        total += n
        nbytes += n * weight_bits // 8 if name in quantized else n * p.element_size()
        idx = _expert_index(name)
        if idx is None:
            shared += n
            served += n
        else:
            per_expert[idx] = per_expert.get(idx, 0) + n
            if idx[1] not in dropped:
                served += n
    active = shared
    for layer in range(cfg.num_layers if cfg.is_moe else 0):
        sizes = [per_expert.get((layer, e), 0) for e in range(cfg.num_experts)]
        active += topk[layer] * max(sizes)  # every expert of a layer has the same size
    return ParamCounts(total, served, active, nbytes)


class _PeakRSS:
    """Samples the process's resident memory on a thread (CPU has no allocator peak)."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval_s, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def throughput(model, batch: int = 8, seq: int = 128, reps: int = 5, seed: int = 0) -> dict:
    """Forward (prefill) tokens/s, median over ``reps`` after one warm-up, and the peak
    memory while running: CUDA's allocator peak on GPU, sampled RSS on CPU."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    times = []
    platform.reset_peak_memory()
    with torch.no_grad(), _PeakRSS() as rss:
        model(tokens)
        for _ in range(reps):
            platform.synchronize()
            t0 = time.perf_counter()
            model(tokens)
            platform.synchronize()
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    peak = platform.peak_memory_bytes() if platform.has_gpu() else rss.peak
    return {"tokens_per_s": batch * seq / median, "peak_memory_mb": peak / 2**20,
            "batch": batch, "seq": seq}


def heldout_loss(model, tokenizer, records_by_domain: dict[str, list], max_docs: int = 32) -> dict[str, float]:
    """Mean next-token loss on the assistant tokens (chat) or every token (text) of each
    domain's held-out records; perplexity is ``exp`` of it."""
    from megatron_bar.data import ChatTemplate, encode_text
    from megatron_bar.data.chat import ChatRecord

    template = ChatTemplate(tokenizer)
    out = {}
    with torch.no_grad():
        for domain, records in records_by_domain.items():
            nll = count = 0.0
            for r in records[:max_docs]:
                doc = template.encode(r) if isinstance(r, ChatRecord) else encode_text(r, tokenizer)
                ids = torch.tensor([doc.tokens])
                mask = torch.tensor(doc.loss_mask[1:], dtype=torch.bool)
                logits = model(ids[:, :-1])[0].float()
                losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
                nll += losses[mask].sum().item()
                count += mask.sum().item()
            out[domain] = nll / max(count, 1)
    return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
