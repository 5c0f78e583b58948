"""A rollout worker: a copy of the policy that generates completions with their log-probs.

The policy is a transformers model (Olmo 2 or FlexOlmo) built from the trainer's
``ModelConfig``; it generates with the KV cache, samples at the configured temperature,
and reports each sampled token's log-probability under the sampling distribution (what
the trainer's importance correction compares against). Decoding is this project's own loop
over the model (:func:`megatron_bar.rl.decode.decode`), not ``generate``: it holds one
step's ``[n, V]`` logits in the model's dtype and samples from them a few rows at a time,
so the worker's memory grows neither with the response length times the vocabulary nor
with copies of one step's scores. Weights arrive in the HF layout
(:mod:`megatron_bar.rl.weights`); as an actor, by broadcast from the trainer over the
weight-sync channel (:mod:`megatron_bar.rl.channel`), never through Ray's object store.
"""

from __future__ import annotations

import abc
import os
import re

import torch

from megatron_bar.rl.channel import Bucket, ChannelAddress, ChannelError, WeightReceiver
from megatron_bar.rl.decode import decode

_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _build_hf_model(hf_config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(hf_config)
    model_type = config.pop("model_type")
    config.pop("architectures", None)
    config.pop("dtype", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    return model.eval()


def to_transformers_layout(hf_state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The saved HF layout (one tensor per expert projection) in the layout of ``model``'s
    own state dict: transformers 5 keeps FlexOlmo's experts fused as [E, 2F, H] / [E, H, F]."""
    own = model.state_dict()
    if all(k in own for k in hf_state):
        return hf_state
    out = {k: v for k, v in hf_state.items() if k in own}
    for key in own:
        m = _FUSED_EXPERTS.match(key)
        if not m:
            continue
        prefix, kind = m.groups()
        n = own[key].size(0)
        if kind == "gate_up_proj":
            out[key] = torch.stack([torch.cat([hf_state[f"{prefix}.{e}.gate_proj.weight"],
                                               hf_state[f"{prefix}.{e}.up_proj.weight"]]) for e in range(n)])
        else:
            out[key] = torch.stack([hf_state[f"{prefix}.{e}.down_proj.weight"] for e in range(n)])
    missing = set(own) - set(out)
    if missing:
        raise KeyError(f"weights for the rollout model lack {sorted(missing)[:3]}")
    return out


class _RoutingRecorder:
    """Forward hooks on every MoE router (``mlp.gate``) of a transformers FlexOlmo that
    keep the experts it picked, call by call, while decoding runs with the KV cache:
    the first call sees the whole (left-padded) prompt batch, each later one the one
    token per sequence fed back."""

    def __init__(self, model):
        gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        if not gates:
            raise ValueError("routing replay needs an MoE model: this rollout model has no router")
        self.calls: list[list[torch.Tensor]] = [[] for _ in gates]
        self.handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(gates)]

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            self.calls[layer].append(output[2].to(torch.int16))  # router_indices [n * t, top_k]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def sample(self, i: int, width: int, prompt_len: int, completion_len: int) -> torch.Tensor:
        """Sample ``i``'s experts at its prompt positions (padding cut off) and at the first
        ``completion_len - 1`` completion tokens: ``[layers, prompt_len + completion_len - 1, k]``."""
        per_layer = []
        for calls in self.calls:
            n = calls[0].size(0) // width
            prefill = calls[0].view(n, width, -1)[i, width - prompt_len:]
            steps = [c.view(n, 1, -1)[i] for c in calls[1:completion_len]]
            per_layer.append(torch.cat([prefill, *steps]))
        return torch.stack(per_layer).clone()


def _return_large_blocks_to_the_os(threshold: int = 128 << 10) -> None:
    """Allocations above ``threshold`` bytes from their own mmap, freed back to the OS.

    Decoding allocates one step's ``[n, V]`` scores and a KV cache that grows by
    concatenation at every step. glibc raises its mmap threshold after the first large
    free (up to 32 MB), so later such blocks come from the heap, where the cache's growing
    blocks fragment it and the process keeps gigabytes it no longer uses. A fixed
    threshold (glibc's mallopt M_MMAP_THRESHOLD, which also stops the raising) keeps the
    peak at what is live. No-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class WeightChannelMember(abc.ABC):
    """The receiving side of the weight sync, for any rollout worker: the worker gives
    ``_targets()`` (tensor name -> the view of its model's storage that tensor fills)."""

    _channel: WeightReceiver | None = None
    version: int = -1

    @abc.abstractmethod
    def _targets(self) -> dict[str, torch.Tensor]:
        """Tensor name (as the trainer sends it) -> the tensor it is copied into."""

    def join_weight_channel(self, address: ChannelAddress, rank: int) -> int:
        """Join the trainer's weight-sync group (leaving any earlier one); this process's pid."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._channel = WeightReceiver(address, rank)
        return os.getpid()

    @torch.no_grad()
    def receive_weights(self, generation: int, buckets: list[Bucket], version: int) -> int:
        """The weight sync: ``buckets`` (names, shapes, dtypes) arrive by broadcast from the
        trainer on the channel's group ``generation``, each unflattened into this model in
        place; the tensors not named keep what they had. The bytes received."""
        if self._channel is None or self._channel.address.generation != generation:
            have = None if self._channel is None else self._channel.address.generation
            raise ChannelError(f"weights of version {version} go out on weight-sync group {generation}; "
                               f"this worker (pid {os.getpid()}) is in group {have}")
        received = self._channel.receive(buckets, self._targets())
        self.version = version
        return received

    def weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors as this model holds them, in the layout it receives (for checks)."""
        targets = self._targets()
        return {n: targets[n].detach().clone() for n in names}


class RolloutWorker(WeightChannelMember):
    """Generation on one copy of the policy. Plain class; the fleet wraps it as a Ray actor."""

    def __init__(self, hf_config: dict, threads: int | None = None):
        _return_large_blocks_to_the_os()
        if threads:
            torch.set_num_threads(threads)
        self.model = _build_hf_model(hf_config)
        self.version = -1
        self._channel: WeightReceiver | None = None

    def pid(self) -> int:
        return os.getpid()

    def set_weights(self, hf_state: dict[str, torch.Tensor], version: int) -> int:
        """The whole model at once (every tensor must be there)."""
        self.model.load_state_dict(to_transformers_layout(hf_state, self.model), strict=True)
        self.version = version
        return version

    @torch.no_grad()
    def update_weights(self, part: dict[str, torch.Tensor], version: int) -> int:
        """Some of the model's tensors, in the saved HF layout, copied into the model in
        place (a fused FlexOlmo expert tensor takes one expert's projection at a time);
        the rest keep what they had. In process; ``bench/rollout.py`` also times it through
        Ray's object store, the sync path before the channel."""
        targets = self._targets()
        unknown = [k for k in part if k not in targets]
        if unknown:
            raise KeyError(f"weights for the rollout model: unknown tensor {unknown[0]!r}")
        for key, tensor in part.items():
            targets[key].copy_(tensor)
        self.version = version
        return version

    def _targets(self) -> dict[str, torch.Tensor]:
        """HF key -> the view of this model's own storage that tensor goes into."""
        if getattr(self, "_target_views", None) is None:
            views = {}
            for key, t in self.model.state_dict(keep_vars=False).items():
                m = _FUSED_EXPERTS.match(key)
                if not m:
                    views[key] = t
                    continue
                prefix, kind = m.groups()
                for e in range(t.size(0)):
                    if kind == "gate_up_proj":
                        half = t.size(1) // 2
                        views[f"{prefix}.{e}.gate_proj.weight"] = t[e, :half]
                        views[f"{prefix}.{e}.up_proj.weight"] = t[e, half:]
                    else:
                        views[f"{prefix}.{e}.down_proj.weight"] = t[e]
            self._target_views = views
        return self._target_views

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        samples_per_prompt: int,
        temperature: float,
        max_new_tokens: int,
        eos_id: int,
        pad_id: int,
        seed: int,
        record_routing: bool = False,
    ) -> list[dict]:
        """For each prompt, ``samples_per_prompt`` completions (ids up to and including EOS)
        with per-token log-probs under softmax(logits / temperature), the summed entropy of
        that distribution over the completion's tokens, and whether generation stopped at
        ``max_new_tokens`` without EOS (``truncated``). Temperature 0 decodes greedily (the
        log-probs and entropy are then those of softmax(logits)).

        ``record_routing`` (MoE only): ``routing`` per sample, the experts this model chose
        for every input position the trainer will see (the prompt and every completion
        token but the last), as an int16 ``[layers, positions, top_k]`` tensor, for the
        trainer to replay (:mod:`megatron_bar.rl.routing`)."""
        torch.manual_seed(seed)
        expanded = [p for p in prompts for _ in range(samples_per_prompt)]
        width = max(len(p) for p in expanded)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(expanded), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(expanded):  # left padding: generation continues at the right
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention[i, width - len(p):] = 1
        recorder = _RoutingRecorder(self.model) if record_routing else None
        try:
            out = decode(self.model, input_ids.to(device), attention.to(device), temperature,
                         max_new_tokens, eos_id, pad_id)
        finally:
            if recorder is not None:
                recorder.remove()
        new_tokens, logprobs, entropy = out.tokens.cpu(), out.logprobs.cpu(), out.entropy.cpu()  # [n, T] each
        results = []
        for i in range(len(expanded)):
            tokens = new_tokens[i].tolist()
            length = tokens.index(eos_id) + 1 if eos_id in tokens else len(tokens)
            result = {
                "prompt_index": i // samples_per_prompt,
                "tokens": tokens[:length],
                "logprobs": logprobs[i, :length].tolist(),
                "entropy_sum": float(entropy[i, :length].sum()),
                "truncated": eos_id not in tokens[:length] and length == max_new_tokens,
                "version": self.version,
            }
            if recorder is not None:
                result["routing"] = recorder.sample(i, width, len(expanded[i]), length)
            results.append(result)
        return results

    @torch.no_grad()
    def logprobs(self, prompt: list[int], completion: list[int], temperature: float = 1.0) -> list[float]:
        ids = torch.tensor([prompt + completion])
        logits = self.model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()
