"""flythinker's cache folder and the lock that lets several processes fill one cache at once."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock


def cache_dir() -> Path:
    """Root of flythinker's cache (`$FLYTHINKER_CACHE` or `~/.cache/flythinker`)."""
    return Path(os.environ.get("FLYTHINKER_CACHE", Path.home() / ".cache" / "flythinker")).expanduser()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a `filelock.FileLock`, created with its folder if needed): several
    processes may fill one cache at once, and only one of them should do the work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


__all__ = ["cache_dir", "file_lock"]
