"""ptf/common/atomic.py: outputs appear whole or not at all, and the old output survives a failure."""
import json
import subprocess
import sys
import textwrap

import pytest

from ptf.common import atomic


def test_write_json_is_stable_and_replaces(tmp_path):
    dest = tmp_path / "m.json"
    atomic.write_json(dest, {"b": 1, "a": [1, 2]})
    first = dest.read_bytes()
    atomic.write_json(dest, {"a": [1, 2], "b": 1})
    assert dest.read_bytes() == first
    assert json.loads(first) == {"a": [1, 2], "b": 1}


def test_failed_dir_write_keeps_previous_output(tmp_path):
    dest = tmp_path / "out"
    with atomic.atomic_dir(dest) as tmp:
        (tmp / "f").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(dest) as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("boom")
    assert (dest / "f").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_kill_mid_write_leaves_only_a_hidden_temp_that_the_next_write_clears(tmp_path):
    dest = tmp_path / "out"
    with atomic.atomic_dir(dest) as tmp:
        (tmp / "f").write_text("good")
    script = textwrap.dedent(f"""
        import os, signal
        from ptf.common import atomic
        with atomic.atomic_dir({str(dest)!r}) as tmp:
            (tmp / "f").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    assert (dest / "f").read_text() == "good"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert leftovers and all(n.startswith(".out.tmp-") for n in leftovers)
    with atomic.atomic_dir(dest) as tmp:
        (tmp / "f").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (dest / "f").read_text() == "new"
