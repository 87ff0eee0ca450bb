"""flythinker: think-while-generating personalisation for Hugging Face causal LMs.

`FlyThinkerConfig`, `FlyThinkerForCausalLM` and `FlyThinkerCache` are imported lazily (they pull in transformers),
so `import flythinker.kernels` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "FlyThinkerConfig": "flythinker.configuration",
    "FlyThinkerForCausalLM": "flythinker.modeling",
    "FlyThinkerCache": "flythinker.cache",
    "fast_generate": "flythinker.decode",
}

if TYPE_CHECKING:
    from flythinker.cache import FlyThinkerCache
    from flythinker.configuration import FlyThinkerConfig
    from flythinker.modeling import FlyThinkerForCausalLM


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        # Importing the model registers it with AutoConfig / AutoModelForCausalLM.
        value = getattr(importlib.import_module(_LAZY[name]), name)
        if name in ("FlyThinkerConfig", "FlyThinkerForCausalLM", "fast_generate"):
            # the layers above the model register with it: generate's lean loop, the shipped pairs' factory
            for module in ("flythinker.modeling", "flythinker.decode", "flythinker.pretrained.loading"):
                importlib.import_module(module)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flythinker' has no attribute {name!r}")


__all__ = ["FlyThinkerConfig", "FlyThinkerForCausalLM", "FlyThinkerCache", "__version__"]
