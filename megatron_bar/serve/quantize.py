"""Post-training quantization of a megatron_bar checkpoint with nvidia-modelopt.

Where it runs: on the megatron model that ``load_model`` builds, not on the HF export.
modelopt has megatron-core plugins for exactly our modules (``ColumnParallelLinear`` /
``RowParallelLinear`` and the MoE ``SequentialMLP``, one quantizer set per local
expert); the calibrated quantizer state is part of megatron's sharded state dict
(``_extra_state``), so the quantized checkpoint is an ordinary megatron dist checkpoint
plus megatron's ``modelopt_state/`` folder - the layout Megatron-LM's own modelopt
examples write - which reloads at any TP / EP and through our own data path. modelopt
never wraps megatron's ``TopKRouter`` (it is no linear layer) and the presets disable
``*router*``, the LM head and embeddings: the router stays in fp32.

The vLLM / TensorRT-LLM export is modelopt's unified HF checkpoint. modelopt's
megatron -> HF exporter has no Olmo 2 / FlexOlmo mapping, so the export converts the
checkpoint with our exporter (HF FlexOlmo), quantizes that with modelopt's transformers
plugin on the *same* calibration documents, and writes ``export_hf_checkpoint``. Both
calibrations see the same model and tokens, so their ranges agree (tested).

Formats (the modelopt preset each one is):

| format | preset | weights / activations | targets |
|---|---|---|---|
| fp8 | FP8_DEFAULT_CFG | FP8 e4m3 per tensor / FP8 per tensor | vLLM, TensorRT-LLM, SGLang on Hopper+ (Ada) |
| int8 | INT8_SMOOTHQUANT_CFG | INT8 per channel / INT8 per tensor, SmoothQuant | TensorRT-LLM (W8A8_SQ_PER_CHANNEL) |
| int4_awq | INT4_AWQ_CFG | INT4 blocks of 128 (AWQ-lite) / 16-bit | TensorRT-LLM W4A16; megatron checkpoint only for MoE |

On a machine without CUDA modelopt fake-quantizes (quantize -> dequantize in fp32):
the numerics of the format, not its speed or memory.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from megatron_bar import platform
from megatron_bar.model.config import ModelConfig

log = logging.getLogger(__name__)

MODELOPT_STATE_DIR = "modelopt_state"
QUANT_META_FILE = "quantization.json"
DEFAULT_FRACTION = 0.05  # the router stage's stratified sample
DEFAULT_SEED = 1234  # TrainLoopConfig.seed
DEFAULT_SEQ_LENGTH = 512


class QuantizationError(ValueError):
    """Bad quantization input (format, calibration data, export): nothing is written."""


@dataclass(frozen=True)
class QuantFormat:
    name: str
    preset: str  # modelopt.torch.quantization attribute
    weight_bits: int
    activation_bits: int  # 16: activations stay in the model dtype
    targets: str
    hf_export_moe: bool  # modelopt 0.47's HF exporter handles FlexOlmo's experts


FORMATS: dict[str, QuantFormat] = {
    "fp8": QuantFormat("fp8", "FP8_DEFAULT_CFG", 8, 8, "vLLM / TensorRT-LLM / SGLang (FP8, Hopper+)", True),
    "int8": QuantFormat("int8", "INT8_SMOOTHQUANT_CFG", 8, 8, "TensorRT-LLM (W8A8 SmoothQuant)", True),
    "int4_awq": QuantFormat("int4_awq", "INT4_AWQ_CFG", 4, 16, "TensorRT-LLM (W4A16 AWQ)", False),
}
AWQ_BLOCK = 128


def get_format(name: str) -> QuantFormat:
    if name not in FORMATS:
        raise QuantizationError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def _modelopt():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        raise QuantizationError(
            "nvidia-modelopt is not installed: pip install -e '.[quant]'"
        ) from None
    platform.prepare_modelopt()  # its megatron plugin calls CUDA when saving (CPU patch)
    return mtq


# -- calibration data ----------------------------------------------------------------------


@dataclass
class CalibrationSet:
    """Tokenized documents, each with its domain, in a fixed order."""

    documents: list[tuple[str, list[int]]]
    source: str
    fraction: float
    seed: int
    seq_length: int

    def domains(self) -> dict[str, int]:
        return dict(Counter(d for d, _ in self.documents))

    def tokens(self) -> int:
        return sum(len(t) for _, t in self.documents)

    def summary(self) -> dict:
        per = {d: {"documents": 0, "tokens": 0} for d in self.domains()}
        for d, t in self.documents:
            per[d]["documents"] += 1
            per[d]["tokens"] += len(t)
        return {"source": self.source, "fraction": self.fraction, "seed": self.seed,
                "seq_length": self.seq_length, "domains": per}


def default_calibration_config(load: Path) -> Path | None:
    """The router stage's config of a checkpoint inside a training run
    (``<run>/checkpoints/iter_N`` -> ``<run>/config.json``), when it is one."""
    config = Path(load).parent.parent / "config.json"
    return config if config.is_file() else None


def _tokenizer(load: Path, chat: bool, extra_tokens: Sequence[str] = ()):
    from megatron_bar.data import load_tokenizer

    tokenizer = load_tokenizer(Path(load) / "tokenizer")
    if extra_tokens:
        tokenizer.add_special_tokens(list(extra_tokens))
    return tokenizer


def calibration_set(
    load: str | Path,
    datasets: Sequence[tuple[str, str, str]],
    *,
    fraction: float = DEFAULT_FRACTION,
    seed: int = DEFAULT_SEED,
    seq_length: int = DEFAULT_SEQ_LENGTH,
    extra_tokens: Sequence[str] = (),
    max_documents: int | None = None,
    source: str = "",
) -> CalibrationSet:
    """A fixed-seed stratified ``fraction`` of each (domain, path, kind) dataset.

    The same sampling as the router stage (``stratified_sample`` by the record's domain,
    else the dataset's), tokenized with the checkpoint's tokenizer and chat template;
    each document is one calibration sequence (cut at ``seq_length``), so activations
    are those of real documents without packing or padding.
    """
    from megatron_bar.data import ChatTemplate, encode_text, read_jsonl, stratified_sample

    chat = any(kind == "chat" for _, _, kind in datasets)
    tokenizer = _tokenizer(Path(load), chat, extra_tokens)
    template = ChatTemplate(tokenizer) if chat else None
    docs: list[tuple[str, list[int]]] = []
    for domain, path, kind in datasets:
        records = read_jsonl(path, kind).records
        tagged = [{"domain": r.domain or domain, "record": r} for r in records]
        for t in stratified_sample(tagged, fraction, seed, key="domain"):
            r = t["record"]
            doc = template.encode(r) if kind == "chat" else encode_text(r, tokenizer)
            if doc.tokens:
                docs.append((t["domain"], doc.tokens[:seq_length]))
    if max_documents is not None and len(docs) > max_documents:
        # keep the per-domain shares: the first max_documents of a round robin over domains
        by_domain: dict[str, list] = {}
        for d in docs:
            by_domain.setdefault(d[0], []).append(d)
        queues = list(by_domain.values())
        docs = []
        while len(docs) < max_documents:
            for q in queues:
                if q and len(docs) < max_documents:
                    docs.append(q.pop(0))
    if not docs:
        raise QuantizationError(f"{source or 'calibration data'}: no documents to calibrate on")
    return CalibrationSet(docs, source, fraction, seed, seq_length)


def calibration_from_config(load: str | Path, config_path: str | Path, **kw) -> CalibrationSet:
    """The router stage's sample: the datasets, ``sample_fraction``, seed and sequence
    length of a training config (YAML, or a run's ``config.json``)."""
    from megatron_bar.train.config import load_config

    cfg = load_config(config_path)
    if not cfg.data.datasets:
        raise QuantizationError(f"{config_path}: data.datasets is empty")
    datasets = [(d.domain or Path(d.path).stem, d.path, d.kind) for d in cfg.data.datasets]
    return calibration_set(
        load, datasets, fraction=cfg.data.sample_fraction, seed=cfg.train.seed,
        seq_length=cfg.data.seq_length, extra_tokens=cfg.data.add_special_tokens,
        source=str(config_path), **kw,
    )


def parse_calib_args(items: Sequence[str]) -> list[tuple[str, str, str]]:
    """``domain=path.jsonl`` (chat) or ``domain=path.jsonl:text`` -> (domain, path, kind)."""
    out = []
    for item in items:
        if "=" not in item:
            raise QuantizationError(f"--calib {item!r}: expected a config file or domain=path.jsonl")
        domain, path = item.split("=", 1)
        kind = "chat"
        if path.endswith((":text", ":chat")):
            path, kind = path.rsplit(":", 1)
        if not Path(path).is_file():
            raise QuantizationError(f"--calib {item!r}: {path} not found")
        out.append((domain, path, kind))
    return out


def check_domains(calib: CalibrationSet, expert_domains: Sequence[str]) -> None:
    """Every domain expert's domain has calibration documents (the anchor has none)."""
    present = calib.domains()
    missing = [d for d in expert_domains if d not in present]
    if missing:
        raise QuantizationError(
            f"{calib.source}: the calibration set has no documents of domain(s) {missing} "
            f"(it has {sorted(present)}); every expert's domain must be represented - "
            "add its data or name it with --calib domain=path.jsonl"
        )


# -- quantization ----------------------------------------------------------------------------


def quant_config(fmt: QuantFormat, cfg: ModelConfig) -> dict:
    """The modelopt preset of ``fmt``, with the router explicitly kept in high precision
    and the AWQ block shrunk where the model is narrower than 128 (tiny models only)."""
    mtq = _modelopt()
    qcfg = copy.deepcopy(getattr(mtq, fmt.preset))
    if fmt.name == "int4_awq":
        widths = [cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads * cfg.head_dim]
        block = AWQ_BLOCK
        while block > 8 and any(w % block for w in widths):
            block //= 2
        for entry in qcfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
                entry["cfg"]["block_sizes"] = {-1: block, "type": "static"}
    qcfg["quant_cfg"].append({"quantizer_name": "*router*", "enable": False})
    return qcfg


def _forward_loop(calib: CalibrationSet, progress: bool) -> Callable:
    from tqdm import tqdm

    def loop(gpt):
        device = platform.device()
        with torch.no_grad():
            for _, tokens in tqdm(calib.documents, desc="calibrating", unit="doc", disable=not progress):
                ids = torch.tensor([tokens], device=device)
                pos = torch.arange(ids.size(1), device=device).unsqueeze(0)
                gpt(ids, pos, None)

    return loop


def quantize_model(gpt, fmt: QuantFormat, cfg: ModelConfig, calib: CalibrationSet, progress: bool = True):
    """Insert modelopt quantizers into ``gpt`` (in place) and calibrate them."""
    mtq = _modelopt()
    was_training = gpt.training
    gpt.eval()
    gpt = mtq.quantize(gpt, quant_config(fmt, cfg), _forward_loop(calib, progress))
    gpt.train(was_training)
    return gpt


def is_quantized_checkpoint(path: str | Path) -> bool:
    """Written by tools/quantize.py: megatron's modelopt_state folder beside the weights."""
    return (Path(path) / "modelopt_state").is_dir()


def restore_quantizers(gpt, path: str | Path):
    """Re-insert the quantizers recorded in ``path/modelopt_state`` (before the weights
    and their ``_extra_state`` are loaded)."""
    _modelopt()
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import restore_sharded_modelopt_state

    models = [gpt]
    restore_sharded_modelopt_state(models, str(path))
    return models[0]


def quantizer_summary(gpt) -> dict:
    """Counts of enabled weight / input quantizers, and the modules left unquantized."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    enabled = Counter()
    for name, m in gpt.named_modules():
        if isinstance(m, TensorQuantizer) and m.is_enabled:
            enabled[name.rsplit(".", 1)[-1]] += 1
    routers = [n for n, m in gpt.named_modules() if n.endswith("mlp.router")]
    router_quantizers = [n for n, m in gpt.named_modules()
                         if isinstance(m, TensorQuantizer) and ".router." in n and m.is_enabled]
    return {"enabled_quantizers": dict(enabled), "routers": len(routers),
            "router_quantizers": len(router_quantizers)}


@dataclass
class QuantizeResult:
    save: Path
    format: str
    calibration: dict
    summary: dict
    hf_export: Path | None = None
    meta: dict = field(default_factory=dict)


def _expert_domains(load: Path, cfg: ModelConfig) -> list[str]:
    """The domain expert names of a merged BAR model (empty for dense / unnamed)."""
    if not cfg.is_moe:
        return []
    from megatron_bar.bar.manifest import ANCHOR_NAME as ANCHOR
    from megatron_bar.bar.manifest import expert_names

    names = expert_names(load, cfg.num_experts)
    if all(n == ANCHOR or n.startswith("expert") and n[6:].isdigit() for n in names):
        return []  # no manifest: nothing to check the domains against
    return [n for n in names if n != ANCHOR]


def quantize_checkpoint(
    load: str | Path,
    save: str | Path,
    fmt_name: str,
    calib: CalibrationSet,
    *,
    hf_export: str | Path | None = None,
    progress: bool = True,
    print_fn=print,
) -> QuantizeResult:
    """Quantize the checkpoint in ``load`` into ``save`` (and the HF export into
    ``hf_export``). Every check runs before anything is written; each output appears
    only when complete."""
    from megatron_bar.model.builder import build_model
    from megatron_bar.model.checkpoint import load_weights, save_model
    from megatron_bar.utils.fs import check_output_free

    fmt = get_format(fmt_name)
    load, save = Path(load), Path(save)
    cfg = ModelConfig.load(load)
    if is_quantized_checkpoint(load):
        raise QuantizationError(f"{load}: already quantized ({MODELOPT_STATE_DIR}/ present)")
    check_output_free(save)
    if hf_export is not None:
        hf_export = check_output_free(hf_export)
        if cfg.is_moe and not fmt.hf_export_moe:
            raise QuantizationError(
                f"--export-hf: nvidia-modelopt's HF exporter does not support {fmt.name} for "
                "FlexOlmo's experts (its AWQ export knows only its own list of MoE models); "
                "the megatron checkpoint alone can be written - drop --export-hf"
            )
    check_domains(calib, _expert_domains(load, cfg))
    top = max(max(t) for _, t in calib.documents)
    if top >= cfg.vocab_size:
        raise QuantizationError(
            f"{calib.source}: token id {top} is outside the model's vocabulary of {cfg.vocab_size} "
            f"- is {load / 'tokenizer'} the model's tokenizer?"
        )
    _modelopt()
    if not platform.is_initialized():
        platform.initialize()

    print_fn(f"quantizing {load} -> {save} ({fmt.name}: {fmt.preset}); calibration: "
             f"{len(calib.documents)} documents, {calib.tokens()} tokens, domains {calib.domains()}")
    gpt = build_model(cfg)
    load_weights(gpt, cfg, load)
    gpt = quantize_model(gpt, fmt, cfg, calib, progress)
    summary = quantizer_summary(gpt)
    if summary["router_quantizers"]:
        raise QuantizationError("a router got a quantizer; the router must stay in high precision")
    import modelopt

    meta = {
        "format": fmt.name, "modelopt_preset": fmt.preset, "modelopt_version": modelopt.__version__,
        "weight_bits": fmt.weight_bits, "activation_bits": fmt.activation_bits, "targets": fmt.targets,
        "source": str(load.resolve()), "calibration": calib.summary(), "quantizers": summary,
        "high_precision": ["router", "embedding", "output_layer", "norms"],
    }

    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    def write_extra(tmp: Path):
        save_sharded_modelopt_state([gpt], str(tmp))
        for name in ("tokenizer",):
            if (load / name).is_dir():
                shutil.copytree(load / name, tmp / name)
        from megatron_bar.bar.manifest import MANIFEST_FILE, find_manifest

        src = find_manifest(load)
        if src is not None:
            shutil.copy2(src / MANIFEST_FILE, tmp / MANIFEST_FILE)  # expert names
        (tmp / QUANT_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    exported = None
    if hf_export is not None:
        # the export first: if modelopt's exporter fails, nothing at all is written
        exported = export_hf(load, hf_export, fmt, cfg, calib, progress=progress, print_fn=print_fn)
    try:
        save_model(gpt, cfg, save, write_extra=write_extra)
    except BaseException:
        if exported is not None:
            shutil.rmtree(exported, ignore_errors=True)
        raise
    print_fn(f"wrote {save} ({summary['enabled_quantizers']})")
    return QuantizeResult(save, fmt.name, calib.summary(), summary, exported, meta)


def export_hf(load: Path, out: Path, fmt: QuantFormat, cfg: ModelConfig, calib: CalibrationSet,
              progress: bool = True, print_fn=print) -> Path:
    """modelopt's unified HF checkpoint (``hf_quant_config.json``, quantized safetensors)
    of ``load``: our FlexOlmo / Olmo 2 export, quantized by modelopt's transformers
    plugin on the same calibration documents."""
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from megatron_bar.convert import mcore_to_hf
    from megatron_bar.convert.hf_io import copy_tokenizer_files
    from megatron_bar.utils.fs import atomic_output_dir

    mtq = _modelopt()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.hf-") as tmp:
        hf_dir = Path(tmp) / "hf"
        mcore_to_hf(load, hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto").eval()

        def loop(m):
            with torch.no_grad():
                for _, tokens in calib.documents:
                    m(torch.tensor([tokens]))

        model = mtq.quantize(model, quant_config(fmt, cfg), loop)
        with atomic_output_dir(out) as final_tmp:
            export_hf_checkpoint(model, export_dir=str(final_tmp))
            copy_tokenizer_files(hf_dir, final_tmp)
    print_fn(f"wrote {out} (modelopt unified HF checkpoint, {fmt.name})")
    return out
