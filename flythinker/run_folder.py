"""Run folders and output files: one writer at a time, no silent reuse of another run's output.

Every command that writes a run's output (`flythinker train --output-dir`, `flythinker rl --out`, `flythinker judge
--out`, the benchmarks' results) goes through here:

- **a lock** (`filelock`, an OS-level lock released when the process dies, SIGKILL included): a second writer of
  the same folder or file is refused at once, naming the folder, instead of interleaving with the first;
- **no silent reuse**: a folder that already holds anything (other than the lock) is refused unless the caller was
  told `resume=True` (continue that run) or `overwrite=True` (replace it: the caller removes what it owns); an
  existing output file is refused unless `overwrite=True`;
- **atomic files**: :meth:`OutputFile.write_bytes` and the writers of `flythinker.hub` write a temporary sibling and
  `os.replace` it, with the mode a plain `open()` would give (the user's umask).

Under `torchrun` only the main process (RANK 0) takes the lock and checks the folder; the others write where it
tells them (the Trainer's own rule).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".flythinker-run.lock"


class RunFolderError(ValueError):
    """A run folder or output file that must not be written now (the message names it and what to do)."""


def _main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _lock(path: Path):
    from filelock import FileLock, Timeout

    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderError("another flythinker process is writing to it now (it holds the lock "
                             f"{path}); wait for it to finish or choose another place") from None
    return lock


def contents(folder: str | os.PathLike) -> list[str]:
    """Names in `folder` (sorted) other than its lock file; [] for a folder that does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)


@contextlib.contextmanager
def run_folder(folder: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
               resumable: bool = True) -> Iterator[Path]:
    """Hold `folder` (created if needed) for one run; yields its path.

    Raises RunFolderError if it is a file, if another process holds it, or if it already holds something and
    neither `resume` nor `overwrite` is set (`resumable=False`: the message offers --overwrite only). The lock is
    released on exit (and by the OS if the process dies).
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder} is an existing file, not a folder")
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: pick one")
    if not _main_process():
        yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    try:
        lock = _lock(folder / LOCK_NAME)
    except RunFolderError as exc:
        raise RunFolderError(f"{folder}: {exc}") from None
    try:
        held = contents(folder)
        if held and not (resume or overwrite):
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            how = "pass --resume to continue that run or --overwrite to replace it" if resumable else \
                "pass --overwrite to replace it"
            raise RunFolderError(f"{folder} already holds a run ({len(held)} entries: {shown}): {how}")
        yield folder
    finally:
        lock.release()


class OutputFile:
    """One output file held for writing (see :func:`output_file`)."""

    def __init__(self, path: Path):
        self.path = path

    def write_bytes(self, data: bytes) -> Path:
        """Write `data` atomically (temporary sibling + os.replace, umask-respecting mode)."""
        from flythinker.hub import atomic_write_bytes

        return atomic_write_bytes(self.path, data)


@contextlib.contextmanager
def output_file(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[OutputFile]:
    """Hold output file `path` for writing, checked before the work that produces it: RunFolderError if it is a
    folder, if it exists and `overwrite` is not set, if its folder cannot be written, or if another process holds
    it (lock: a hidden `.<name>.lock` beside it)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise RunFolderError(f"{path} is a folder, not a file")
    if path.exists() and not overwrite:
        raise RunFolderError(f"{path} already exists: pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise RunFolderError(f"cannot write into {path.parent} (permission denied)")
    lock = _lock(path.parent / f".{path.name}.lock")
    try:
        yield OutputFile(path)
    finally:
        lock.release()


__all__ = ["LOCK_NAME", "OutputFile", "RunFolderError", "contents", "output_file", "run_folder"]
