"""``metrics.jsonl`` across a resume (issue 27, items 1-2): the history up to the resumed step
is kept, a torn last line (what a kill leaves in an append-only file) is dropped with a
warning, any other bad line is an error naming file and line, and the file is only ever
appended to or replaced through a temporary file and a rename."""

from __future__ import annotations

import json
import logging
import os

import pytest

from megatron_bar.train.metrics import MetricsLogger, check_metrics_file, read_metrics


def write_rows(path, steps, tail=""):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps) + tail)


def resume(tmp_path, start_step):
    logger = MetricsLogger(tmp_path, total_steps=10, start_step=start_step, tensorboard=False)
    for step in range(start_step + 1, start_step + 3):
        logger.log(step, {"loss": 0.5}, tokens=1, print_line=False)
    logger.close()
    return [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]


def test_resume_keeps_the_history_before_the_step_and_drops_what_came_after(tmp_path):
    write_rows(tmp_path / "metrics.jsonl", range(1, 6))
    assert resume(tmp_path, 3) == [1, 2, 3, 4, 5]
    assert read_metrics(tmp_path / "metrics.jsonl")[2]["loss"] == pytest.approx(1 / 3)  # kept as it was


def test_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, range(1, 5), tail=json.dumps({"step": 5, "loss": 0.2})[:-9])
    with caplog.at_level(logging.WARNING):
        assert resume(tmp_path, 4) == [1, 2, 3, 4, 5, 6]
    assert f"{path}:5: dropped a torn last line" in caplog.text


def test_torn_line_that_ends_with_a_newline_is_dropped_too(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, range(1, 4), tail='{"step": 4, "lo\n')
    with caplog.at_level(logging.WARNING):
        assert resume(tmp_path, 3) == [1, 2, 3, 4, 5]
    assert f"{path}:4: dropped a torn last line" in caplog.text


def test_bad_line_inside_the_file_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, range(1, 4))
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-5]
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=f"{path}:2: not a metrics record"):
        MetricsLogger(tmp_path, total_steps=10, start_step=3, tensorboard=False)
    # ... and the trainer finds it before the checkpoint loads
    with pytest.raises(ValueError, match=f"{path}:2: not a metrics record"):
        check_metrics_file(tmp_path)
    assert path.read_bytes() == before


def test_early_check_passes_a_torn_last_line_quietly(tmp_path, caplog):
    write_rows(tmp_path / "metrics.jsonl", range(1, 4), tail='{"step": 4')
    with caplog.at_level(logging.WARNING):
        check_metrics_file(tmp_path)
    assert caplog.text == ""  # the MetricsLogger that drops it says so, once


def test_missing_history_is_a_warning_naming_the_file(tmp_path, caplog):
    """An empty file at a resume from step 3: the lost steps are said, not silently accepted."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    with caplog.at_level(logging.WARNING):
        assert resume(tmp_path, 3) == [4, 5]
    assert f"{path}: holds no metrics for 3 of the steps 1-3" in caplog.text


def test_rewrite_goes_through_a_temporary_file_and_a_rename(tmp_path, monkeypatch):
    """A kill during the rewrite (here: the rename fails) leaves the old file whole."""
    path = tmp_path / "metrics.jsonl"
    write_rows(path, range(1, 6))
    before = path.read_bytes()

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLogger(tmp_path, total_steps=10, start_step=2, tensorboard=False)
    assert path.read_bytes() == before


def test_steps_are_appended(tmp_path, monkeypatch):
    """A resume with nothing to drop does not rewrite the file; new steps go at its end."""
    path = tmp_path / "metrics.jsonl"
    write_rows(path, range(1, 4))
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail("rewrote a file with nothing to drop"))
    assert resume(tmp_path, 3) == [1, 2, 3, 4, 5]
    assert path.read_bytes().startswith(before)
