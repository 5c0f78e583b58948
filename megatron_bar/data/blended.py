"""Blended domain mixtures of indexed datasets, through megatron-core's dataset builder.

:class:`MaskedGPTDataset` is megatron's ``GPTDataset`` (its document, sample and shuffle
indices, built by the compiled helpers) reading the loss mask alongside the tokens. A
sample is ``seq_length + 1`` consecutive tokens of the shuffled document stream, as in
megatron pretraining, returned as inputs / labels shifted by one with:

* ``loss_mask``: the stored mask of the label token (chat: assistant tokens only; text:
  1), and 0 where the label is the first token of the next document: no label crosses a
  document boundary (the on-the-fly packer's rule too).
* ``position_ids`` restarting at 0 at every document start in the sample, and
  ``document_ids`` (0, 1, ... per document piece) for the same-document attention mask.

So a document that fits in a sample trains on exactly what the on-the-fly JSONL path
trains on; a longer one is continued in the next sample (the JSONL packer truncates it).

:class:`BlendedSamples` mixes several sources by weight with
``BlendedMegatronDatasetBuilder``. One *mixture epoch* has ``len(samples)`` samples: the
largest mixture that repeats no source (as :func:`megatron_bar.data.mixture.mix_datasets`).
Mixture epoch ``e`` is a megatron blend built with a seed derived from ``(seed, e)``, so
the sample at global position ``g`` is a function of the seed and ``g`` alone: resuming at
a checkpoint's consumed-samples position sees exactly the samples of the uninterrupted run.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_idx_path

from megatron_bar.data.chat import DataError
from megatron_bar.data.indexed import IndexedSource, mask_prefix, open_indexed
from megatron_bar.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _seed32(*parts) -> int:
    """A 32-bit seed (numpy's RandomState range) from a string; independent of PYTHONHASHSEED."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def select_documents(indices: numpy.ndarray, fraction: float, seed: int, domain: str) -> numpy.ndarray:
    """``fraction`` of ``indices`` (at least one; the stratified_sample rule), chosen by a
    stream seeded with the seed and the domain, in their original order."""
    n = len(indices)
    if fraction >= 1 or n == 0:
        return indices
    take = min(n, max(1, int(numpy.floor(fraction * n + 0.5))))
    rng = numpy.random.default_rng(_seed32(seed, domain))
    return numpy.sort(indices[rng.choice(n, size=take, replace=False)]).astype(indices.dtype)


class TokenizerInfo:
    """What megatron's dataset config reads from a tokenizer (vocabulary size, EOD, and an
    identity for its cache keys)."""

    def __init__(self, tokenizer: Tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eos_id
        self.unique_identifiers = {"class": "megatron_bar", "fingerprint": tokenizer.fingerprint()}


@dataclass
class MaskedGPTDatasetConfig(GPTDatasetConfig):
    loss_mask_prefixes: dict = field(default_factory=dict)  # token prefix -> mask prefix (chat sources)
    domains: dict = field(default_factory=dict)  # token prefix -> domain tag
    document_fraction: float = 1.0  # the stratified sample (router stage: 0.05)
    fraction_seed: int = 0
    # token prefix -> sha256 of its .idx: in megatron's cache key, so that a dataset
    # preprocessed again at the same prefix never meets the indices of the old one
    contents: dict = field(default_factory=dict)


class MaskedGPTDataset(GPTDataset):
    """megatron's GPTDataset with a loss mask and document ids (see the module docstring)."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        if config.document_fraction < 1:
            indexed_indices = select_documents(
                indexed_indices, config.document_fraction, config.fraction_seed, config.domains[dataset_path]
            )
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        mp = config.loss_mask_prefixes.get(dataset_path)
        self.mask_dataset = IndexedDataset(mp, multimodal=False, mmap=True) if mp else None

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return GPTDataset._key_config_attributes() + ["document_fraction", "fraction_seed", "contents"]

    def _build_document_sample_shuffle_indices(self):
        if self.config.path_to_cache is not None:
            return super()._build_document_sample_shuffle_indices()
        # With no cache folder megatron would write one under "<prefix>/cache/"; build the
        # indices in memory instead (what it does for mock data; every rank gets the same).
        saved, self.config = self.config, copy.copy(self.config)
        self.config.mock = True
        try:
            return super()._build_document_sample_shuffle_indices()
        finally:
            self.config = saved

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        i = self.shuffle_index[idx]
        beg, beg_offset = (int(x) for x in self.sample_index[i])
        end, end_offset = (int(x) for x in self.sample_index[i + 1])
        tokens, masks, segments = [], [], []
        for k, j in enumerate(range(beg, end + 1)):
            doc = int(self.document_index[j])
            offset = beg_offset if j == beg else 0
            length = end_offset - offset + 1 if j == end else None
            part = self.dataset.get(doc, offset=offset, length=length)
            tokens.append(part)
            if self.mask_dataset is not None:
                masks.append(self.mask_dataset.get(doc, offset=offset, length=length))
            else:
                masks.append(numpy.ones(len(part), dtype=numpy.uint8))
            segments.append(numpy.full(len(part), k, dtype=numpy.int64))
        text = torch.from_numpy(numpy.concatenate(tokens).astype(numpy.int64))
        mask = torch.from_numpy(numpy.concatenate(masks).astype(numpy.float32))
        seg = torch.from_numpy(numpy.concatenate(segments))
        if text.numel() != self.config.sequence_length + 1:
            raise DataError(f"dataset {self.dataset_path}: sample {idx} has {text.numel() - 1} positions")
        top = int(text.max())
        if top >= self.config.tokenizer.vocab_size or int(text.min()) < 0:
            raise DataError(
                f"dataset {self.dataset_path}: token id {top} is beyond the model's vocabulary of "
                f"{self.config.tokenizer.vocab_size}"
            )
        starts = torch.cat([torch.tensor([True]), seg[1:] != seg[:-1]])
        start_pos = torch.arange(len(seg))[starts]
        positions = torch.arange(len(seg)) - start_pos[seg]
        return {
            "tokens": text[:-1],
            "labels": text[1:],
            # The label's mask, unless the label opens the next document.
            "loss_mask": mask[1:] * (seg[1:] == seg[:-1]),
            "position_ids": positions[:-1],
            "document_ids": seg[:-1],
        }


# --------------------------------------------------------------------------- #
# The mixture
# --------------------------------------------------------------------------- #


@dataclass
class SourceSpec:
    prefix: str
    weight: float
    domain: str
    kind: str  # chat | text: what the dataset must hold


@dataclass
class SourceInfo:
    spec: SourceSpec
    source: IndexedSource
    documents: int  # after the stratified sample
    tokens: int
    samples_per_epoch: int


class BlendedSamples:
    """Samples of a weighted mixture of indexed datasets, by global position (module docstring)."""

    def __init__(
        self,
        specs: list[SourceSpec],
        tokenizer: Tokenizer,
        seq_length: int,
        seed: int,
        *,
        sample_fraction: float = 1.0,
        cache_dir: str | None = None,
    ):
        if not specs:
            raise ValueError("no datasets")
        if any(not s.weight >= 0 for s in specs) or sum(s.weight for s in specs) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {[s.weight for s in specs]}")
        names = [s.prefix for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"a dataset is listed twice: {names}")
        if cache_dir is not None and not torch.distributed.is_initialized():
            # megatron's cache protocol: rank 0 writes, the others read after a barrier
            raise ValueError("an index cache folder needs torch.distributed (the trainer); leave it None here")
        self.seq_length, self.seed, self.sample_fraction, self.cache_dir = seq_length, seed, sample_fraction, cache_dir
        self.tokenizer_info = TokenizerInfo(tokenizer)
        self.sources: list[SourceInfo] = []
        for spec in specs:
            src = open_indexed(spec.prefix, tokenizer, mode=spec.kind, sample_seed=seed)
            docs = select_documents(
                numpy.arange(src.num_documents, dtype=numpy.int32), sample_fraction, seed, spec.domain
            )
            tokens = int(src.tokens.sequence_lengths[docs].sum())
            samples = (tokens - 1) // seq_length
            if spec.weight > 0 and samples < 1:
                raise DataError(
                    f"dataset {spec.prefix}: {tokens} tokens"
                    + (f" in its {sample_fraction} sample" if sample_fraction < 1 else "")
                    + f", fewer than one sample of seq_length + 1 = {seq_length + 1}"
                )
            self.sources.append(SourceInfo(spec, src, len(docs), tokens, samples))
        self.active = [s for s in self.sources if s.spec.weight > 0]
        total = sum(s.spec.weight for s in self.active)
        self.weights = [s.spec.weight / total for s in self.active]
        # The largest mixture that repeats no source within a mixture epoch.
        self.epoch_size = max(1, min(int(s.samples_per_epoch / w + 1e-9) for s, w in zip(self.active, self.weights)))
        self._blocks: dict[int, object] = {}
        self.report = self._report(self._block(0))

    def __len__(self) -> int:
        return self.epoch_size

    def _config(self, epoch: int) -> MaskedGPTDatasetConfig:
        prefixes = [s.spec.prefix for s in self.active]
        return MaskedGPTDatasetConfig(
            random_seed=_seed32(self.seed, "epoch", epoch),
            sequence_length=self.seq_length,
            blend=(prefixes, list(self.weights)),
            split="1,0,0",
            path_to_cache=self.cache_dir,
            tokenizer=self.tokenizer_info,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            loss_mask_prefixes={s.spec.prefix: mask_prefix(s.spec.prefix) for s in self.active if s.spec.kind == "chat"},
            domains={s.spec.prefix: s.spec.domain for s in self.active},
            document_fraction=self.sample_fraction,
            fraction_seed=self.seed,
            contents={s.spec.prefix: s.source.summary.files[Path(get_idx_path(s.spec.prefix)).name]["sha256"]
                      for s in self.active},
        )

    def _block(self, epoch: int):
        if epoch not in self._blocks:
            if len(self._blocks) > 1:  # keep epoch 0 (reports, router batches) and the current one
                for key in [k for k in self._blocks if k != 0]:
                    del self._blocks[key]
            builder = BlendedMegatronDatasetBuilder(
                MaskedGPTDataset, [self.epoch_size, 0, 0], lambda: True, self._config(epoch)
            )
            quiet = logging.getLogger("megatron.core.datasets")
            level = quiet.level
            if self.cache_dir is None:  # "unable to save the indexes": in memory on purpose
                quiet.setLevel(logging.ERROR)
            try:
                blend = builder.build()[0]
            finally:
                quiet.setLevel(level)
            if len(blend) < self.epoch_size:  # pragma: no cover - megatron sizes it to the request
                raise RuntimeError(f"megatron built {len(blend)} samples, {self.epoch_size} requested")
            self._blocks[epoch] = blend
        return self._blocks[epoch]

    def sample(self, position: int) -> tuple[dict[str, torch.Tensor], int]:
        """The sample at global position ``position`` and the index of its source in ``active``."""
        epoch, i = divmod(position, self.epoch_size)
        blend = self._block(epoch)
        item = blend[i]
        return item, int(item.pop("dataset_id"))

    def domain_of(self, source_index: int) -> str:
        return self.active[source_index].spec.domain

    def _report(self, blend) -> str:
        counts = numpy.bincount(numpy.asarray(blend.dataset_index[: self.epoch_size]), minlength=len(self.active))
        lines = [
            f"indexed mixture (megatron BlendedDataset) of {self.epoch_size} samples of {self.seq_length} tokens "
            f"per mixture epoch, seed {self.seed}:"
        ]
        for s, w, c in zip(self.active, self.weights, counts):
            lines.append(
                f"  {s.spec.domain} ({s.spec.prefix}): {int(c)} samples, realised {c / self.epoch_size:.4f} "
                f"(target {w:.4f}), {c / s.samples_per_epoch:.2f} epochs of {s.documents} documents / {s.tokens} tokens"
            )
        for s in self.sources:
            if s.spec.weight == 0:
                lines.append(f"  {s.spec.domain} ({s.spec.prefix}): weight 0, left out")
        self.realised: dict[str, int] = {}  # samples per domain in mixture epoch 0
        for s, c in zip(self.active, counts):
            self.realised[s.spec.domain] = self.realised.get(s.spec.domain, 0) + int(c)
        return "\n".join(lines)


def stack_samples(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
