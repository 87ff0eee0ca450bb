"""Fault injection for a test's child process (tests/faults.py puts this folder first on its PYTHONPATH).

With `FLYTHINKER_FAULT_POINT=<point>[:<substring>]` set, the child kills itself with SIGKILL at that write point
for a path containing `<substring>`: no `finally` block, no atexit hook runs, exactly as under the OOM killer or a
power cut. The points are recognised from the outside, on `os.replace` (every publish of flythinker's atomic
writers is one), so product code carries no hook:

- atomic_directory.written: a folder is written under its temporary name; killed before it (or the folder it
  replaces) moves;
- atomic_directory.replacing: an existing destination was moved aside (to `.<name>.tmp-<pid>-old-<hex>`), the new
  one is not in place yet;
- atomic_write.written: a file's bytes are written under its temporary name (`.<name>.tmp-...`), not moved yet;
- publish.partial: a folder published file by file from a staging folder (`flythinker train`'s final model) has
  its first file moved.
"""

import os
import signal
from pathlib import Path

TMP_TAG = ".tmp-"


def _arm(point: str, where: str) -> None:
    real_replace = os.replace

    def matches(path) -> bool:
        return where in os.fspath(path)

    def before(src: Path, dst: Path) -> bool:
        aside = "-old-" in dst.name
        if point == "atomic_directory.written":
            return (aside and matches(src)) or (src.is_dir() and not aside and "-old-" not in src.name and matches(dst))
        if point == "atomic_write.written":
            return src.is_file() and TMP_TAG in src.name and matches(dst)
        return False

    def after(src: Path, dst: Path, staged_file: bool) -> bool:
        if point == "atomic_directory.replacing":
            return "-old-" in dst.name and matches(src)
        if point == "publish.partial":
            return staged_file and matches(dst)
        return False

    def replace(src, dst, *args, **kwargs):
        s, d = Path(os.fspath(src)), Path(os.fspath(dst))
        if before(s, d):
            os.kill(os.getpid(), signal.SIGKILL)
        # a plain file of a staging folder (not an atomic writer's own temporary file)
        staged_file = s.is_file() and TMP_TAG not in s.name and any(TMP_TAG in p.name for p in s.parents)
        real_replace(src, dst, *args, **kwargs)
        if after(s, d, staged_file):
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace


_spec = os.environ.get("FLYTHINKER_FAULT_POINT")
if _spec:
    _point, _, _where = _spec.partition(":")
    _arm(_point, _where)
