"""Whether two local HF folders can form a FlyThinker pair, checked before any weights load."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flythinker.hub.resolution import has_tokenizer


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


__all__ = ["check_pair_folders"]
