"""A rollout worker: a copy of the policy that generates completions with their log-probs.

The policy is a transformers model (Olmo 2 or FlexOlmo) built from the trainer's
``ModelConfig``; it generates with the KV cache, samples at the configured temperature,
and reports each sampled token's log-probability under the sampling distribution (what
the trainer's importance correction compares against). Weights arrive in the HF layout
(:mod:`megatron_bar.rl.weights`), through Ray's object store when run as an actor.
"""

from __future__ import annotations

import os
import re

import torch

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


class RolloutWorker:
    """Generation on one copy of the policy. Plain class; the fleet wraps it as a Ray actor."""

    def __init__(self, hf_config: dict, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.model = _build_hf_model(hf_config)
        self.version = -1

    def pid(self) -> int:
        return os.getpid()

    def set_weights(self, hf_state: dict[str, torch.Tensor], version: int) -> int:
        self.model.load_state_dict(to_transformers_layout(hf_state, self.model), strict=True)
        self.version = version
        return version

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
    ) -> list[dict]:
        """For each prompt, ``samples_per_prompt`` completions (ids up to and including EOS)
        with per-token log-probs under softmax(logits / temperature)."""
        torch.manual_seed(seed)
        expanded = [p for p in prompts for _ in range(samples_per_prompt)]
        width = max(len(p) for p in expanded)
        input_ids = torch.full((len(expanded), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(expanded):  # left padding: generation continues at the right
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention[i, width - len(p):] = 1
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        new_tokens = out.sequences[:, width:]
        logits = torch.stack(out.logits, dim=1).float() / temperature  # [n, T, V]
        logprobs = torch.log_softmax(logits, -1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        results = []
        for i in range(len(expanded)):
            tokens = new_tokens[i].tolist()
            length = tokens.index(eos_id) + 1 if eos_id in tokens else len(tokens)
            results.append({
                "prompt_index": i // samples_per_prompt,
                "tokens": tokens[:length],
                "logprobs": logprobs[i, :length].tolist(),
                "version": self.version,
            })
        return results

    @torch.no_grad()
    def logprobs(self, prompt: list[int], completion: list[int], temperature: float = 1.0) -> list[float]:
        ids = torch.tensor([prompt + completion])
        logits = self.model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()
