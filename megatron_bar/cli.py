"""What every command-line tool shares: logging, and bad input as a one-line error."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from megatron_bar.utils.errors import UserError
from megatron_bar.utils.quiet import quiet_dependency_warnings

# Errors a user can fix (a path, a key, a file, a full disk, a timeout); anything else - a
# RuntimeError from torch such as an out-of-memory or an NCCL failure included - is not
# the user's to fix and keeps its traceback.
USER_ERRORS = (ValueError, OSError, KeyError, UserError)


def user_error(exc: BaseException) -> BaseException | None:
    """The user error ``exc`` is or wraps, or None. torch's ``CheckpointException`` (a
    BaseException) carries each rank's failure: a user error inside it is reported as such."""
    if isinstance(exc, USER_ERRORS):
        return exc
    # Imported by whoever raised it; this module does not import torch.
    api = sys.modules.get("torch.distributed.checkpoint.api")
    if api is not None and isinstance(exc, api.CheckpointException):
        for wrapped, _trace in exc.failures.values():
            if isinstance(wrapped, USER_ERRORS):
                return wrapped
    return None


def setup_logging() -> None:
    level = os.environ.get("MEGATRON_BAR_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # megatron-core and its dependencies announce optional kernels they did not find.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    quiet_dependency_warnings()
    for noisy in ("megatron.core", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(main) -> None:
    """Run ``main()``; a user error prints ``error: ...`` and exits 1."""
    setup_logging()
    try:
        main()
    except BaseException as e:  # CheckpointException derives from BaseException
        error = user_error(e)
        if error is None:
            raise
        msg = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)
    finally:
        from megatron_bar import platform

        try:
            platform.shutdown()
        except Exception:  # best-effort cleanup: the real error (if any) was already reported
            pass
