"""Conversion between Hugging Face Olmo 2 / FlexOlmo folders and megatron checkpoints.

Both directions go through a TP=PP=EP=1 megatron model on this process and the key map in
:mod:`megatron_bar.convert.keymap`; HF tensors are read one at a time from memory-mapped
safetensors and written shard by shard, so the peak memory is one copy of the model plus
one tensor. The megatron side is a dist checkpoint that megatron reshards on load, so the
result loads at any TP / PP / EP.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_bar import platform
from megatron_bar.convert import keymap
from megatron_bar.convert.hf_io import (
    HFFormatError,
    SafetensorsReader,
    SafetensorsWriter,
    copy_tokenizer_files,
    hf_config_from_model_config,
    model_config_from_hf,
    read_hf_config,
)
from megatron_bar.model.builder import build_model
from megatron_bar.model.checkpoint import check_checkpoint_files, load_weights, save_model
from megatron_bar.model.config import ModelConfig
from megatron_bar.utils.errors import UserError
from megatron_bar.utils.fs import atomic_output_dir, check_output_free

log = logging.getLogger(__name__)

TOKENIZER_SUBDIR = "tokenizer"
# Buffers some HF checkpoints carry that are recomputed, not learnt.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)

__all__ = [
    "hf_to_mcore",
    "mcore_to_hf",
    "HFFormatError",
    "build_for_conversion",
    "checkpoint_dtype",
    "check_checkpoint_files",
    "TOKENIZER_SUBDIR",
    "to_transformers",
]


def _progress(maps, desc: str):
    """A progress bar over the tensors of a conversion (minutes for a 7B model)."""
    from tqdm import tqdm

    return tqdm(list(maps), desc=desc, unit=" tensors", mininterval=1.0, leave=False)


def _require_one_rank():
    platform.initialize()
    if dist.get_world_size() != 1:
        raise UserError("conversion runs in a single process (not under torchrun)")


def build_for_conversion(cfg: ModelConfig, dtype: torch.dtype):
    """A TP=PP=EP=1 model whose weights are about to be overwritten (no random init)."""
    _require_one_rank()
    return build_model(cfg, params_dtype=dtype, perform_initialization=False)


def check_hf_tensors(reader: SafetensorsReader, cfg: ModelConfig, source: str) -> torch.dtype:
    """Every tensor the config implies is there with its shape, and nothing else is."""
    expected = keymap.expected_hf_shapes(cfg)
    present = {k for k in reader.keys() if not k.endswith(_IGNORED_HF_SUFFIXES)}
    missing = [k for k in expected if k not in present]
    if missing:
        raise HFFormatError(
            f"{reader.dir}: {len(missing)} tensor(s) that {source} implies are missing, "
            f"first {missing[0]!r}"
        )
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise HFFormatError(
            f"{reader.dir}: tensor {unexpected[0]!r} (in {reader.file_of(unexpected[0]).name}) "
            f"is not part of the model {source} describes ({len(unexpected)} unexpected)"
        )
    for key, shape in expected.items():
        found = reader.shape(key)
        if found != shape:
            raise HFFormatError(
                f"{reader.file_of(key)}: tensor {key!r} has shape {list(found)} but "
                f"{source} implies {list(shape)} - the config does not match the tensors"
            )
    return reader.get("model.embed_tokens.weight").dtype


def hf_to_mcore(hf_dir: str | Path, save_dir: str | Path) -> ModelConfig:
    hf_dir, save_dir = Path(hf_dir), check_output_free(save_dir)
    source = str(hf_dir / "config.json")
    cfg = model_config_from_hf(read_hf_config(hf_dir), source)
    reader = SafetensorsReader(hf_dir)
    dtype = check_hf_tensors(reader, cfg, source)
    cfg = cfg.with_(source_dtype=dtype_name(dtype))  # the export's default dtype

    model = build_for_conversion(cfg, dtype)
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for m in _progress(keymap.tensor_maps(cfg), f"reading {hf_dir.name}"):
            params[m.mcore].copy_(keymap.to_mcore(m, [reader.get(k) for k in m.hf], cfg))

    def add_tokenizer(tmp: Path):
        copy_tokenizer_files(hf_dir, tmp / TOKENIZER_SUBDIR)

    save_model(model, cfg, save_dir, write_extra=add_tokenizer)
    log.info("converted %s -> %s (%s)", hf_dir, save_dir, "MoE" if cfg.is_moe else "dense")
    return cfg


def checkpoint_dtype(ckpt_dir: Path) -> torch.dtype:
    check_checkpoint_files(ckpt_dir)
    meta = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    return meta["embedding.word_embeddings.weight"].dtype


EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def export_dtype(cfg: ModelConfig, stored: torch.dtype, requested: str | None) -> torch.dtype:
    """``requested`` (bf16 | fp16 | fp32), else the dtype of the HF checkpoint the model was
    converted from, else the dtype the checkpoint stores."""
    if requested is not None:
        if requested not in EXPORT_DTYPES:
            raise ValueError(f"dtype {requested!r}: expected one of {sorted(EXPORT_DTYPES)}")
        return EXPORT_DTYPES[requested]
    if cfg.source_dtype is not None:
        return getattr(torch, cfg.source_dtype)
    return stored


def mcore_to_hf(load_dir: str | Path, save_dir: str | Path, max_shard_bytes: int = 5 * 2**30,
                dtype: str | None = None):
    """Export ``load_dir`` to an HF folder in ``dtype`` (see :func:`export_dtype`)."""
    load_dir, save_dir = Path(load_dir), check_output_free(save_dir)
    cfg = ModelConfig.load(load_dir)
    stored = checkpoint_dtype(load_dir)
    out_dtype = export_dtype(cfg, stored, dtype)
    model = build_for_conversion(cfg, stored)
    load_weights(model, cfg, load_dir)
    state = model.state_dict()

    need = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    with atomic_output_dir(save_dir, need_bytes=need) as tmp:
        writer = SafetensorsWriter(tmp, max_shard_bytes)
        for m in _progress(keymap.tensor_maps(cfg), f"writing {save_dir.name}"):
            for key, tensor in zip(m.hf, keymap.to_hf(m, state[m.mcore], cfg)):
                writer.add(key, tensor.to(out_dtype))
        writer.close()
        hf_config = hf_config_from_model_config(cfg, out_dtype)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        copy_tokenizer_files(load_dir / TOKENIZER_SUBDIR, tmp)
    log.info("exported %s -> %s (%s)", load_dir, save_dir, dtype_name(out_dtype))
    return cfg


def to_transformers(model, dtype: torch.dtype = torch.float32):
    """A transformers copy (``Olmo2ForCausalLM`` / ``FlexOlmoForCausalLM``, eval mode) of
    a loaded :class:`megatron_bar.model.load.CausalLM`, in memory, with the export's key
    map and config (its top-k included): what :func:`mcore_to_hf` would write, without
    the disk. For decoding with transformers' KV cache (evaluation of many prompts)."""
    from megatron_bar.rl.rollout import _build_hf_model, to_transformers_layout
    from megatron_bar.rl.weights import gather_hf_state_dict

    selection = getattr(model, "expert_selection", None)
    if selection is not None:
        # FlexOlmo's config has one top-k and no dropped experts: the copy would route as
        # the checkpoint does and quietly serve every expert
        raise ValueError(f"to_transformers: the model was loaded with an expert selection "
                         f"({selection.describe()}), which a transformers FlexOlmo cannot carry; "
                         "decode with the megatron model itself, or load it with moe_topk only")
    cfg = model.config
    hf_state = gather_hf_state_dict(model.gpt, cfg)
    hf_model = _build_hf_model(hf_config_from_model_config(cfg, dtype))
    hf_model.load_state_dict(to_transformers_layout(hf_state, hf_model), strict=True)
    return hf_model.to(dtype).eval()
