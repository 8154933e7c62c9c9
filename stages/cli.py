"""The `__main__` wrapper of every stage: one clear line and exit 1 for expected failures.

In:  a zero-argument callable that loads the stage's params and runs it.
Out: its return, or for an expected failure (`ConfigError`, `StageError` and their kin) one
     `error: <message>` line on stderr and exit status 1, with no traceback to dig through.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from stages.config import ConfigError


class StageError(RuntimeError):
    """Bad input data or state: the message names the file, the key and what was expected."""


EXPECTED = (ConfigError, StageError)


def main_guard(fn: Callable[[], object], expected: tuple[type[BaseException], ...] = ()) -> None:
    try:
        fn()
    except EXPECTED + expected as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
