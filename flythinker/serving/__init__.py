"""Serving a FlyThinker pair with vLLM (docs/serving.md).

vLLM finds the plugin through the entry point group `vllm.general_plugins` (pyproject.toml) and calls `register()`
in every vLLM process (API server, engine core, workers). It registers the `flythinker` config type with
transformers' AutoConfig and the architecture `FlyThinkerForCausalLM` with vLLM's ModelRegistry (lazily: the model
module is imported only when a flythinker checkpoint is loaded).

Nothing here is imported by `import flythinker`: vLLM lives in its own virtualenv (`make install-vllm`).
"""

from __future__ import annotations

ARCHITECTURE = "FlyThinkerForCausalLM"
MODEL_CLASS = "flythinker.serving.model:FlyThinkerForCausalLM"


def register() -> None:
    """vLLM general-plugin hook: make flythinker checkpoints loadable by vLLM (idempotent)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from flythinker.configuration import FlyThinkerConfig

    AutoConfig.register("flythinker", FlyThinkerConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


__all__ = ["register", "ARCHITECTURE", "MODEL_CLASS"]
