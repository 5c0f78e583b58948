"""The one base class for errors raised on purpose for the user to fix."""

from __future__ import annotations


class UserError(RuntimeError):
    """A failure the user can fix (a timeout, a setting, the environment) that is not a
    ValueError / OSError / KeyError. The command-line tools print it as one ``error:`` line;
    any other RuntimeError (an out-of-memory, an NCCL failure, a bug) keeps its traceback."""
