"""Mixing datasets by weight, and per-domain stratified sampling.

Both are pure functions of their inputs and the seed. Random streams are
seeded from strings such as ``"1234/math"`` (Python seeds string seeds through
SHA-512, so they do not depend on ``PYTHONHASHSEED``), giving every source or
domain its own stream: adding a domain does not change what is drawn from
the others.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Hashable, Sequence, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class MixtureResult(Generic[T]):
    """The mixed samples and what the mixture turned out to be."""

    samples: list[T]
    sources: list[str]  # the source name of each sample
    counts: dict[str, int]
    target_proportions: dict[str, float]  # the weights, normalized
    realised_proportions: dict[str, float]
    epochs: dict[str, float]  # counts / source size; > 1 means the source was repeated

    def report(self) -> str:
        lines = [f"mixture of {len(self.samples)} samples:"]
        for name in self.counts:
            lines.append(
                f"  {name}: {self.counts[name]} samples, realised {self.realised_proportions[name]:.4f} "
                f"(target {self.target_proportions[name]:.4f}), {self.epochs[name]:.2f} epochs"
            )
        return "\n".join(lines)


def _epoch_stream(items: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """``count`` items: successive shuffled passes over ``items`` (no repeat within a pass)."""
    out: list[T] = []
    while len(out) < count:
        order = list(range(len(items)))
        rng.shuffle(order)
        out.extend(items[i] for i in order[: count - len(out)])
    return out


def mix_datasets(
    datasets: Mapping[str, Sequence[T]],
    weights: Mapping[str, float],
    seed: int,
    num_samples: int | None = None,
) -> MixtureResult[T]:
    """Draw ``num_samples`` items from ``datasets`` in proportion to ``weights``.

    e.g. ``mix_datasets({"math": math_sft, "general": tulu}, {"math": 0.5, "general": 0.5}, seed=0)``.

    * Which source each position draws from is decided like Megatron's
      ``BlendedDataset``: position ``i`` goes to the source whose count lags its
      target ``weight * (i + 1)`` the most (ties to the first source). This is
      deterministic and keeps every prefix of the stream within one sample per
      source of the target mix, so the realised proportions differ from the
      weights by less than ``1 / num_samples``.
    * Within a source, items come in a seeded shuffled order, one full pass
      before any repeat (upsampling a small source repeats it whole).
    * ``num_samples=None`` takes the largest mixture that repeats no source:
      ``min(len(source) / weight)``.

    Weights need not sum to 1; a weight of 0 leaves a source out.
    """
    if set(datasets) != set(weights):
        raise ValueError(f"datasets {sorted(datasets)} and weights {sorted(weights)} name different sources")
    if any(w < 0 or not math.isfinite(w) for w in weights.values()):
        raise ValueError(f"weights must be finite and >= 0, got {dict(weights)}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("at least one weight must be > 0")
    names = [n for n in datasets if weights[n] > 0]
    target = {n: weights[n] / total for n in names}
    for n in names:
        if len(datasets[n]) == 0:
            raise ValueError(f"source {n!r} is empty but has weight {weights[n]}")
    if num_samples is None:
        num_samples = min(math.floor(len(datasets[n]) / target[n] + 1e-9) for n in names)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")

    shares = [target[n] for n in names]
    drawn = [0] * len(names)
    sources: list[str] = []
    for i in range(num_samples):
        k = max(range(len(names)), key=lambda j: (shares[j] * (i + 1) - drawn[j], -j))
        drawn[k] += 1
        sources.append(names[k])
    counts = dict(zip(names, drawn))

    streams = {n: iter(_epoch_stream(datasets[n], counts[n], random.Random(f"{seed}/{n}"))) for n in names}
    samples = [next(streams[name]) for name in sources]
    result = MixtureResult(
        samples=samples,
        sources=sources,
        counts=counts,
        target_proportions=target,
        realised_proportions={n: (counts[n] / num_samples if num_samples else 0.0) for n in names},
        epochs={n: counts[n] / len(datasets[n]) for n in names},
    )
    logger.debug("%s", result.report())  # the trainer prints it, once
    return result


def _key_of(record: Any, key: str) -> Hashable:
    if isinstance(record, Mapping):
        return record.get(key)
    return getattr(record, key, None)


def stratified_sample(records: Sequence[T], fraction: float, seed: int, key: str = "domain") -> list[T]:
    """Take ``fraction`` of the records of each domain (at least one per domain).

    Records are grouped by ``record[key]`` (mappings) or ``record.key``
    (objects); a missing key is its own group (``None``). Each group of ``n``
    gives ``max(1, floor(fraction * n + 0.5))`` records (capped at ``n``),
    chosen by a stream seeded with the seed and the group, so the result is
    the same for the same seed. The chosen records are returned in input order.
    The router stage uses ``fraction=0.05``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    groups: dict[Hashable, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(_key_of(record, key), []).append(i)
    chosen: list[int] = []
    for group, indices in groups.items():
        take = min(len(indices), max(1, math.floor(fraction * len(indices) + 0.5)))
        chosen.extend(random.Random(f"{seed}/{group!r}").sample(indices, take))
    return [records[i] for i in sorted(chosen)]
