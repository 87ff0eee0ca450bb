"""Loaders of flythinker.persona on hand-made fixtures (tests/data/persona_*), detection and malformed input."""

import json
from pathlib import Path

import pytest

from flythinker.persona import (
    PersonaRecord,
    RecordError,
    detect_format,
    load_records,
    make_persona_empathy,
    save_records,
)

DATA = Path(__file__).parent / "data"


def test_longlamp_fields_and_aliases():
    recs = load_records(DATA / "persona_longlamp.json", format="longlamp")
    assert [r.record_id for r in recs] == ["ll-1", "ll-2", "ll-3"]
    a, b, c = recs
    assert a.user_id == "alice" and a.query.text == "Write a short post about your garden."
    assert a.response == "The tomatoes finally turned red this week."
    # list profile -> one memory per past document, every text field kept, ids left out, order kept
    assert [m.value for m in a.memories] == ["title: A rainy week\ncontent: It rained every day and I loved it.",
                                            "title: Bread\ncontent: My first sourdough came out flat."]
    # string profile -> persona text; input/output aliases
    assert b.persona.profile.startswith("Alice writes") and not b.memories
    assert b.query.text == "Write about your morning routine." and b.response == "Coffee first, then the dog."
    assert c.response is None and [m.value for m in c.memories] == ["an old post", "another old post"]


def test_personaemp_real_session_one_record_per_query():
    # a real public PersonaEmp-format session (AlpsBench task 4; see tests/data/README.md): no persona
    recs = load_records(DATA / "persona_personaemp.json", format="personaemp")
    assert [r.record_id for r in recs] == [f"english_77:{j}" for j in range(5)]
    r = recs[0]
    assert r.user_id == "english_77" and r.response is None and r.persona.profile == ""
    assert r.query.category == "Emotional Support" and r.query.text.startswith("I just got off the phone")
    assert len(r.history) == 12 and r.history[1].role == "assistant" and len(r.memories) == 4
    assert r.memories[0].label == "Plans/Schedule" and r.memories[0].value == "Must travel to Germany within 1 month"
    assert json.loads(r.memories[0].evidence) == {"session_id": "sess_3932f15755d0", "utterance_index": 0,
                                                  "text": "Because we have to be in Germany in a month at most"}
    assert r.meta["protocol"] == "personaemp" and r.meta["query_fields"] == {"query_id": "english_77:0",
                                                                             "category": "Emotional Support"}


def _full_layout_session() -> dict:
    """The real session with the fields the PersonalizedEmpathy release adds (persona, situation, criteria...),
    shaped as its final_filter / prepare_criteria code writes and reads them."""
    d = json.loads((DATA / "persona_personaemp.json").read_text())[0]
    d.update(source_file="raw_7.json", original_sid="sess_3932f15755d0",
             persona={"persona_profile": "A parent who hides worry from the kids.", "is_deep_persona": True,
                      "topics": ["family"]})
    d["extracted_memory"][0]["label_suggestion"] = "Plans"
    d["queries"][0].update(situation_id="Sit_1", relevant_mem=[1, 3], reasoning="ties to the deadline",
                           situation={"situation": "Waiting on the embassy.", "topic": "travel"},
                           criteria={"resonation": "1. fear (100%)", "expression": "x", "reception": "y"})
    return d


def test_personaemp_full_layout_keeps_every_field(tmp_path):
    path = _write(tmp_path, [_full_layout_session()])
    r, r1 = load_records(path)[:2]
    assert r.persona.profile == "A parent who hides worry from the kids."
    assert r.query.situation == "Waiting on the embassy."
    assert r.meta["criteria"]["resonation"] == "1. fear (100%)" and r.meta["relevant_mem"] == [1, 3]
    q = r.meta["query_fields"]
    assert q["situation_id"] == "Sit_1" and q["reasoning"] == "ties to the deadline"
    assert q["situation"]["topic"] == "travel"
    assert r.meta["session_fields"]["persona"]["topics"] == ["family"]
    assert r.meta["session_fields"]["original_sid"] == "sess_3932f15755d0"
    assert r.meta["memory_fields"][0] == {"label_suggestion": "Plans"}
    assert "criteria" not in r1.meta and r1.query.situation is None
    # the records round-trip through the flythinker format with nothing lost
    save_records(load_records(path), tmp_path / "back.jsonl")
    assert load_records(tmp_path / "back.jsonl") == load_records(path)


def test_perm_jsonl():
    recs = load_records(DATA / "persona_perm.jsonl", format="perm")
    assert [r.record_id for r in recs] == ["p-1", "p-2", "p-3"]  # the blank line is not a record
    p1, p2, p3 = recs
    assert p1.query.text == "I got written up for something I didn't do."
    assert p1.response.startswith("That sounds so unfair") and p1.query.situation.startswith("She was blamed")
    assert p1.persona.profile.splitlines() == ["A 34-year-old nurse who works night shifts.", "age: 34"]
    assert p2.query.text == "The house is so quiet now." and p2.response is None
    assert p3.meta["dialogue_tail"] == ["ok", "Start with 20 minutes."]  # later turns kept, not dropped


@pytest.mark.parametrize("name,fmt", [("persona_longlamp.json", "longlamp"), ("persona_personaemp.json", "personaemp"),
                                      ("persona_perm.jsonl", "perm")])
def test_auto_detection_matches_explicit(name, fmt):
    assert detect_format(json.loads((DATA / name).read_text().splitlines()[0]) if name.endswith("jsonl")
                         else json.loads((DATA / name).read_text())[0]) == fmt
    assert load_records(DATA / name) == load_records(DATA / name, format=fmt)


def test_detect_format_unknown_and_bad_args(tmp_path):
    with pytest.raises(ValueError, match="cannot detect format"):
        detect_format({"foo": 1})
    with pytest.raises(ValueError, match="format must be one of"):
        load_records(DATA / "persona_perm.jsonl", format="lamp")
    with pytest.raises(ValueError, match="on_error"):
        load_records(DATA / "persona_perm.jsonl", on_error="ignore")
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"a": 1}\n{not json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_records(bad)


def _write(tmp_path, items, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(items))
    return p


def _fixture(name):
    text = (DATA / name).read_text()
    return [json.loads(x) for x in text.splitlines() if x.strip()] if name.endswith("jsonl") else json.loads(text)


@pytest.mark.parametrize("name,fmt,index,mutate,field", [
    ("persona_longlamp.json", "longlamp", 1, lambda d: d.pop("input"), "inp"),
    ("persona_longlamp.json", "longlamp", 0, lambda d: d.update(target=5), "target"),
    ("persona_longlamp.json", "longlamp", 0, lambda d: d["profile"].append(3), "profile[2]"),
    ("persona_personaemp.json", "personaemp", 0, lambda d: d.update(persona={"persona_profile": 3}),
     "persona.persona_profile"),
    ("persona_personaemp.json", "personaemp", 0, lambda d: d["queries"][0].update(relevant_mem="1"),
     "queries[0].relevant_mem"),
    ("persona_personaemp.json", "personaemp", 0, lambda d: d["conversation"][1].update(role="narrator"),
     "conversation[1].role"),
    ("persona_personaemp.json", "personaemp", 0, lambda d: d["queries"][1].pop("query"), "queries[1].query"),
    ("persona_personaemp.json", "personaemp", 0, lambda d: d["extracted_memory"][0].pop("value"),
     "extracted_memory[0].value"),
    ("persona_perm.jsonl", "perm", 2, lambda d: d["persona"].pop("identity"), "persona.identity"),
    ("persona_perm.jsonl", "perm", 1, lambda d: d.update(dialogue=[]), "dialogue"),
    ("persona_perm.jsonl", "perm", 0, lambda d: d.update(dialogue=[7]), "dialogue[0]"),
])
def test_malformed_record_names_record_and_field(tmp_path, name, fmt, index, mutate, field):
    items = _fixture(name)
    mutate(items[index])
    path = _write(tmp_path, items)
    with pytest.raises(RecordError) as ei:
        load_records(path, format=fmt)
    err = ei.value
    assert err.index == index and err.field == field
    assert f"record {index}" in str(err) and repr(field) in str(err) and str(path) in str(err)
    rid = items[index].get("session_id", items[index].get("id"))
    assert repr(rid) in str(err)


def test_skip_mode_warns_with_count(tmp_path):
    items = _fixture("persona_perm.jsonl")
    items[0]["dialogue"] = []
    items[2].pop("scenario")
    path = _write(tmp_path, items)
    with pytest.warns(UserWarning, match="skipped 2 of 3 malformed records"):
        recs = load_records(path, format="perm", on_error="skip")
    assert [r.record_id for r in recs] == ["p-2"]


def test_empty_sessions_are_counted(tmp_path):
    items = _fixture("persona_personaemp.json") * 2
    items[1] = {**items[1], "session_id": "english_78", "queries": []}
    with pytest.warns(UserWarning, match="1 of 2 records produced no examples"):
        recs = load_records(_write(tmp_path, items))
    assert len(recs) == 5


def test_non_object_record(tmp_path):
    with pytest.raises(RecordError, match="record 1.*expected a JSON object"):
        load_records(_write(tmp_path, [_fixture("persona_perm.jsonl")[0], "oops"]), format="perm")


def test_native_round_trip(tmp_path):
    recs = make_persona_empathy(n_users=6, queries_per_user=2)["train"]
    save_records(recs, tmp_path / "pe.jsonl")
    back = load_records(tmp_path / "pe.jsonl")
    assert back == recs and isinstance(back[0], PersonaRecord)
    d = recs[0].to_dict()
    d["history"][0]["role"] = "robot"
    (tmp_path / "bad.jsonl").write_text(json.dumps(d) + "\n")
    with pytest.raises(RecordError, match=r"field .history\[0\]\.role.: must be one of"):
        load_records(tmp_path / "bad.jsonl")
