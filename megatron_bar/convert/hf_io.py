"""Reading and writing Hugging Face model folders: config.json and safetensors.

Reading is lazy: a tensor is read from its (memory-mapped) safetensors file when asked
for, so a conversion holds one HF tensor at a time. Writing fills shards up to a size
limit and writes the index, as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_bar.data.tokenizer import copy_companion_files
from megatron_bar.model.config import ConfigError, ModelConfig

SUPPORTED_ARCHITECTURES = {
    "Olmo2ForCausalLM": "olmo2",
    "FlexOlmoForCausalLM": "flex_olmo",
}
# HF config fields carried through a conversion unchanged.
_CARRIED_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class HFFormatError(ValueError):
    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- config -------------------------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFFormatError(f"{path}: not found (an HF model folder needs its config.json)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise HFFormatError(f"{path}: expected a JSON object, found {type(hf).__name__}")
    return hf


def model_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and model_type not in (
        SUPPORTED_ARCHITECTURES.values()
    ):
        raise HFFormatError(
            f"{source}: architecture {archs or model_type!r} is not supported; megatron_bar "
            f"converts {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    is_moe = model_type == "flex_olmo" or "FlexOlmoForCausalLM" in archs

    def need(key):
        if key not in hf:
            raise HFFormatError(f"{source}: missing required field {key!r}")
        return hf[key]

    if hf.get("tie_word_embeddings", False):
        raise HFFormatError(f"{source}: tie_word_embeddings=true is not Olmo 2 (untied)")
    if hf.get("attention_bias", False):
        raise HFFormatError(f"{source}: attention_bias=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise HFFormatError(f"{source}: rope_type {rope['rope_type']!r} is not supported")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 500000.0))
    heads = need("num_attention_heads")
    fields = dict(
        vocab_size=need("vocab_size"),
        hidden_size=need("hidden_size"),
        ffn_hidden_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_attention_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or need("hidden_size") // heads,
        rope_theta=float(rope_theta),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        init_std=hf.get("initializer_range", 0.02),
        hf_extra={k: hf[k] for k in _CARRIED_FIELDS if k in hf},
    )
    if is_moe:
        fields.update(
            num_experts=need("num_experts"),
            moe_topk=need("num_experts_per_tok"),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        )
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise HFFormatError(f"{source}: {e}") from None


def hf_config_from_model_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    hf = {
        "architectures": ["FlexOlmoForCausalLM" if cfg.is_moe else "Olmo2ForCausalLM"],
        "model_type": "flex_olmo" if cfg.is_moe else "olmo2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        # transformers' defaults are the real Olmo 2 ids, out of range for small vocabs.
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        hf["head_dim"] = cfg.head_dim
    if cfg.is_moe:
        hf.update(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.moe_topk,
            norm_topk_prob=cfg.norm_topk_prob,
            output_router_logits=False,
            router_aux_loss_coef=0.01,
        )
    hf.update(cfg.hf_extra)
    return hf


# -- safetensors --------------------------------------------------------------------------


class SafetensorsReader:
    """The tensors of an HF folder (``model.safetensors`` or a sharded index), read lazily."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise HFFormatError(f"{index}: not a safetensors index ({e})") from None
            self.key_to_file = {k: self.dir / f for k, f in weight_map.items()}
        elif single.is_file():
            self.key_to_file = None
            self._single = single
        else:
            raise HFFormatError(
                f"{self.dir}: no model.safetensors or model.safetensors.index.json"
            )
        self._handles: dict[Path, object] = {}
        self._keys_of: dict[Path, set[str]] = {}
        if self.key_to_file is None:
            self.key_to_file = {k: single for k in self._open(single).keys()}
        else:
            for f in sorted(set(self.key_to_file.values())):
                if not f.is_file():
                    raise HFFormatError(f"{f}: listed in the index but missing")
                self._open(f)
            for key, f in self.key_to_file.items():
                if key not in self._file_keys(f):
                    raise HFFormatError(
                        f"{f}: does not contain tensor {key!r}, which {index.name} places there"
                    )

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise HFFormatError(f"{path}: unreadable safetensors file ({e})") from None
        return self._handles[path]

    def _file_keys(self, path: Path) -> set[str]:
        if path not in self._keys_of:
            self._keys_of[path] = set(self._open(path).keys())
        return self._keys_of[path]

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def file_of(self, key: str) -> Path:
        return self.key_to_file[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self.key_to_file[key]).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        path = self.key_to_file.get(key)
        if path is None:
            raise HFFormatError(f"{self.dir}: tensor {key!r} not found")
        try:
            return self._open(path).get_tensor(key)
        except Exception as e:
            raise HFFormatError(f"{path}: cannot read tensor {key!r} ({e})") from None


class SafetensorsWriter:
    """Writes tensors into shards of at most ``max_shard_bytes`` plus the HF index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 2**30):
        self.dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.dir / f"shard-{len(self._shards):05d}.partial"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        # safetensors creates the file 0600; the export is read by a cluster's other users
        # like the config and tokenizer files beside it (0644 under the usual umask).
        path.chmod(0o666 & ~_umask())
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending:
            self._flush()
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.dir / "model.safetensors")
            return
        weight_map = {}
        for i, (path, keys) in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.dir / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Every tokenizer file of ``src`` (``megatron_bar.data.tokenizer.TOKENIZER_FILES``), copied whole to ``dst``."""
    return copy_companion_files(src, dst)
