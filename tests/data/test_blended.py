"""Indexed datasets in training, through megatron's BlendedMegatronDatasetBuilder: samples
carry what the on-the-fly path trains on, the mixture is a function of the seed and the
sample position (so a resumed run sees the uninterrupted run's samples, at any
data-parallel size), the router sample is drawn per domain, and a real run resumes exactly."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy
import pytest
import torch

from megatron_bar.data import pack_documents, read_jsonl, tokenize_records
from megatron_bar.data.blended import BlendedSamples, MaskedGPTDataset, SourceSpec
from megatron_bar.data.chat import DataError
from megatron_bar.data.preprocess import PreprocessConfig, build_tokenizer, preprocess
from megatron_bar.model.config import ConfigError
from megatron_bar.train.config import DataConfig, DatasetConfig, load_config
from megatron_bar.train.data import IndexedTrainingData, build_training_data

from .test_preprocess import chat_records, text_records, write_jsonl

SEQ = 64


@pytest.fixture(scope="module")
def sources(tmp_path_factory, corpus, hf_tokenizer_dir):
    """Three chat datasets (two domains) and a text one, tokenized with the HF tokenizer."""
    d = tmp_path_factory.mktemp("blended")
    out = {}
    for name, records, mode in (
        ("math", chat_records(corpus, n=60, seed=11), "chat"),
        ("code", chat_records(corpus, n=25, seed=12), "chat"),
        ("code2", chat_records(corpus, n=15, seed=13), "chat"),
        ("text", text_records(corpus, n=40, seed=14), "text"),
    ):
        src = write_jsonl(d / f"{name}.jsonl", records)
        preprocess(PreprocessConfig([str(src)], str(d / name), str(hf_tokenizer_dir), mode, progress=False))
        out[name] = (d / name, src, mode)
    return out


def specs(sources, weights):
    domain = {"math": "math", "code": "code", "code2": "code"}
    return [SourceSpec(str(sources[n][0]), w, domain[n], "chat") for n, w in weights.items()]


@pytest.mark.parametrize("name", ["math", "text"])
def test_samples_hold_what_the_on_the_fly_path_trains(sources, hf_tokenizer_dir, name):
    """Unshuffled, the samples are consecutive windows of the document stream; tokens,
    labels and loss masks equal the on-the-fly tokenization of the same JSONL, and a
    document inside one window has exactly the labels and mask the JSONL packer gives it."""
    prefix, jsonl, mode = sources[name]
    tok = build_tokenizer(str(hf_tokenizer_dir), mode)
    SEQ = 256  # long enough for whole chat documents
    blend = BlendedSamples([SourceSpec(str(prefix), 1.0, name, mode)], tok, SEQ, seed=3)
    ds: MaskedGPTDataset = blend._block(0).datasets[0]
    ds.shuffle_index = numpy.arange(len(ds))  # consecutive windows

    docs = tokenize_records(read_jsonl(jsonl, mode).records, tok)  # the on-the-fly path
    order = [docs[int(i)] for i in ds.document_index]  # megatron's shuffled documents, all epochs
    stream = torch.tensor([t for d in order for t in d.tokens])
    # the mask of each position's label; 0 where the label opens the next document
    label_mask = torch.tensor([float(m) for d in order for m in d.loss_mask[1:] + [0]])
    starts = numpy.cumsum([0] + [len(d) for d in order])
    whole_docs_checked = 0
    for j in range(len(ds)):
        s, w = ds[j], slice(j * SEQ, (j + 1) * SEQ)
        assert torch.equal(s["tokens"], stream[w])
        assert torch.equal(s["labels"], stream[j * SEQ + 1 : (j + 1) * SEQ + 1])
        assert torch.equal(s["loss_mask"], label_mask[w])
        for k, d in enumerate(order):  # documents wholly inside this window
            a, b = starts[k] - j * SEQ, starts[k + 1] - j * SEQ
            if 0 <= a and b <= SEQ + 1 and len(d) > 1:
                packed = pack_documents([d], seq_length=len(d) - 1, pad_id=tok.pad_id)[0][0]
                assert torch.equal(s["labels"][a : b - 1], packed.labels)
                assert torch.equal(s["loss_mask"][a : b - 1], packed.loss_mask)
                assert torch.equal(s["position_ids"][a : b - 1], packed.position_ids)
                assert len(set(s["document_ids"][a : b - 1].tolist())) == 1
                whole_docs_checked += 1
    assert whole_docs_checked >= 10
    if mode == "chat":
        assert 0 < label_mask.mean() < 0.9


def test_mixture_is_a_function_of_seed_and_position(sources, hf_tokenizer_dir):
    tok = build_tokenizer(str(hf_tokenizer_dir), "chat")
    weights = {"math": 0.5, "code": 0.3, "code2": 0.2}
    data = IndexedTrainingData(BlendedSamples(specs(sources, weights), tok, SEQ, seed=7), document_mask=True)
    n, gbs = len(data), 6
    steps = (2 * n) // gbs + 2  # into the third mixture epoch
    run = [data.microbatches(s, gbs, 3, 0, 1) for s in range(steps)]

    # a fresh process resuming at step k (any k, across mixture epochs) sees the same batches
    for k in (1, n // gbs, steps - 1):
        resumed = IndexedTrainingData(BlendedSamples(specs(sources, weights), tok, SEQ, seed=7), document_mask=True)
        for s in range(k, steps):
            for a, b in zip(run[s], resumed.microbatches(s, gbs, 3, 0, 1)):
                for f in ("tokens", "labels", "loss_mask", "position_ids", "attention_mask"):
                    assert torch.equal(getattr(a, f), getattr(b, f)), (k, s, f)
    # two data-parallel ranks together see the single rank's global batch
    for s in (0, steps - 1):
        ranks = [mb.tokens for r in range(2) for mb in data.microbatches(s, gbs, 3, r, 2)]
        assert torch.equal(torch.cat(ranks), torch.cat([mb.tokens for mb in run[s]]))
    # each mixture epoch is its own megatron blend; another seed is another order
    assert not torch.equal(run[0][0].tokens, data.microbatches(n // gbs * 0 + n // gbs, gbs, 3, 0, 1)[0].tokens)
    other = IndexedTrainingData(BlendedSamples(specs(sources, weights), tok, SEQ, seed=8), document_mask=True)
    assert not torch.equal(run[0][0].tokens, other.microbatches(0, gbs, 3, 0, 1)[0].tokens)

    # the realised mixture: within one sample of the target per source, and reported
    blend = data.samples
    counts = numpy.bincount(numpy.asarray(blend._block(0).dataset_index[: blend.epoch_size]), minlength=3)
    for c, w in zip(counts, blend.weights):
        assert abs(c - w * n) <= 1
    assert blend.realised == {"math": int(counts[0]), "code": int(counts[1] + counts[2])}
    assert "realised 0.5" in data.mixture_report and "target 0.3000" in data.mixture_report
    # no source repeats within a mixture epoch, and the tightest one is nearly used up
    use = [c / s.samples_per_epoch for c, s in zip(counts, blend.active)]
    assert max(use) <= 1.0 and max(use) > 0.95


def test_router_sample_is_drawn_per_domain(sources, hf_tokenizer_dir):
    tok = build_tokenizer(str(hf_tokenizer_dir), "chat")
    weights = {"math": 0.5, "code": 0.5}
    full = BlendedSamples(specs(sources, weights), tok, SEQ, seed=5)
    part = BlendedSamples(specs(sources, weights), tok, SEQ, seed=5, sample_fraction=0.25)
    assert [s.documents for s in part.sources] == [15, 6]  # round(0.25 * 60), round(0.25 * 25)
    again = BlendedSamples(specs(sources, weights), tok, SEQ, seed=5, sample_fraction=0.25)
    for ds_a, ds_b, ds_full in zip(part._block(0).datasets, again._block(0).datasets, full._block(0).datasets):
        chosen = set(ds_a.indices.tolist())
        assert chosen == set(ds_b.indices.tolist()) and len(chosen) < len(ds_full.indices)
        assert set(int(i) for i in ds_a.document_index) == chosen  # samples come from the chosen documents only
    data = IndexedTrainingData(part, document_mask=True)
    batches = data.domain_batches(per_domain=3, micro_batch_size=2)
    assert sorted(batches) == ["code", "math"]
    assert [sum(b[0].shape[0] for b in batches[d]) for d in ("code", "math")] == [3, 3]


def test_config_and_dataset_errors(sources, hf_tokenizer_dir, tmp_path):
    tok = build_tokenizer(str(hf_tokenizer_dir), "chat")
    math = str(sources["math"][0])
    with pytest.raises(DataError, match=r"a text dataset, used as chat"):
        build_training_data(DataConfig([DatasetConfig(str(sources["text"][0]), "chat", format="indexed")]), tok, 0)
    with pytest.raises(DataError, match="fewer than one sample"):
        build_training_data(DataConfig([DatasetConfig(math, "chat", format="indexed")], seq_length=10**6), tok, 0)
    with pytest.raises(DataError, match="no dataset summary"):
        build_training_data(DataConfig([DatasetConfig(str(tmp_path / "nothing"), "chat", format="indexed")]), tok, 0)
    config = tmp_path / "c.yaml"
    config.write_text("model: {load: x}\ndata:\n  datasets:\n"
                      f"    - {{path: {math}, format: indexed}}\n    - {{path: {sources['math'][1]}}}\n")
    with pytest.raises(ConfigError, match="mixes jsonl and indexed"):
        load_config(config)
    # a token beyond the model's vocabulary met while sampling names the dataset
    blend = BlendedSamples([SourceSpec(math, 1.0, "math", "chat")], tok, SEQ, seed=0)
    ds = blend._block(0).datasets[0]
    ds.config.tokenizer.vocab_size = 300
    with pytest.raises(DataError, match=rf"dataset {math}: token id \d+ is beyond the model's vocabulary of 300"):
        for i in range(len(ds)):
            ds[i]


# -- one real training run, resumed ---------------------------------------------------------


def test_train_resume_from_checkpoint_sees_the_same_samples(tmp_path, tiny_base, toy_data):
    """Uninterrupted run of 4 steps vs a run resumed from its step-2 checkpoint: with the
    same samples the final weights are bit-identical (one OpenMP thread: deterministic)."""
    import megatron_bar
    from megatron_bar.train.trainer import train

    tokenizer = str(tiny_base["bar2"] / "tokenizer")
    special = ["<tool_call>", "</tool_call>"]
    datasets = []
    for name in ("tool_use", "general"):
        preprocess(PreprocessConfig([str(toy_data[name])], str(tmp_path / name), tokenizer, "chat",
                                    add_special_tokens=special, progress=False))
        datasets.append({"path": str(tmp_path / name), "kind": "chat", "format": "indexed",
                         "weight": 0.5, "domain": name})

    cache = tmp_path / "index_cache"  # megatron's index cache: written by the first run, read by the second

    def config(out):
        # sample_fraction 0.5: ~40 samples a mixture epoch, so 4 steps of 8 cross into the second
        return load_config(Path(__file__).resolve().parents[2] / "examples/configs/tiny/sft_tool_use.yaml", [
            f"model.load={tiny_base['bar2']}", f"data.datasets={json.dumps(datasets)}", "data.sample_fraction=0.5",
            "optim.schedule=constant", "optim.warmup_steps=0", "train.steps=4", f"train.output_dir={out}",
            "checkpoint.interval=2", "checkpoint.keep_last=3", "train.log_interval=100", "router.stats=false",
            f"data.index_cache={cache}",
        ])

    cfg = config(tmp_path / "full")
    data = build_training_data(replace(cfg.data, index_cache=None), build_tokenizer(tokenizer, "chat", special),
                               cfg.train.seed)
    assert len(data) < 4 * 8 < 2 * len(data)  # the 4 steps cross a mixture epoch

    torch.set_num_threads(1)
    full = train(cfg)
    cached = sorted(p.name for p in cache.iterdir())
    assert any(n.endswith("MaskedGPTDataset-train-shuffle_index.npy") for n in cached)
    assert any(n.endswith("BlendedDataset-train-dataset_index.npy") for n in cached)
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "full/checkpoints/iter_0000002", resumed_dir / "iter_0000002")
    (resumed_dir / "latest").write_text("iter_0000002")
    resumed = train(config(tmp_path / "resumed"))
    assert len(full.losses) == 4 and resumed.losses == full.losses[2:]
    a = megatron_bar.load_model(full.final_checkpoint).gpt.state_dict()
    b = megatron_bar.load_model(resumed.final_checkpoint).gpt.state_dict()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
