"""Public alias of :mod:`flythinker.hub` (offline model resolution), kept for user code and docs that write
``from flythinker.models import load_pretrained, load_tokenizer``. New code imports :mod:`flythinker.hub`.

The name is kept apart from :mod:`flythinker.modeling` (the FlyThinker model itself) on purpose: this module only
finds and loads the *checkpoints* a pair is built from.
"""

from flythinker.hub import (
    KNOWN_MODELS,
    SMOLLM2,
    ModelNotFoundError,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    cache_dir,
    clean_stale_temps,
    file_lock,
    load_pretrained,
    load_tokenizer,
    resolve,
    tiny_config,
)

__all__ = [
    "KNOWN_MODELS",
    "SMOLLM2",
    "ModelNotFoundError",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "cache_dir",
    "clean_stale_temps",
    "file_lock",
    "load_pretrained",
    "load_tokenizer",
    "resolve",
    "tiny_config",
]
