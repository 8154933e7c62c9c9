"""The `__main__` wrapper of every stage: one clear line and exit 1 for expected failures.

In:  a zero-argument callable that loads the stage's params and runs it.
Out: its return, or for an expected failure (`ConfigError`, `StageError` and their kin) one
     `error: <message>` line on stderr and exit status 1, with no traceback to dig through.

Fault injection (tests/test_faults.py): `maybe_die(point)` SIGKILLs the calling process when
the environment variable `PIPELINE_FAULT` equals `point`; a no-op otherwise. The named points:
`download` (fetch: a verified file stored in the temporary raw dir), `tokenize-shard` (shards:
after the first record batch of the first shard), `finetune` (the arm trained and saved in its
temporary dir, before the rename), `forgetting` (between its first and its last output write).
"""
from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from ptf.common.config import ConfigError


class StageError(RuntimeError):
    """Bad input data or state: the message names the file, the key and what was expected."""


EXPECTED = (ConfigError, StageError)


def main_guard(fn: Callable[[], object], expected: tuple[type[BaseException], ...] = ()) -> None:
    try:
        fn()
    except EXPECTED + expected as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


FAULT_ENV = "PIPELINE_FAULT"


def maybe_die(point: str) -> None:
    """SIGKILL this process if `PIPELINE_FAULT` names `point` (fault-injection tests only)."""
    if os.environ.get(FAULT_ENV) == point:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
