"""What every command-line tool shares: logging, and bad input as a one-line error."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from megatron_bar.utils.quiet import quiet_dependency_warnings

# Errors a user can fix (a path, a key, a file); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError)


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
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)
    finally:
        from megatron_bar import platform

        try:
            platform.shutdown()
        except Exception:  # best-effort cleanup: the real error (if any) was already reported
            pass
