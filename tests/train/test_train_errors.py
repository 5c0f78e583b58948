"""Bad input to the trainer: reported, not a crash.

A user error ends the run with exit code 1 and one line ``error: ...`` (the last line of
stderr) that names the file, key or line at fault, and no traceback. Tolerated problems
(malformed JSONL lines within ``data.max_bad_lines``, sequences longer than
``data.seq_length``) are warnings naming file:line and counts, and training goes on.

A trainer process costs ~6 s of torch / megatron imports, so the module fixture
``cli`` prepares a few representative cases (a training run with tolerated bad input, a
data error, a config error, a checkpoint error) and runs them through the real CLI
concurrently (one per core); the rest are checked in-process on the same code
(``load_config``, ``read_jsonl``, ``train``), which the CLI turns into the same
``error:`` line.
"""

from __future__ import annotations

import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_bar.data import read_jsonl
from megatron_bar.data.chat import DataError
from megatron_bar.train.config import ConfigError, load_config

# The malformed lines of ``bad_chat_file`` (line number -> what is wrong).
BAD_LINES = {
    2: ("invalid JSON", '{"messages": [{"role": "user", "content": "hi"},'),
    5: ("missing key 'messages'", json.dumps({"domain": "general", "conversation": []})),
    7: ("role 'robot'", json.dumps({"messages": [{"role": "robot", "content": "beep"},
                                                 {"role": "assistant", "content": "boop"}]})),
}
LONG_RECORDS = 2  # records far longer than the sequence length below
SEQ_LENGTH = 64


def bad_chat_file(path: Path, good_source: Path) -> Path:
    """Toy chat records with the malformed lines of BAD_LINES and LONG_RECORDS very long ones."""
    good = good_source.read_text().splitlines()[:40]
    long_answer = " ".join(["red blue green cat dog"] * 60)
    good[8:8] = [json.dumps({"messages": [{"role": "user", "content": "Copy it all"},
                                          {"role": "assistant", "content": long_answer}]})] * LONG_RECORDS
    lines = []
    for number in range(1, len(good) + len(BAD_LINES) + 1):
        lines.append(BAD_LINES[number][1] if number in BAD_LINES else good.pop(0))
    path.write_text("\n".join(lines) + "\n")
    return path


def base_config(tiny_base, dataset: Path, output_dir: Path, **data) -> dict:
    return {
        "model": {"load": str(tiny_base["bar2"])},
        "data": {"datasets": [{"path": str(dataset), "kind": "chat"}], "seq_length": SEQ_LENGTH, **data},
        "train": {"stage": "sft", "steps": 1, "global_batch_size": 2, "micro_batch_size": 2,
                  "output_dir": str(output_dir)},
        "checkpoint": {"interval": 100},
    }


def error_line(proc, why: str = "") -> str:
    """The run failed as a user error should; returns its one ``error:`` line."""
    why = why or f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 1, why
    assert "Traceback" not in proc.stderr, why
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], why
    assert "done:" not in proc.stdout, why
    return errors[0]


# -- through the CLI -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_base, toy_data, train_cli):
    root = tmp_path_factory.mktemp("train-errors")
    data = bad_chat_file(root / "chat_with_bad_lines.jsonl", toy_data["general"])
    good = train_cli.write_config(root / "good.yaml", base_config(tiny_base, toy_data["general"], root / "good"))
    cases = {}  # name -> (config, overrides, what the case needs to know)

    # malformed lines within the limit, and over-long records: warnings, and it trains
    cfg = train_cli.write_config(
        root / "tolerant.yaml", base_config(tiny_base, data, root / "tolerant", max_bad_lines=len(BAD_LINES))
    )
    cases["tolerated"] = (cfg, [], {"data": data})
    # one malformed line more than allowed
    cfg = train_cli.write_config(
        root / "strict.yaml", base_config(tiny_base, data, root / "strict", max_bad_lines=len(BAD_LINES) - 1)
    )
    cases["too_many_bad_lines"] = (cfg, [], {"data": data})
    cases["unknown_override"] = (good, ["train.stpes=3"], {})
    # resuming from a checkpoint folder whose `latest` holds another architecture
    out = root / "other-arch"
    ckpt = out / "checkpoints" / "iter_0000003"
    shutil.copytree(tiny_base["bar2"], ckpt)
    model_cfg = json.loads((ckpt / "model_config.json").read_text())
    model_cfg["hidden_size"] = 32
    (ckpt / "model_config.json").write_text(json.dumps(model_cfg))
    (ckpt / "train_state.json").write_text(json.dumps({"step": 3, "world_size": 1}))
    (out / "checkpoints" / "latest").write_text("iter_0000003\n")
    cases["other_architecture"] = (good, [f"train.output_dir={out}"], {"checkpoint": ckpt})

    order = list(cases)  # the training run first: it is the slowest
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = pool.map(lambda n: train_cli.run(cases[n][0], *cases[n][1], cwd=root, timeout=300), order)
        return {name: (proc, cases[name][2]) for name, proc in zip(order, procs)}


def test_bad_lines_within_limit_are_skipped_and_long_sequences_truncated(cli):
    proc, info = cli["tolerated"]
    path, log = info["data"], proc.stderr
    assert proc.returncode == 0, proc.stdout[-2000:] + log[-4000:]
    assert "done: 1 steps" in proc.stdout
    for number, (reason, _) in BAD_LINES.items():
        warning = [line for line in log.splitlines() if f"{path}:{number}: skipping malformed chat record" in line]
        assert len(warning) == 1 and reason in warning[0], log
    assert f"{path}: skipped {len(BAD_LINES)} malformed lines" in log, log
    assert f"{path}: {LONG_RECORDS} documents longer than {SEQ_LENGTH + 1} tokens were truncated" in log, log
    assert "Traceback" not in log and "error:" not in log


def test_bad_lines_over_limit_is_an_error_naming_file_and_line(cli):
    proc, info = cli["too_many_bad_lines"]
    line = error_line(proc)
    last = max(BAD_LINES)
    assert f"{info['data']}:{last}: malformed chat record" in line
    assert f"max_bad_lines={len(BAD_LINES) - 1}" in line and BAD_LINES[last][0] in line


def test_unknown_override_key_lists_valid_keys(cli):
    proc, _ = cli["unknown_override"]
    line = error_line(proc)
    assert "'stpes'" in line and "train.stpes" in line
    assert "valid keys: stage, steps, epochs, global_batch_size" in line


def test_resume_from_checkpoint_of_another_architecture(cli):
    proc, info = cli["other_architecture"]
    line = error_line(proc)
    assert str(info["checkpoint"]) in line and "another architecture" in line
    assert "hidden_size: model 64 vs checkpoint 32" in line


# -- in-process: the same validation, without a process each -------------------------------


def test_read_jsonl_skips_counts_and_names_lines(tmp_path, toy_data, caplog):
    path = bad_chat_file(tmp_path / "chat.jsonl", toy_data["general"])
    with caplog.at_level(logging.WARNING):
        result = read_jsonl(path, "chat", max_bad_lines=len(BAD_LINES))
    assert result.bad_line_numbers == sorted(BAD_LINES)
    assert len(result.records) == 40 + LONG_RECORDS
    for number, (reason, _) in BAD_LINES.items():
        assert any(f"{path}:{number}:" in m and reason in m for m in caplog.messages), caplog.messages
    assert f"{path}: skipped {len(BAD_LINES)} malformed lines" in caplog.messages

    for limit, failing in ((0, 2), (1, 5), (2, 7)):
        with pytest.raises(DataError) as e:
            read_jsonl(path, "chat", max_bad_lines=limit)
        assert (e.value.path, e.value.line_number) == (path, failing)
        assert f"{path}:{failing}:" in str(e.value) and f"max_bad_lines={limit}" in str(e.value)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GOOD_YAML = "model: {load: base}\ndata: {datasets: [{path: a.jsonl}]}\n"


@pytest.mark.parametrize(
    "yaml_text, overrides, names",
    [
        # an unknown key in the file, in each kind of place
        (GOOD_YAML + "optim: {lrr: 0.1}\n", [],
         ["optim: unknown key 'lrr'", "valid keys: lr, min_lr, schedule"]),
        (GOOD_YAML + "trian: {steps: 3}\n", [],
         ["config: unknown key 'trian'", "valid keys: model, data, parallel, optim, train, checkpoint"]),
        ("model: {load: base}\ndata: {datasets: [{pth: a.jsonl}]}\n", [],
         ["data.datasets[0]: unknown key 'pth'", "valid keys: path, kind, weight, domain"]),
        # ... and in an override
        (GOOD_YAML, ["train.stpes=3"], ["override 'train.stpes'", "valid keys: stage, steps"]),
        (GOOD_YAML, ["optimizer.lr=3"], ["unknown key 'optimizer'", "valid keys: model, data"]),
        # a value of the wrong type, an unknown stage, bad YAML
        (GOOD_YAML, ["train.steps=many"], ["train.steps", "expected int", "'many'"]),
        (GOOD_YAML, ["train.stage=bogus"], ["train.stage 'bogus'", "'midtrain'", "'router'", "'sft'"]),
        (GOOD_YAML, ["train.steps"], ["override 'train.steps'", "key=value"]),
        (GOOD_YAML, ["data.datasets=[{path: a"], ["override 'data.datasets=[{path: a'", "not valid YAML", "line 1"]),
        (GOOD_YAML + "train:\n  steps: [1,\n", [], ["config.yaml: not valid YAML", "line "]),
        # a per-group LR scale of a group that is not shared, or not a number
        (GOOD_YAML, ["optim.shared_lr_scale_by_group={embeddings: 0.1}"],
         ["optim.shared_lr_scale_by_group: 'embeddings' is not a shared group", "embedding, lm_head"]),
        (GOOD_YAML, ["optim.shared_lr_scale_by_group={embedding: fast}"],
         ["optim.shared_lr_scale_by_group.embedding", "expected a number", "'fast'"]),
    ],
    ids=["yaml_key", "yaml_section", "yaml_dataset_key", "override_key", "override_section",
         "wrong_type", "bogus_stage", "override_no_equals", "override_bad_yaml", "file_bad_yaml",
         "lr_scale_group", "lr_scale_value"],
)
def test_config_errors_name_the_key_in_one_line(tmp_path, yaml_text, overrides, names):
    path = _write(tmp_path / "config.yaml", yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    message = str(e.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, message


def test_config_file_not_found(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_missing_dataset_file_names_it(tmp_path, tiny_base):
    from megatron_bar.train.trainer import train

    missing = tmp_path / "no-such-data.jsonl"
    config = _write(tmp_path / "config.yaml", json.dumps(base_config(tiny_base, missing, tmp_path / "run")))
    with pytest.raises(FileNotFoundError, match=f"JSONL file not found: {missing}"):
        train(load_config(config))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_model_load_not_a_checkpoint(tmp_path, toy_data):
    from megatron_bar.train.trainer import train

    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a checkpoint\n")
    config = _write(tmp_path / "config.yaml", json.dumps(
        base_config({"bar2": folder}, toy_data["general"], tmp_path / "run")))
    with pytest.raises(ValueError) as e:
        train(load_config(config))
    message = str(e.value)
    assert str(folder / "model_config.json") in message and "checkpoint" in message, message


def test_checkpoint_on_a_full_disk(small_disk, tmp_path, tiny_base, toy_data, train_cli):
    """Issue 27, item 3: a checkpoint on a full disk (a 64 KiB tmpfs; skipped where mounting
    is not allowed) is one error line naming its path and the space it needs, not a
    ``[rank0]`` traceback of torch's CheckpointException; no half-written checkpoint."""
    from megatron_bar.utils.fs import incomplete_path

    out = small_disk / "run"
    cfg = base_config(tiny_base, toy_data["general"], out)
    cfg["checkpoint"]["interval"] = 1
    proc = train_cli.run(train_cli.write_config(tmp_path / "run.yaml", cfg), cwd=tmp_path)
    line = error_line(proc)
    ckpt = out / "checkpoints" / "iter_0000001"
    assert str(ckpt) in line and "needs about" in line and "free" in line, line
    assert not ckpt.exists() and not incomplete_path(ckpt).exists()
    assert not (out / "checkpoints" / "latest").exists()
