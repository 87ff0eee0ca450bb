"""The one atomic writer every cache and checkpoint of flythinker goes through.

A cache that a killed process left half-written would fail every later run, so every cache (the converted
checkpoint, the demo's LoRA weights, the persona datasets) is built under a temporary sibling of its final path and
moved into place with one `os.replace`. Readers see the old state or the new one, never a mix. A temporary sibling
carries its writer's pid; the next writer of the same path removes those whose process is gone.

tests/faults.py kills a child process between these steps (it watches `os.replace`) to test what survives.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# ---- atomic writes -------------------------------------------------------------------------------------------------
_TMP_TAG = ".tmp-"  # temporary sibling of `dest`: f".{dest.name}.tmp-{pid}-{random}"


def _tmp_prefix(dest: Path) -> str:
    return f".{dest.name}{_TMP_TAG}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `dest` left by writers that were killed (their pid is gone).

    Returns the removed paths. Temporaries of live writers (this process included) are kept.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    prefix, removed = _tmp_prefix(dest), []
    for entry in dest.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _umask() -> int:
    """This process's umask (read without changing it where /proc tells it; else set and restored at once)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_tmp(dest: Path, *, directory: bool) -> Path:
    """A temporary sibling of `dest` with the mode `open()` / `mkdir()` would give it (mkstemp/mkdtemp make them
    private, 0600/0700: published as is, a user's shared results folder would hold files only they can read)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dest)
    prefix = f"{_tmp_prefix(dest)}{os.getpid()}-"
    if directory:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
        os.chmod(path, 0o777 & ~_umask())
        return path
    fd, name = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary sibling of `dest`, then move it into place in one `os.replace`.

    ```
    with atomic_directory(cache / "demo" / key) as tmp:
        save_file(state, tmp / "lora.safetensors")
        (tmp / "meta.json").write_text(...)
    ```
    If the block raises (or the process dies), `dest` is untouched and the temporary is removed (by this call,
    or for a killed process by the next writer of `dest`). An existing `dest` is replaced: it is first renamed
    to a temporary sibling, so readers see the old folder or the new one, or for an instant none, never a mix.
    Concurrent writers of one `dest` should hold a :func:`file_lock`.
    """
    dest = Path(dest)
    tmp = _new_tmp(dest, directory=True)
    try:
        yield tmp
        move_into_place(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staging_directory(dest: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling folder of `dest` (removed on exit; a killed writer's is removed by the next writer of
    `dest`), for writers that publish its files themselves."""
    tmp = _new_tmp(Path(dest), directory=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move a fully written folder `tmp` (a sibling of `dest`, same file system) to `dest` in one `os.replace`;
    an existing `dest` is first renamed aside and removed afterwards. The second half of
    :func:`atomic_directory`, for writers that must stage under a name of their own (e.g. the training
    checkpoints, staged under one name that every DDP process writes into)."""
    tmp, dest = Path(tmp), Path(dest)
    old = None
    if dest.exists() or dest.is_symlink():  # os.replace cannot overwrite a non-empty folder: move it aside
        old = dest.parent / f"{_tmp_prefix(dest)}{os.getpid()}-old-{secrets.token_hex(4)}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        _remove(old)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary sibling + `os.replace` (fsynced first); returns `path`."""
    path = Path(path)
    tmp = _new_tmp(path, directory=False)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """`json.dumps(obj)` written atomically to `path` (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, json.dumps(obj, indent=indent).encode())


__all__ = ["atomic_directory", "atomic_write_bytes", "atomic_write_json",
           "clean_stale_temps", "move_into_place", "staging_directory"]
