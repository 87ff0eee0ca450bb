"""Memories feed the reasoner: the split-context view from a memory store, and `flythinker generate --memory`."""

from __future__ import annotations

from pathlib import Path

import pytest

from flythinker.cli import main
from flythinker.memory import DO_NOT_REMEMBER, MemoryItem, MemoryStore
from flythinker.memory.reasoner import load_memories, memory_views
from flythinker.training.toy import save_tiny_model

PACKET = Path(__file__).parent / "data" / "alpsbench" / "sess_00111774b2f3.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = save_tiny_model(tmp_path_factory.mktemp("gen") / "gen", seed=0, hidden_size=32)
    return folder, AutoTokenizer.from_pretrained(folder)


def _mems():
    return [MemoryItem("m1", "Has a cat named Bull", label="Possessions/Pet"),
            MemoryItem("m2", "Prefers vegetarian food", label="Preferences/Food"),
            MemoryItem("m3", "Does not want to talk about politics",
                       label="Constraints_and_Boundaries/Disliked_Topics"),
            MemoryItem("m4", "Home address 5 Elm Street", label=DO_NOT_REMEMBER)]


def test_view_order_budget_and_labels(tiny):
    _, tok = tiny
    mv = memory_views(_mems(), "Suggest a vegetarian dinner recipe", tok, max_reasoner_tokens=4096)
    assert mv.used_ids == ["m3", "m2", "m1"]  # constraint first, then BM25 (vegetarian) ahead of the cat
    text = tok.decode(mv.views.reasoner_prompt_ids)
    assert "[avoid] Does not want to talk about politics" in text and "Elm Street" not in text
    assert "Suggest a vegetarian dinner recipe" in tok.decode(mv.views.generator_prompt_ids)
    assert "vegetarian food" not in tok.decode(mv.views.generator_prompt_ids)
    full = len(mv.views.reasoner_prompt_ids)
    tight = memory_views(_mems(), "Suggest a vegetarian dinner recipe", tok, max_reasoner_tokens=full - 1)
    assert len(tight.views.reasoner_prompt_ids) <= full - 1 and tight.dropped_ids and tight.used_ids[0] == "m3"
    with pytest.raises(ValueError, match="query alone exceeds"):
        memory_views(_mems(), "Suggest a vegetarian dinner recipe", tok, max_reasoner_tokens=10)


def test_recent_turns_fill_remaining_room(tiny):
    _, tok = tiny
    turns = [("user", "old turn about the weather"), ("assistant", "ok"), ("user", "newest turn about soup")]
    mv = memory_views(_mems()[:1], "And for lunch?", tok, max_reasoner_tokens=4096, recent_turns=turns)
    assert mv.recent_turns == 3
    assert "newest turn about soup" in tok.decode(mv.views.reasoner_prompt_ids)


def test_load_memories_from_store_and_packet(tmp_path):
    store = MemoryStore(tmp_path / "bob.json")
    store.extend(_mems())
    store.save()
    mems, turns, what = load_memories(store.path)
    assert [m.memory_id for m in mems] == ["m1", "m2", "m3"] and turns == [] and "bob" in what  # m4 refused
    mems, turns, what = load_memories(PACKET)
    assert len(mems) == 5 and turns[0][0] == "user" and "sess_00111774b2f3" in what
    bad = tmp_path / "x.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="neither"):
        load_memories(bad)


def test_generate_with_memory(tiny, capsys):
    folder, _ = tiny
    rc = main(["generate", "--generator", str(folder), "--memory", str(PACKET), "--prompt", "Any travel tips?",
               "--max-new-tokens", "3", "--no-stream", "--device", "cpu", "--memory-turns", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "AlpsBench session sess_00111774b2f3 (5 memories)" in err and "2 recent turns" in err
    rc = main(["generate", "--generator", str(folder), "--memory", str(PACKET), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["flythinker: error: --memory needs --prompt (the query) and neither --record nor "
                               "--reasoner-prompt"]
    rc = main(["generate", "--generator", str(folder), "--memory", "/nonexistent.json", "--prompt", "hi"])
    assert rc == 2 and "memory file not found" in capsys.readouterr().err
