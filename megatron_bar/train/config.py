"""Training configuration: typed dataclasses, loaded from YAML, with dotted overrides.

    python -m megatron_bar.train examples/configs/tiny/sft.yaml train.steps=50 optim.lr=3e-4

An unknown key - in the file or in an override - is an error that lists the valid keys of
its section, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# One error type for every configuration problem, model or training.
from megatron_bar.model.config import ConfigError


@dataclass
class DatasetConfig:
    path: str
    kind: str = "chat"  # chat (JSONL with messages) | text (JSONL with text)
    weight: float = 1.0
    domain: str | None = None  # tag for stratified sampling and reports; default: file stem
    # jsonl: tokenized on the fly | indexed: path is a tools/preprocess_data.py output prefix
    # (megatron .bin/.idx, blended by megatron's BlendedMegatronDatasetBuilder)
    format: str = "jsonl"


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    tokenizer: str | None = None  # default: the tokenizer/ folder of model.load
    seq_length: int = 512
    max_bad_lines: int = 0  # malformed JSONL lines tolerated (reported) before failing
    add_special_tokens: list[str] = field(default_factory=list)  # grow the vocabulary
    sample_fraction: float = 1.0  # stratified by domain (the router stage uses 0.05)
    document_mask: bool = True  # attention does not cross packed document boundaries
    index_cache: str | None = None  # indexed datasets: megatron's index cache folder (None: in memory)


@dataclass
class ModelLoadConfig:
    load: str = ""  # megatron_bar checkpoint to start from
    moe_topk: int | None = None  # override the checkpoint's top-k
    moe_aux_loss_coeff: float = 0.0
    recompute: bool = False  # full activation recomputation
    # FP8 matmuls through Transformer Engine (GPU only; see megatron_bar/train/gpu_features.py):
    # None | hybrid (E4M3 forward, E5M2 gradients) | e4m3
    fp8: str | None = None
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise (TE scaling recipes)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    # Adam state and fp32 master weights sharded over data-parallel ranks (ZeRO-1).
    # None: on with a GPU, off on CPU.
    distributed_optimizer: bool | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    schedule: str = "cosine"  # cosine | constant | linear
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    # LR multiplier for the shared parameters (embeddings, LM head, attention, norms) in
    # the BAR expert stages (midtrain, sft, rlvr); experts and router train at ``lr``.
    # Below 1 the experts' copies of the shared parameters stay close, so that merging
    # averages parameters that are still near each other (the merge's divergence report
    # measures how near). Dense stages (full) and the router stage ignore it.
    shared_lr_scale: float = 1.0
    # Per-group overrides of shared_lr_scale, e.g. {embedding: 0.01}: the merge averages
    # each group, and groups differ in how much an average of K drifted copies costs (in
    # the demo the averaged embeddings cost the code expert everything, the averaged LM
    # head almost nothing). Keys: embedding, lm_head, attention, norms.
    shared_lr_scale_by_group: dict[str, float] = field(default_factory=dict)
    # Of the embedding and LM head, train only the rows of the tokens this stage adds
    # (data.add_special_tokens); every other row keeps the bits it starts with. A stage
    # that adds tokens needs their rows trained, not the whole vocabulary moved: the
    # merge averages the rows every expert shares, and takes an added token's rows from
    # the experts that have it. A stage that adds none then trains no vocabulary row.
    train_only_added_vocab_rows: bool = False


@dataclass
class TrainLoopConfig:
    stage: str = "sft"  # midtrain | sft | rlvr | router (the freeze policy)
    steps: int | None = None  # None: derived from epochs
    epochs: float = 1.0
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 2  # sequences per forward/backward on one rank
    seed: int = 1234
    log_interval: int = 1
    output_dir: str = "runs/default"  # metrics, plots, checkpoints (unless checkpoint.dir)


ROUTER_INITS = ("none", "domain_means", "domain_probe", "domain_routing")


@dataclass
class RouterConfig:
    """Options of MoE models: router initialisation and routing statistics."""

    # none | domain_means (each expert's row <- its domain's mean hidden state) | domain_probe
    # (every row fitted as a linear classifier of the tokens' domains; general -> the anchor) |
    # domain_routing (fitted so that a domain's tokens split between the anchor and its
    # expert as that expert's own rows split them, and no other expert gets any)
    init: str = "none"
    stats: bool = True  # write router_stats.{json,png}: share of tokens per expert per domain
    stats_sequences: int = 16  # sequences per domain for the statistics and the init


@dataclass
class CheckpointConfig:
    dir: str | None = None  # default: <output_dir>/checkpoints
    interval: int = 100  # steps between checkpoints (and one at the end)
    keep_last: int = 2


@dataclass
class TrainConfig:
    model: ModelLoadConfig = field(default_factory=ModelLoadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    router: RouterConfig = field(default_factory=RouterConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.train.output_dir) / "checkpoints")

    def validate(self) -> "TrainConfig":
        from megatron_bar.bar.freeze import FREEZE_POLICIES

        if self.train.stage not in FREEZE_POLICIES:
            raise ConfigError(
                f"train.stage {self.train.stage!r} is not one of {sorted(FREEZE_POLICIES)}"
            )
        if self.optim.schedule not in ("cosine", "constant", "linear"):
            raise ConfigError(f"optim.schedule {self.optim.schedule!r}: cosine, constant or linear")
        if not self.optim.shared_lr_scale > 0:
            raise ConfigError(f"optim.shared_lr_scale must be > 0, got {self.optim.shared_lr_scale}")
        from megatron_bar.bar.freeze import SHARED_GROUPS

        for group, scale in self.optim.shared_lr_scale_by_group.items():
            if group not in SHARED_GROUPS:
                raise ConfigError(f"optim.shared_lr_scale_by_group: {group!r} is not a shared group "
                                  f"({', '.join(SHARED_GROUPS)})")
            if not scale > 0:
                raise ConfigError(f"optim.shared_lr_scale_by_group.{group} must be > 0, got {scale}")
        if not self.model.load:
            raise ConfigError("model.load is required (a megatron_bar checkpoint to start from)")
        if not self.data.datasets:
            raise ConfigError("data.datasets is empty")
        for d in self.data.datasets:
            if d.kind not in ("chat", "text"):
                raise ConfigError(f"dataset {d.path}: kind {d.kind!r} is not chat or text")
            if d.format not in ("jsonl", "indexed"):
                raise ConfigError(f"dataset {d.path}: format {d.format!r} is not jsonl or indexed")
        if len({d.format for d in self.data.datasets}) > 1:
            raise ConfigError("data.datasets mixes jsonl and indexed datasets; preprocess them all")
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ConfigError("train.global_batch_size must be a multiple of train.micro_batch_size")
        if self.router.init not in ROUTER_INITS:
            raise ConfigError(f"router.init {self.router.init!r}: one of {', '.join(ROUTER_INITS)}")
        if not 0 < self.data.sample_fraction <= 1:
            raise ConfigError("data.sample_fraction must be in (0, 1]")
        from megatron_bar.train.gpu_features import validate_gpu_features

        validate_gpu_features(self)
        return self


# -- building dataclasses from plain data ---------------------------------------------------


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"{where or 'config'}: unknown key {unknown[0]!r}; valid keys: {', '.join(names)}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if _is_dataclass_type(tp):
        return _build(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(args[0], k, where): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-2" (no dot) as a string; users mean the number.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _set_dotted(data: dict, dotted: str, value, cls) -> None:
    parts = dotted.split(".")
    node, node_cls, where = data, cls, ""
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)]
        if part not in names:
            raise ConfigError(
                f"override {dotted!r}: unknown key {part!r} in {where or 'config'}; "
                f"valid keys: {', '.join(names)}"
            )
        where = f"{where}.{part}" if where else part
        if i == len(parts) - 1:
            node[part] = value
            return
        sub = typing.get_type_hints(node_cls)[part]
        if not _is_dataclass_type(sub):
            raise ConfigError(f"override {dotted!r}: {where} is not a section")
        node = node.setdefault(part, {})
        node_cls = sub


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: what is wrong and where (YAML's own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{what}".split())


def load_config(path: str | Path, overrides: list[str] = (), cls=None) -> TrainConfig:
    """Read ``path`` (YAML) and apply ``key=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({_yaml_problem(e)})") from None
        _set_dotted(data, key.strip(), value, cls or TrainConfig)
    # Relative paths are relative to the working directory, as in Megatron-LM.
    return _build(cls or TrainConfig, data, "").validate()


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
