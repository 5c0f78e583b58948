"""tools/preprocess_data.py: the indexed dataset holds exactly what the on-the-fly path
tokenizes, whatever the input format and number of workers; bad input is a clear error
and leaves nothing at the output prefix."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_bar.data import DataError, read_jsonl, tokenize_records
from megatron_bar.data.indexed import open_indexed
from megatron_bar.data.preprocess import PreprocessConfig, build_tokenizer, preprocess

REPO = Path(__file__).resolve().parents[2]


def text_records(corpus, n=120, seed=0):
    rng = random.Random(seed)
    return [{"text": " ".join(rng.sample(corpus, rng.randint(1, 6))), "domain": "math"} for _ in range(n)]


def chat_records(corpus, n=120, seed=1):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": rng.choice(corpus)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):  # multi-turn: several masked assistant spans
            messages.append({"role": "user", "content": rng.choice(corpus)})
            messages.append({"role": "assistant", "content": " ".join(rng.sample(corpus, rng.randint(1, 3)))})
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(inputs, prefix, tokenizer, mode, **kw):
    return preprocess(PreprocessConfig([str(i) for i in inputs], str(prefix), str(tokenizer), mode, progress=False, **kw))


def left_at(prefix: Path) -> list[str]:
    """Everything preprocessing may have left for this prefix (data, summary, temp folder)."""
    return sorted(p.name for p in prefix.parent.iterdir() if prefix.name in p.name)


@pytest.fixture(params=["spm", "hf"])
def tokenizer_path(request, spm_model_path, hf_tokenizer_dir):
    return spm_model_path if request.param == "spm" else hf_tokenizer_dir


@pytest.mark.parametrize("mode", ["text", "chat"])
def test_same_documents_as_on_the_fly(tmp_path, corpus, tokenizer_path, mode):
    records = text_records(corpus) if mode == "text" else chat_records(corpus)
    src = write_jsonl(tmp_path / "in.jsonl", records)
    result = run([src], tmp_path / "out", tokenizer_path, mode)

    tok = build_tokenizer(str(tokenizer_path), mode)
    reference = tokenize_records(read_jsonl(src, mode).records, tok)  # what training does on the fly
    dataset = open_indexed(tmp_path / "out", tok, mode=mode, verify_checksums=True)
    got = list(dataset.documents())
    assert [d.tokens for d in got] == [d.tokens for d in reference]
    assert [d.loss_mask for d in got] == [d.loss_mask for d in reference]
    if mode == "chat":
        assert 0 < result.summary.loss_tokens < result.summary.tokens
    s = result.summary
    assert (s.documents, s.tokens, s.skipped_lines) == (len(records), sum(map(len, reference)), 0)
    assert s.tokenizer_fingerprint == tok.fingerprint()


def test_formats_and_workers_give_identical_datasets(tmp_path, corpus, hf_tokenizer_dir):
    """JSONL (1 or 2 workers, many tasks), JSONL.gz, Parquet and HF save_to_disk inputs of the
    same records give byte-identical files: shards are joined in input order."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = chat_records(corpus, n=300)
    src = write_jsonl(tmp_path / "in.jsonl", records)
    with gzip.open(tmp_path / "in.jsonl.gz", "wt") as f:
        f.write(src.read_text())
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in.parquet", row_group_size=70)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "in_hf"))

    runs = {
        "jsonl": run([src], tmp_path / "a", hf_tokenizer_dir, "chat"),
        "jsonl_2_workers": run([src], tmp_path / "b", hf_tokenizer_dir, "chat", workers=2, task_bytes=4096),
        "gz_2_workers": run([tmp_path / "in.jsonl.gz"], tmp_path / "c", hf_tokenizer_dir, "chat", workers=2),
        "parquet": run([tmp_path / "in.parquet"], tmp_path / "d", hf_tokenizer_dir, "chat", workers=2),
        "hf": run([tmp_path / "in_hf"], tmp_path / "e", hf_tokenizer_dir, "chat"),
    }
    hashes = {name: [f["sha256"] for f in r.summary.files.values()] for name, r in runs.items()}
    assert len(hashes["jsonl"]) == 4  # tokens and loss mask, .bin and .idx each
    for name, h in hashes.items():
        assert h == hashes["jsonl"], name
    # two inputs: the documents of both, in order
    both = run([src, tmp_path / "in.parquet"], tmp_path / "f", hf_tokenizer_dir, "chat", workers=2)
    assert both.summary.documents == 2 * len(records)


def test_malformed_lines_are_counted_with_file_and_line(tmp_path, corpus, spm_model_path):
    good = [json.dumps(r) for r in text_records(corpus, n=10)]
    lines = good[:3] + ["{not json"] + good[3:6] + ["", '{"txt": "no text key"}'] + good[6:]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    result = run([src], tmp_path / "ok", spm_model_path, "text", max_bad_lines=2)
    s = result.summary
    assert (s.documents, s.skipped_lines) == (10, 2)
    assert s.skipped_by_reason == {"invalid JSON": 1, "missing key 'text'": 1}
    assert [(e["file"], e["line"]) for e in s.skipped_examples] == [(str(src), 4), (str(src), 9)]

    with pytest.raises(DataError, match=rf"{src}:4: malformed text record \(invalid JSON.*2 malformed lines exceed max_bad_lines=1"):
        run([src], tmp_path / "strict", spm_model_path, "text", max_bad_lines=1, workers=2)
    assert left_at(tmp_path / "strict") == []


def test_empty_input_is_an_error(tmp_path, spm_model_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no documents in .*empty.jsonl.*empty input"):
        run([empty], tmp_path / "out", spm_model_path, "text")
    assert left_at(tmp_path / "out") == []
    with pytest.raises(DataError, match="input not found"):
        run([tmp_path / "missing.jsonl"], tmp_path / "out", spm_model_path, "text")
    with pytest.raises(DataError, match="cannot tell the format"):
        run([spm_model_path], tmp_path / "out", spm_model_path, "text")


def _die(task):  # a tokenizer worker killed (the OOM killer): the process just ends
    import os

    os._exit(137)


def test_a_dead_worker_is_an_error_not_a_hang(tmp_path, corpus, spm_model_path, monkeypatch):
    import megatron_bar.data.preprocess as pre

    src = write_jsonl(tmp_path / "in.jsonl", text_records(corpus, n=40))
    monkeypatch.setattr(pre, "_run_task", _die)  # the forked workers inherit it
    with pytest.raises(DataError, match="worker process died"):
        run([src], tmp_path / "out", spm_model_path, "text", workers=2)
    assert left_at(tmp_path / "out") == []


@pytest.fixture
def dataset(tmp_path, corpus, hf_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", chat_records(corpus, n=40))
    run([src], tmp_path / "ds", hf_tokenizer_dir, "chat")
    return tmp_path / "ds"


def _damage(path: Path, how: str):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) - 7])
    else:  # same size, other bytes
        data[3] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "file, how, message",
    [
        ("ds.bin", "truncate", r"ds\.bin: \d+ bytes, the summary says"),
        ("ds.idx", "truncate", r"ds\.idx: \d+ bytes, the summary says"),
        ("ds.loss_mask.bin", "truncate", r"ds\.loss_mask\.bin: \d+ bytes"),
        ("ds.idx", "flip", r"ds\.idx: corrupt or truncated index"),
        ("ds.summary.json", "flip", r"ds\.summary\.json: unreadable dataset summary"),
    ],
)
def test_corrupt_or_truncated_files(dataset, hf_tokenizer_dir, file, how, message):
    tok = build_tokenizer(str(hf_tokenizer_dir), "chat")
    open_indexed(dataset, tok, verify_checksums=True)
    _damage(dataset.parent / file, how)
    with pytest.raises(DataError, match=message):
        open_indexed(dataset, tok)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file", ["ds.bin", "ds.loss_mask.bin", "ds.idx"])
def test_bit_flip_of_a_small_dataset_is_caught_at_start(dataset, hf_tokenizer_dir, file):
    """Issue 27, item 7: one flipped bit, same size, index still consistent. A .bin of one
    chunk is hashed whole at start; an .idx always is."""
    tok = build_tokenizer(str(hf_tokenizer_dir), "chat")
    path = dataset.parent / file
    if file == "ds.idx":  # a byte of the second document's pointer, which no structure check reads
        sequences = int.from_bytes(path.read_bytes()[18:26], "little")
        _flip(path, 34 + 4 * sequences + 8 + 5)
    else:
        _flip(path, path.stat().st_size - 3)
    with pytest.raises(DataError, match=rf"{path}: .*(differ from the hash|sha256 differs)"):
        open_indexed(dataset, tok)


def test_bit_flip_in_a_large_bin_sampled_at_start_checked_in_full_by_verify(
        tmp_path, corpus, hf_tokenizer_dir, monkeypatch):
    """A .bin of many chunks: a start checks indexed.SAMPLE_CHUNKS of them (seeded), so a
    flip there is caught at start and one elsewhere only by the full check (--verify)."""
    from megatron_bar.data import indexed

    monkeypatch.setattr(indexed, "CHUNK_BYTES", 64)
    src = write_jsonl(tmp_path / "in.jsonl", chat_records(corpus, n=40))
    prefix = tmp_path / "ds"
    run([src], prefix, hf_tokenizer_dir, "chat")
    tok = build_tokenizer(str(hf_tokenizer_dir), "chat")
    bin_path = tmp_path / "ds.bin"
    chunks = bin_path.stat().st_size // 64
    assert chunks > 4 * indexed.SAMPLE_CHUNKS
    seed = 7
    sampled = indexed.sampled_chunks(chunks + 1, seed)  # ds.bin is data file 0: its seed is seed + 0
    unsampled = next(i for i in range(chunks) if i not in sampled)
    _flip(bin_path, unsampled * 64 + 5)
    open_indexed(prefix, tok, sample_seed=seed)  # not in the sample: passes at start
    with pytest.raises(DataError, match=rf"{bin_path}: sha256 differs"):
        open_indexed(prefix, tok, verify_checksums=True)
    _flip(bin_path, unsampled * 64 + 5)  # restored
    _flip(bin_path, sampled[1] * 64 + 5)
    with pytest.raises(DataError, match=rf"{bin_path}: bytes {sampled[1] * 64}-{sampled[1] * 64 + 64} differ"):
        open_indexed(prefix, tok, sample_seed=seed)


def test_bin_and_idx_that_disagree(dataset, hf_tokenizer_dir, tmp_path, corpus):
    """A .bin from another dataset with a summary that matches it: the index check catches it."""
    other = run([write_jsonl(tmp_path / "o.jsonl", chat_records(corpus, n=41, seed=9))], tmp_path / "o",
                hf_tokenizer_dir, "chat")
    shutil.copy(tmp_path / "o.bin", dataset.parent / "ds.bin")
    summary = json.loads((dataset.parent / "ds.summary.json").read_text())
    summary["files"]["ds.bin"] = other.summary.files["o.bin"]
    (dataset.parent / "ds.summary.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match=r"ds\.bin: \d+ bytes, its index describes \d+"):
        open_indexed(dataset)


def test_missing_summary_and_wrong_mode(dataset, hf_tokenizer_dir):
    with pytest.raises(DataError, match=r"a chat dataset, used as text"):
        open_indexed(dataset, mode="text")
    (dataset.parent / "ds.summary.json").unlink()
    with pytest.raises(DataError, match=r"no dataset summary .*interrupted preprocessing"):
        open_indexed(dataset)


def test_mismatched_tokenizer(tmp_path, corpus, spm_model_path, hf_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", chat_records(corpus, n=20))
    run([src], tmp_path / "spm", spm_model_path, "chat")
    # the Tulu role markers added as special tokens, written by the conversations as text
    markers = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
    run([src], tmp_path / "hf", hf_tokenizer_dir, "chat", add_special_tokens=markers)
    hf_chat = build_tokenizer(str(hf_tokenizer_dir), "chat", markers)
    with pytest.raises(DataError, match=r"dataset .*spm was tokenized with another tokenizer"):
        open_indexed(tmp_path / "spm", hf_chat)
    # the markers are ids 400..403 of the grown vocabulary: beyond the plain one
    hf_plain = build_tokenizer(str(hf_tokenizer_dir), "chat")
    with pytest.raises(DataError, match=r"dataset .*hf: token id 40\d is beyond .* vocabulary of 400"):
        open_indexed(tmp_path / "hf", hf_plain)
    # the same vocabulary size, another special token: the fingerprint tells them apart
    other = build_tokenizer(str(hf_tokenizer_dir), "text", ["<a>", "<b>", "<c>", "<d>"])
    assert other.vocab_size == hf_chat.vocab_size
    with pytest.raises(DataError, match="another tokenizer"):
        open_indexed(tmp_path / "hf", other)


def test_existing_output_is_kept_unless_overwrite(tmp_path, corpus, spm_model_path):
    src = write_jsonl(tmp_path / "in.jsonl", text_records(corpus, n=5))
    first = run([src], tmp_path / "out", spm_model_path, "text")
    with pytest.raises(FileExistsError, match="out.bin: output exists"):
        run([src], tmp_path / "out", spm_model_path, "text")
    src2 = write_jsonl(tmp_path / "in2.jsonl", text_records(corpus, n=7, seed=3))
    second = run([src2], tmp_path / "out", spm_model_path, "text", overwrite=True)
    assert (first.summary.documents, second.summary.documents) == (5, 7)
    assert open_indexed(tmp_path / "out").num_documents == 7


def test_cli(tmp_path, corpus, spm_model_path):
    src = write_jsonl(tmp_path / "in.jsonl", chat_records(corpus, n=30))
    (tmp_path / "bad.jsonl").write_text(src.read_text() + '{"messages": []}\n')
    tool = [sys.executable, str(REPO / "tools" / "preprocess_data.py")]
    common = ["--tokenizer", str(spm_model_path), "--mode", "chat", "--workers", "2"]
    ok = subprocess.run([*tool, "--input", str(src), "--output-prefix", str(tmp_path / "ok"), *common],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert (summary["documents"], summary["mode"]) == (30, "chat")
    assert "docs/s" in ok.stderr and "tokens/s" in ok.stderr  # the progress line

    bad = subprocess.run([*tool, "--input", str(tmp_path / "bad.jsonl"), "--output-prefix", str(tmp_path / "bad"), *common],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert f"error: {tmp_path / 'bad.jsonl'}:31: malformed chat record ('messages' must be a non-empty list)" in bad.stderr
    assert left_at(tmp_path / "bad") == ["bad.jsonl"]  # the input only
