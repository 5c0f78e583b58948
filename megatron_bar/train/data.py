"""From the config's JSONL datasets to the microbatches of each step on each rank.

Datasets with ``format: indexed`` (tools/preprocess_data.py outputs) go through
:class:`IndexedTrainingData` instead (megatron's blended dataset builder; same interface).

Each JSONL dataset is read (malformed lines reported with file and line), optionally
stratified-sampled by domain, tokenized (chat template or plain text), packed into
fixed-length sequences, and the packed datasets are mixed by weight. The order of the
mixture is a function of the seed and the epoch only, so the samples of step ``s`` are
known without having seen steps ``0..s-1``: resuming from a checkpoint's step gives
exactly the samples the uninterrupted run sees, at any data-parallel size.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from megatron_bar.data import (
    ChatTemplate,
    collate_packed,
    encode_text,
    mix_datasets,
    pack_documents,
    read_jsonl,
    stratified_sample,
)
from megatron_bar.data.blended import BlendedSamples, SourceSpec, stack_samples
from megatron_bar.data.packing import PackedSequence, PackingStats, document_attention_mask
from megatron_bar.data.tokenizer import Tokenizer
from megatron_bar.train.config import DataConfig
from megatron_bar.train.engine import Microbatch

log = logging.getLogger(__name__)


@dataclass
class DatasetSummary:
    name: str
    domain: str
    records: int
    bad_lines: int
    sequences: int
    truncated: int
    loss_tokens: int


@dataclass
class TrainingData:
    sequences: list[PackedSequence]  # the mixture (one epoch)
    sources: list[str]
    summaries: list[DatasetSummary]
    mixture_report: str
    seed: int
    document_mask: bool

    def __len__(self) -> int:
        return len(self.sequences)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.sequences)))
        random.Random(f"{self.seed}/epoch{epoch}").shuffle(order)
        return order

    def sample_index(self, global_sample: int) -> int:
        epoch, i = divmod(global_sample, len(self.sequences))
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_epoch, self._cached_order = epoch, self._epoch_order(epoch)
        return self._cached_order[i]

    def microbatches(
        self, step: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[Microbatch]:
        """This data-parallel rank's microbatches of optimizer step ``step``."""
        per_rank = global_batch_size // dp_size
        first = step * global_batch_size + dp_rank * per_rank
        seqs = [self.sequences[self.sample_index(first + i)] for i in range(per_rank)]
        out = []
        for i in range(0, per_rank, micro_batch_size):
            b = collate_packed(seqs[i : i + micro_batch_size])
            out.append(
                Microbatch(
                    tokens=b.tokens,
                    labels=b.labels,
                    loss_mask=b.loss_mask,
                    position_ids=b.position_ids,
                    attention_mask=b.attention_mask if self.document_mask else None,
                )
            )
        return out


    def domain_batches(self, per_domain: int, micro_batch_size: int) -> dict[str, list]:
        """Up to ``per_domain`` sequences of each domain, as (tokens, position_ids, mask)
        batches, for router statistics and initialisation."""
        domain_of = {s.name: s.domain for s in self.summaries}
        chosen: dict[str, list[PackedSequence]] = {}
        for seq, source in zip(self.sequences, self.sources):
            picked = chosen.setdefault(domain_of[source], [])
            if len(picked) < per_domain:
                picked.append(seq)
        out = {}
        for domain, seqs in chosen.items():
            batches = []
            for i in range(0, len(seqs), micro_batch_size):
                b = collate_packed(seqs[i : i + micro_batch_size])
                batches.append((b.tokens, b.position_ids,
                                b.attention_mask if self.document_mask else None))
            out[domain] = batches
        return out


def steps_for(cfg_steps: int | None, epochs: float, num_sequences: int, global_batch_size: int) -> int:
    if cfg_steps is not None:
        return cfg_steps
    return max(1, math.ceil(epochs * num_sequences / global_batch_size))


class IndexedTrainingData:
    """The same interface as :class:`TrainingData` over indexed datasets (``format: indexed``),
    sampled through megatron's BlendedMegatronDatasetBuilder (megatron_bar.data.blended):
    sample ``g`` of the run is a function of the seed and ``g``, so ``microbatches(step)``
    needs no history and resumes exactly."""

    def __init__(self, samples, document_mask: bool):
        self.samples = samples
        self.document_mask = document_mask
        self.mixture_report = samples.report
        self.seed = samples.seed

    def __len__(self) -> int:
        return len(self.samples)

    def _microbatch(self, items: list[dict]) -> Microbatch:
        b = stack_samples(items)
        return Microbatch(
            tokens=b["tokens"],
            labels=b["labels"],
            loss_mask=b["loss_mask"],
            position_ids=b["position_ids"],
            attention_mask=document_attention_mask(b["document_ids"]).unsqueeze(1) if self.document_mask else None,
        )

    def microbatches(
        self, step: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[Microbatch]:
        """This data-parallel rank's microbatches of optimizer step ``step``."""
        per_rank = global_batch_size // dp_size
        first = step * global_batch_size + dp_rank * per_rank
        items = [self.samples.sample(first + i)[0] for i in range(per_rank)]
        return [self._microbatch(items[i : i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]

    def domain_batches(self, per_domain: int, micro_batch_size: int) -> dict[str, list]:
        """Up to ``per_domain`` samples of each domain (first mixture epoch, in order), as
        (tokens, position_ids, mask) batches, for router statistics and initialisation."""
        chosen: dict[str, list[dict]] = {}
        for g in range(len(self.samples)):
            item, source = self.samples.sample(g)
            picked = chosen.setdefault(self.samples.domain_of(source), [])
            if len(picked) < per_domain:
                picked.append(item)
            if len(chosen) == len({s.spec.domain for s in self.samples.active}) and all(
                len(v) >= per_domain for v in chosen.values()
            ):
                break
        out = {}
        for domain, items in chosen.items():
            out[domain] = []
            for i in range(0, len(items), micro_batch_size):
                mb = self._microbatch(items[i : i + micro_batch_size])
                out[domain].append((mb.tokens, mb.position_ids, mb.attention_mask))
        return out


def build_indexed_training_data(data: DataConfig, tokenizer: Tokenizer, seed: int) -> IndexedTrainingData:
    """Indexed datasets: opened and checked against the model's tokenizer (fingerprint, ids
    within its vocabulary), then blended by weight; ``sample_fraction`` is drawn per domain."""
    specs = [
        SourceSpec(prefix=str(d.path), weight=d.weight, domain=d.domain or Path(d.path).name, kind=d.kind)
        for d in data.datasets
    ]
    samples = BlendedSamples(
        specs, tokenizer, data.seq_length, seed, sample_fraction=data.sample_fraction, cache_dir=data.index_cache
    )
    return IndexedTrainingData(samples, data.document_mask)


def build_training_data(data: DataConfig, tokenizer: Tokenizer, seed: int,
                        progress: bool = False) -> TrainingData | IndexedTrainingData:
    """``progress``: a progress bar per dataset while it is tokenized (rank 0's)."""
    if any(d.format == "indexed" for d in data.datasets):
        return build_indexed_training_data(data, tokenizer, seed)
    template = None
    packed: dict[str, list[PackedSequence]] = {}
    weights: dict[str, float] = {}
    summaries = []
    for spec in data.datasets:
        path = Path(spec.path)
        name = spec.domain or path.stem
        if name in packed:
            name = f"{name}:{path.name}"
        result = read_jsonl(path, spec.kind, max_bad_lines=data.max_bad_lines)
        records = result.records
        domain = spec.domain or path.stem
        if data.sample_fraction < 1:
            records = _stratified(records, data.sample_fraction, seed, domain)
        bar = tqdm(records, desc=f"tokenizing {path.name}", unit=" records", disable=not progress,
                   mininterval=1.0, leave=False)
        if spec.kind == "chat":
            template = template or ChatTemplate(tokenizer)
            docs = [template.encode(r) for r in bar]
        else:
            docs = [encode_text(r, tokenizer) for r in bar]
        sequences, stats = pack_documents(docs, data.seq_length, tokenizer.pad_id)
        if not sequences:
            raise ValueError(f"{path}: no usable records after reading and packing")
        packed[name], weights[name] = sequences, spec.weight
        summaries.append(_summary(name, domain, result, sequences, stats))
        if stats.num_truncated:
            log.warning("%s: %d documents longer than %d tokens were truncated",
                        path, stats.num_truncated, data.seq_length + 1)
    mixture = mix_datasets(packed, weights, seed)
    return TrainingData(
        sequences=mixture.samples,
        sources=mixture.sources,
        summaries=summaries,
        mixture_report=mixture.report(),
        seed=seed,
        document_mask=data.document_mask,
    )


def _stratified(records, fraction: float, seed: int, default_domain: str):
    """A fixed-seed ``fraction`` of each domain (the record's own tag, else the dataset's)."""
    tagged = [{"domain": r.domain or default_domain, "record": r} for r in records]
    return [t["record"] for t in stratified_sample(tagged, fraction, seed, key="domain")]


def _summary(name, domain, result, sequences, stats: PackingStats) -> DatasetSummary:
    return DatasetSummary(
        name=name,
        domain=domain,
        records=len(result.records),
        bad_lines=result.num_bad_lines,
        sequences=len(sequences),
        truncated=stats.num_truncated,
        loss_tokens=stats.num_loss_tokens,
    )
