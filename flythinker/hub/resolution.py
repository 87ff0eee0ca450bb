"""Offline model resolution: short names -> local safetensors checkpoints (nothing is ever fetched from a model
hub), and loading a model and its tokenizer from them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from flythinker.hub.cache_folder import cache_dir, file_lock
from flythinker.hub.gguf import GGUF_PACKAGES, KNOWN_MODELS, ModelNotFoundError, convert_gguf


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Local folder of a model: a known short name (converted on first use) or an existing HF-format folder."""
    key = str(name_or_path)
    if key.lower() in GGUF_PACKAGES:
        key = key.lower()
        dest = cache_dir() / "models" / key
        if not (dest / "config.json").is_file():
            with file_lock(cache_dir() / "models" / f".{key}.lock"):
                if not (dest / "config.json").is_file():
                    convert_gguf(key, dest)
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


__all__ = ["has_tokenizer", "load_pretrained", "load_tokenizer", "resolve"]
