"""flythinker.memory: schema, per-user store, robust parsing, BM25 retrieval."""

from __future__ import annotations

import json

import pytest

from flythinker.memory import (
    DO_NOT_REMEMBER,
    BM25Retriever,
    MemoryError_,
    MemoryItem,
    MemoryStore,
    OutputParseError,
    ParseStats,
    find_json,
    parse_memory_items,
    parse_selection,
)


def _m(mid, value, label="Preferences/Food", **kw):
    return MemoryItem(memory_id=mid, value=value, label=label, **kw)


def test_schema_reads_released_shapes():
    m = MemoryItem.from_dict({"memory_id": "m1", "type": "indirect", "label": "Thoughts/Curiosity", "value": "x",
                              "evidence": {"session_id": "s", "utterance_index": 6, "text": "t"}, "confidence": 0.8})
    assert m.evidence.utterance_index == 6 and m.in_taxonomy and not m.is_constraint
    m2 = MemoryItem.from_dict({"value": "y", "evidence_text": "said y", "confidence": "0.65"}, default_id="p3")
    assert m2.memory_id == "p3" and m2.evidence.text == "said y" and m2.confidence == 0.65 and m2.label == "UNMAPPED"
    with pytest.raises(MemoryError_, match="'value' must be a string"):
        MemoryItem.from_dict({"memory_id": "m9", "value": ["a"]})
    assert MemoryItem.from_dict({"value": ["a"]}, strict=False).value == '["a"]'
    assert _m("c", "no politics", "Constraints_and_Boundaries/Sensitive_Topics").is_constraint


def test_store_roundtrip_actions_and_refusal(tmp_path):
    path = tmp_path / "alice.json"
    store = MemoryStore(path)
    assert store.add(_m("m1", "likes ramen"))
    assert not store.add(_m("m2", "her address is 5 Elm St", DO_NOT_REMEMBER))
    store.save()
    raw = json.loads(path.read_text())
    assert "5 Elm St" not in path.read_text() and [a["action"] for a in raw["actions"]] == ["add", "refuse"]
    again = MemoryStore.open(path)
    assert again.user_id == "alice" and [m.value for m in again.memories] == ["likes ramen"]
    rep = again.apply([_m("m1", "likes spicy ramen"), _m("m3", "owns a cat", "Possessions/Pet")])
    assert rep.modified == ["m1"] and rep.added == ["m3"] and rep.deleted == []
    rep = again.apply([_m("m3", "owns a cat", "Possessions/Pet")])
    assert rep.retained == ["m3"] and rep.deleted == ["m1"]
    again.save()
    actions = MemoryStore.open(path).actions
    assert [a["action"] for a in actions][-4:] == ["modify", "add", "retain", "delete"]
    assert actions[-4]["before"]["value"] == "likes ramen"
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write leaves no temporary file


def test_store_rejects_foreign_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"memories": []}')
    with pytest.raises(MemoryError_, match="not a flythinker memory store"):
        MemoryStore(bad)
    with pytest.raises(FileNotFoundError):
        MemoryStore.open(tmp_path / "none.json")


@pytest.mark.parametrize("text", [
    '{"memory_items": [{"value": "a"}]}',
    'Sure! ```json\n{"memory_items": [{"value": "a"}]}\n``` hope it helps',
    'Here: [{"value": "a"}] and then {"other": 1}',
    '{"memories": [{"value": "a", "type": "direct"}]}',
])
def test_parse_memory_items_variants(text):
    items = parse_memory_items(text)
    assert [m.value for m in items] == ["a"] and items[0].memory_id == "p1"


def test_parse_failures_are_counted_not_empty():
    stats = ParseStats()
    for text in ['{"memory_items": []}', "I cannot help", '{"answer": 3}', '{"memory_items": [{"value": "a"']:
        try:
            parse_memory_items(text)
            stats.record(None)
        except OutputParseError as e:
            stats.record(e)
    assert stats.ok == 1 and stats.failed == 3
    assert find_json("[1, 2]") == [1, 2]
    assert parse_selection('{"selected_memory_id": "m7"}', ["m1", "m7"]) == 1
    assert parse_selection("I pick m1 because", ["m1", "m7"]) == 0
    with pytest.raises(OutputParseError):
        parse_selection("none of them", ["m1"])


def test_bm25_ranks_the_matching_memory_first():
    r = BM25Retriever(["Has a cat named Bull", "Self-identified time traveler", "Works in shipping logistics"])
    assert r.rank("Tips for a traveler going back in time?")[0] == 1
    assert r.rank("my cats need food")[0] == 0  # the stemmer maps cats -> cat
    assert float(r.scores("zzz qqq").sum()) == 0.0
    with pytest.raises(ValueError):
        BM25Retriever([])
