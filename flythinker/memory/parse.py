"""Robust JSON reading of model outputs, with failures counted (never silently empty).

Models wrap JSON in markdown fences, prepend prose, append a second object, or stop mid-way. :func:`find_json`
tries, in order: the whole text, each fenced block, then every balanced ``{...}`` / ``[...]`` span from the
first opening bracket (``json.JSONDecoder.raw_decode``). :class:`ParseStats` counts successes and failures with
the reasons, so a run reports how many outputs it could not read.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .schema import MemoryItem, items_from_list

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


class OutputParseError(ValueError):
    """A model output holding no readable JSON of the expected shape."""


def _decode_spans(text: str) -> Any:
    dec = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            obj, _ = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        return obj
    raise OutputParseError(f"no JSON value in output: {text[:80]!r}")


def find_json(text: str) -> Any:
    """The first JSON object or array in ``text`` (see module doc); raises :class:`OutputParseError`."""
    if not isinstance(text, str):
        raise OutputParseError(f"expected text, got {type(text).__name__}")
    s = text.strip()
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass
    for block in _FENCE.findall(s):
        try:
            return json.loads(block.strip())
        except json.JSONDecodeError:
            continue
    return _decode_spans(s)


def parse_memory_items(text: str, *, id_prefix: str = "p") -> list[MemoryItem]:
    """Memory items from an extractor/updater output: ``{"memory_items": [...]}``, ``{"memories": [...]}`` or a
    bare list. An empty list is a valid answer; unreadable output raises :class:`OutputParseError`."""
    obj = find_json(text)
    if isinstance(obj, dict):
        for key in ("memory_items", "memories", "items"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            raise OutputParseError(f"JSON object without a 'memory_items' list (keys: {sorted(obj)[:6]})")
    if not isinstance(obj, list):
        raise OutputParseError(f"expected a list of memory items, got {type(obj).__name__}")
    return items_from_list([x for x in obj if isinstance(x, dict)], strict=False, id_prefix=id_prefix)


def parse_selection(text: str, candidate_ids: list[str]) -> int:
    """The candidate a retrieval output chose: ``{"selected_memory_id": ...}`` JSON, else the first candidate id
    quoted as a whole word. Returns an index into ``candidate_ids``; raises :class:`OutputParseError`."""
    try:
        obj = find_json(text)
        if isinstance(obj, dict) and str(obj.get("selected_memory_id", "")) in candidate_ids:
            return candidate_ids.index(str(obj["selected_memory_id"]))
    except OutputParseError:
        pass
    for m in re.finditer(r"[A-Za-z]*\d+", text):
        if m.group(0) in candidate_ids:
            return candidate_ids.index(m.group(0))
    raise OutputParseError(f"no candidate id in output: {text[:80]!r}")


@dataclass
class ParseStats:
    """Counts of readable and unreadable outputs (``reasons``: failure message prefix -> count)."""

    ok: int = 0
    failed: int = 0
    reasons: Counter = field(default_factory=Counter)

    def record(self, error: Exception | None) -> None:
        if error is None:
            self.ok += 1
        else:
            self.failed += 1
            self.reasons[str(error).split(":")[0][:60]] += 1

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "failed": self.failed, "reasons": dict(self.reasons)}


__all__ = ["OutputParseError", "ParseStats", "find_json", "parse_memory_items", "parse_selection"]
