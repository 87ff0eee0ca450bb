"""Trained FlyThinker pairs shipped inside the package as small deltas over an offline base model (data only).

A shipped pair is a folder here holding `pair.json` (its base model, fusion options, how it was trained and what it
scored) and its trained tensors as fp16 safetensors (`deltas.safetensors`, a few hundred KB). Loading by name
builds the pair from the base's offline checkpoint (flythinker.hub) plus the deltas, nothing else is downloaded:

    FlyThinkerForCausalLM.from_pretrained("smollm2-135m-persona-empathy")
    flythinker.hub.load_tokenizer("smollm2-135m-persona-empathy")   # the base model's tokenizer

A name is a shipped pair only when no file or folder of that name exists where it is resolved: an existing path
always means that path (as in transformers' `from_pretrained`), for `FlyThinkerForCausalLM.from_pretrained`,
`flythinker.hub.load_tokenizer` and `flythinker generate --model` alike (:func:`shipped_name`).

This module imports nothing from flythinker (hub and modeling both read it). Reproduce a pair with the `recipe`
command in its pair.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIPPED_PAIRS = tuple(sorted(p.name for p in HERE.iterdir() if (p / "pair.json").is_file()))
DELTAS = "deltas.safetensors"


def is_shipped(name_or_path: str | os.PathLike) -> bool:
    """True for the short name of a shipped pair (case-insensitive)."""
    return isinstance(name_or_path, str) and name_or_path.lower() in SHIPPED_PAIRS


def shipped_name(name_or_path: str | os.PathLike) -> str | None:
    """The shipped pair `name_or_path` names (lower case), or None: not a shipped name, or a path that exists
    (a local folder of the same name is that folder, never the shipped pair)."""
    if not is_shipped(name_or_path) or Path(name_or_path).expanduser().exists():
        return None
    return str(name_or_path).lower()


def pair_info(name: str) -> dict:
    """The parsed pair.json of a shipped pair."""
    if not is_shipped(name):
        raise ValueError(f"unknown shipped pair {name!r}; known: {list(SHIPPED_PAIRS)}")
    return json.loads((HERE / name.lower() / "pair.json").read_text())


def deltas_path(name: str) -> Path:
    """The trained tensors of a shipped pair (safetensors, keyed like the pair's own parameters)."""
    pair_info(name)
    return HERE / name.lower() / DELTAS


def base_of(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """The base model a shipped pair is built from (its tokenizer is the pair's); anything else unchanged."""
    return pair_info(name_or_path)["base"] if shipped_name(name_or_path) else name_or_path


__all__ = ["DELTAS", "SHIPPED_PAIRS", "base_of", "deltas_path", "is_shipped", "pair_info", "shipped_name"]
