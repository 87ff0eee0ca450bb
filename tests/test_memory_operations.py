"""The memory lifecycle over a callable backend: prompts carry the inputs, outputs are parsed, failures counted."""

from __future__ import annotations

import json

import pytest

from flythinker.empathy.backends import CallableJudgeBackend
from flythinker.memory import MemoryItem
from flythinker.memory.operations import extract, judge_ability, retrieve, update, utilise


def _backend(replies):
    seen = []

    def fn(messages):
        seen.append(messages)
        return replies[(len(seen) - 1) % len(replies)]

    return CallableJudgeBackend(fn), seen


def test_extract_parses_and_counts_failures():
    ok = json.dumps({"memory_items": [{"type": "direct", "label": "Possessions/Pet", "value": "Has a cat",
                                       "confidence": 0.95, "evidence_text": "my cat"}]})
    backend, seen = _backend([f"```json\n{ok}\n```", "sorry, I cannot", '{"memory_items": []}'])
    dialogues = [[{"role": "user", "text": "my cat is hungry"}]] * 3
    items, stats = extract(backend, dialogues)
    assert [m.value for m in items[0]] == ["Has a cat"] and items[1] is None and items[2] == []
    assert stats.ok == 2 and stats.failed == 1
    assert "User: my cat is hungry" in seen[0][1]["content"] and "Possessions/Pet" in seen[0][0]["content"]


def test_update_and_utilise_and_judge():
    before = [MemoryItem("m1", "Likes ramen", label="Preferences/Food")]
    backend, seen = _backend(['[{"memory_id": "m1", "value": "Likes spicy ramen", "label": "Preferences/Food"}]'])
    after, stats = update(backend, [before], [[{"role": "user", "text": "I want it spicy now"}]])
    assert after[0][0].value == "Likes spicy ramen" and stats.failed == 0
    assert '"Likes ramen"' in seen[0][1]["content"]
    mems = [MemoryItem("m1", "Likes ramen"), MemoryItem("m2", "No politics please",
                                                        label="Constraints_and_Boundaries/Disliked_Topics")]
    backend, seen = _backend(['{"answer": "Try tonkotsu.", "used_memory_fact": "Likes ramen"}', "plain text reply"])
    res, stats = utilise(backend, ["dinner?", "news?"], [mems, mems])
    assert res[0].answer == "Try tonkotsu." and res[0].parsed and not res[1].parsed and stats.failed == 1
    listing = seen[0][1]["content"]
    assert listing.index("No politics") < listing.index("Likes ramen")  # constraints first
    backend, _ = _backend(["Yes.", "no", "maybe"])
    verdicts, stats = judge_ability(backend, "ability2", ["q"] * 3, ["m"] * 3, ["r"] * 3)
    assert verdicts == [1.0, 0.0, None] and stats.failed == 1
    with pytest.raises(ValueError, match="ability5"):
        judge_ability(backend, "ability5", ["q"], ["m"], ["r"])


def test_retrieve_bm25_and_model():
    mems = [MemoryItem("a", "Has a cat named Bull"), MemoryItem("b", "Self-identified time traveler"),
            MemoryItem("c", "Works in logistics")]
    assert retrieve("tips for a time traveler", mems, k=1) == [1]
    backend, _ = _backend(['{"selected_memory_id": "c2"}', "no idea"])
    assert retrieve("x", mems, backend=backend) == [2]
    assert retrieve("x", mems, backend=backend) == []
    assert retrieve("x", []) == []
