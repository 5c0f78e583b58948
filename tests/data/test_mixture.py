from collections import Counter

import pytest

from megatron_bar.data.chat import ChatRecord, Message
from megatron_bar.data.mixture import mix_datasets, stratified_sample

MATH = [f"math-{i}" for i in range(1000)]
GENERAL = [f"general-{i}" for i in range(300)]


def test_mixture_proportions_match_weights():
    result = mix_datasets({"math": MATH, "general": GENERAL}, {"math": 0.5, "general": 0.5}, seed=0, num_samples=801)
    n = len(result.samples)
    assert n == 801
    counts = Counter(s.split("-")[0] for s in result.samples)  # recount from the samples themselves
    assert dict(counts) == result.counts
    for name, w in (("math", 0.5), ("general", 0.5)):
        assert abs(counts[name] / n - w) < 1 / n
        assert result.realised_proportions[name] == counts[name] / n
    assert result.sources == [s.split("-")[0] for s in result.samples]
    # Interleaved, not one block after another: every prefix stays close to 50/50.
    running = 0
    for i, src in enumerate(result.sources, start=1):
        running += src == "math"
        assert abs(running - i / 2) <= 1
    assert "realised" in result.report()


def test_unequal_weights_and_unnormalized():
    third = [f"c-{i}" for i in range(50)]
    result = mix_datasets({"a": MATH, "b": GENERAL, "c": third}, {"a": 7, "b": 2, "c": 1}, seed=3, num_samples=1000)
    assert result.counts == {"a": 700, "b": 200, "c": 100}
    assert result.target_proportions == pytest.approx({"a": 0.7, "b": 0.2, "c": 0.1})
    assert result.epochs["c"] == 2.0


def test_upsampling_repeats_whole_passes():
    result = mix_datasets({"math": MATH, "general": GENERAL}, {"math": 0.5, "general": 0.5}, seed=1, num_samples=800)
    general = Counter(s for s in result.samples if s.startswith("general"))
    assert len(general) == 300  # every item drawn once before any is drawn twice
    assert sorted(set(general.values())) == [1, 2] and sum(general.values()) == 400
    math_items = [s for s in result.samples if s.startswith("math")]
    assert len(set(math_items)) == len(math_items) == 400  # no repeats when not needed


def test_mixture_is_deterministic_per_seed():
    args = ({"math": MATH, "general": GENERAL}, {"math": 0.5, "general": 0.5})
    a = mix_datasets(*args, seed=7, num_samples=500)
    b = mix_datasets(*args, seed=7, num_samples=500)
    c = mix_datasets(*args, seed=8, num_samples=500)
    assert a.samples == b.samples
    assert c.samples != a.samples
    assert c.counts == a.counts  # the seed changes which items, not how many


def test_default_size_repeats_nothing():
    result = mix_datasets({"math": MATH, "general": GENERAL}, {"math": 0.5, "general": 0.5}, seed=0)
    assert result.counts == {"math": 300, "general": 300}
    assert len(set(result.samples)) == 600


def test_zero_weight_source_is_left_out():
    result = mix_datasets({"math": MATH, "general": GENERAL}, {"math": 1.0, "general": 0.0}, seed=0, num_samples=10)
    assert result.counts == {"math": 10}


@pytest.mark.parametrize(
    "datasets, weights",
    [
        ({"a": [1]}, {"b": 1.0}),
        ({"a": [1]}, {"a": -1.0}),
        ({"a": [1]}, {"a": 0.0}),
        ({"a": [], "b": [1]}, {"a": 1.0, "b": 1.0}),
    ],
)
def test_mixture_rejects_bad_input(datasets, weights):
    with pytest.raises(ValueError):
        mix_datasets(datasets, weights, seed=0, num_samples=5)


# --------------------------------------------------------------------------- stratified sampling

SIZES = {"math": 1000, "code": 437, "tool_use": 20, "safety": 3}


def _records():
    records = []
    for i in range(max(SIZES.values())):
        for domain, n in SIZES.items():  # interleaved domains
            if i < n:
                records.append(ChatRecord((Message("user", f"{domain} {i}"), Message("assistant", "a")), domain))
    return records


def test_stratified_sample_takes_each_domains_share():
    records = _records()
    sample = stratified_sample(records, fraction=0.05, seed=0)
    got = Counter(r.domain for r in sample)
    for domain, n in SIZES.items():
        assert got[domain] >= 1
        assert got[domain] == 1 or abs(got[domain] - 0.05 * n) <= 0.5
    assert dict(got) == {"math": 50, "code": 22, "tool_use": 1, "safety": 1}
    # A subset, in input order, without duplicates.
    positions = [records.index(r) for r in sample]
    assert positions == sorted(set(positions))


def test_stratified_sample_is_deterministic_per_seed():
    records = _records()
    a = stratified_sample(records, 0.05, seed=0)
    assert stratified_sample(records, 0.05, seed=0) == a
    assert stratified_sample(records, 0.05, seed=1) != a


def test_stratified_sample_on_dicts_and_missing_key():
    records = [{"domain": "x", "i": i} for i in range(10)] + [{"i": 100 + i} for i in range(10)]
    sample = stratified_sample(records, 0.5, seed=0)
    assert Counter(r.get("domain") for r in sample) == {"x": 5, None: 5}
    other_key = [{"source": "s", "i": i} for i in range(4)]
    assert len(stratified_sample(other_key, 0.5, seed=0, key="source")) == 2
    with pytest.raises(ValueError):
        stratified_sample(records, 0.0, seed=0)
    assert len(stratified_sample(records, 1.0, seed=0)) == 20
