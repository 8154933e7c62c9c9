"""Local servers started for a while (the MLflow UI, a Prefect server or worker in tests).

In:  a command line, a log file, an environment; a health URL to poll.
Out: `start` (the process in its own process group, output to the log), `wait_healthy` (polls
     the URL until it answers 200; an error quoting the log if the process exits or time runs
     out), `stop` (a signal to each group, then SIGKILL after `timeout`: SIGINT for Prefect, whose
     worker may ignore SIGTERM; SIGTERM for the MLflow server, which ignores SIGINT).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """A server in its own process group (so that stopping it reaches its children)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll `url` until it answers 200; `RuntimeError` with the log's end otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited {proc.returncode}\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (a local server)
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not up after {timeout} s\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop(*procs: tuple[subprocess.Popen, int], timeout: float = 8) -> None:
    """Each (process, signal): the signal to its process group, then SIGKILL after `timeout`."""
    for proc, sig in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
    deadline = time.monotonic() + timeout
    for proc, _ in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
