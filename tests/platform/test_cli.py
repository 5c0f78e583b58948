"""What the command-line tools report as a user error (one ``error:`` line, exit 1) and what
keeps its traceback (issue 26's small fixes, issue 27 item 3)."""

from __future__ import annotations

import errno

import pytest

from megatron_bar.cli import run, user_error
from megatron_bar.utils.errors import UserError


def test_which_errors_are_the_users():
    from torch.distributed.checkpoint.api import CheckpointException

    inner = OSError(errno.EIO, "Input/output error", "/ckpt/__0_0.distcp")
    assert user_error(CheckpointException("save failed", {0: (inner, None)})) is inner
    bug = CheckpointException("save failed", {0: (AttributeError("x"), None)})
    assert user_error(bug) is None
    # An out-of-memory or an NCCL failure is not the user's to fix: it keeps its traceback;
    # a RuntimeError raised on purpose for the user (a UserError) does not.
    assert user_error(RuntimeError("CUDA out of memory")) is None
    from megatron_bar.rl.fleet import RolloutError

    assert user_error(RolloutError("timed out after 600 s placing the rollout workers")) is not None


@pytest.fixture(autouse=True)
def _keep_the_process_group(monkeypatch):
    """run() shuts megatron and torch.distributed down at its end; other tests of this
    process may still use them."""
    import megatron_bar.platform

    monkeypatch.setattr(megatron_bar.platform, "shutdown", lambda: None)


def _raise(exc):
    def main():
        raise exc
    return main


def test_run_prints_a_user_error_and_exits_1(capsys):
    with pytest.raises(SystemExit) as e:
        run(_raise(UserError("rollout worker 1 did not come back")))
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: rollout worker 1 did not come back\n"


def test_run_keeps_the_traceback_of_other_runtime_errors():
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        run(_raise(RuntimeError("CUDA out of memory")))


def test_run_reports_a_checkpoint_exception_that_wraps_a_user_error(capsys):
    from torch.distributed.checkpoint.api import CheckpointException

    inner = OSError(errno.EIO, "Input/output error", "/ckpt/__0_0.distcp")
    with pytest.raises(SystemExit):
        run(_raise(CheckpointException("save failed", {0: (inner, None)})))
    assert capsys.readouterr().err == f"error: {inner}\n"
