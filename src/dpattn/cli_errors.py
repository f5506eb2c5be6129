"""How the command line reports a failure: one line, `dpattn: error: ...`, no traceback.

A mistake in the flags or the model path (ValueError, including ModelPathError, and
FileNotFoundError) exits 2 as argparse does; a failure while running (a rank died, ...) exits 1.
`--log-level debug` re-raises, traceback included.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE_ERRORS = (ValueError, FileNotFoundError)


def error_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return f"dpattn: error: {text.splitlines()[0]}"


def run_reporting_errors(fn: Callable[[], int], debug: bool = False) -> int:
    """fn()'s exit code; an exception becomes one line on stderr and exit code 2 (usage) or 1."""
    try:
        return fn()
    except KeyboardInterrupt:
        if debug:
            raise
        return 130
    except Exception as e:  # noqa: BLE001 - every failure is reported, in one line
        if debug:
            raise
        print(error_line(e), file=sys.stderr, flush=True)
        return 2 if isinstance(e, USAGE_ERRORS) else 1
