"""flythinker.hub: the atomic writer every cache goes through (a killed writer never leaves a broken cache or a
temporary folder that stays forever)."""

import json
import subprocess
import sys
import textwrap

import pytest

from flythinker.hub import atomic_directory, atomic_write_bytes, atomic_write_json, clean_stale_temps


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_atomic_directory_moves_into_place_and_replaces(tmp_path):
    dest = tmp_path / "cache" / "entry"
    with atomic_directory(dest) as tmp:
        assert tmp.parent == dest.parent and not dest.exists()
        (tmp / "a.txt").write_text("1")
    assert (dest / "a.txt").read_text() == "1"
    with atomic_directory(dest) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]  # replaced, not merged
    assert _siblings(dest) == []


def test_atomic_directory_error_leaves_old_state(tmp_path):
    dest = tmp_path / "entry"
    with atomic_directory(dest) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(dest) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("boom")
    assert (dest / "a.txt").read_text() == "old"
    assert _siblings(dest) == []


def _killed_writer(dest, body: str) -> None:
    """Run `body` inside `atomic_directory(dest)` in a subprocess that SIGKILLs itself mid-write."""
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from flythinker.hub import atomic_directory
        with atomic_directory(Path({str(dest)!r})) as tmp:
            {body}
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr


def test_killed_writer_leaves_no_cache_and_next_writer_cleans_its_temp(tmp_path):
    dest = tmp_path / "models" / "entry"
    _killed_writer(dest, "(tmp / 'model.safetensors').write_bytes(b'x' * 1000)")
    assert not dest.exists()
    left = _siblings(dest)
    assert len(left) == 1 and left[0].startswith(".entry.tmp-")  # the killed run's half-written folder
    with atomic_directory(dest) as tmp:
        (tmp / "model.safetensors").write_bytes(b"y")
    assert _siblings(dest) == []
    assert (dest / "model.safetensors").read_bytes() == b"y"


def test_clean_stale_temps_keeps_live_writers(tmp_path):
    dest = tmp_path / "entry"
    with atomic_directory(dest) as tmp:
        assert clean_stale_temps(dest) == []  # this process is alive: its temporary stays
        assert tmp.is_dir()


def test_atomic_write_bytes_and_json(tmp_path):
    path = tmp_path / "d" / "x.json"
    atomic_write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    atomic_write_bytes(path, b"{}")
    assert path.read_bytes() == b"{}"
    assert _siblings(path) == []


def test_file_lock_excludes_a_second_holder(tmp_path):
    import threading
    import time

    from flythinker.hub import file_lock

    lock, order = tmp_path / "new" / ".x.lock", []

    def second():
        with file_lock(lock):
            order.append("second")

    with file_lock(lock):  # the folder is created
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first")
    t.join(10)
    assert order == ["first", "second"]
