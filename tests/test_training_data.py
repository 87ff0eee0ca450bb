"""Training data files: one JSON/JSONL reader for every data path."""

import json

import pytest

from flythinker.persona import JsonFileError, load_records, make_persona_empathy, read_json_items, save_records
from flythinker.training.collator import FlyThinkerCollator
from flythinker.training.data import DataError, load_examples
from flythinker.training.toy import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_pretty_printed_json_object_is_one_training_record(tmp_path, tok):
    """`flythinker train --data` reads a pretty-printed JSON object like `persona.load_records` does (one record);
    a reader of its own once took it for JSON lines and failed on line 1."""
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"prompt": "ab=", "response": "ba"}, indent=2))
    examples, kind = load_examples(path, tokenizer=tok)
    assert kind == "pairs" and examples == [{"prompt": "ab=", "response": "ba"}]
    batch = FlyThinkerCollator(tokenizer=tok)(examples)
    assert batch["input_ids"].shape == (1, len(tok("ab=")["input_ids"]) + 3)  # "ba" + eos


def test_pretty_printed_persona_record_reads_the_same_on_both_paths(tmp_path, tok):
    rec = make_persona_empathy(n_users=3, queries_per_user=1)["train"][0]
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(rec.to_dict(), indent=2))
    assert load_records(path) == [rec]
    examples, kind = load_examples(path, tokenizer=tok, context="split")
    assert kind == "views" and len(examples) == 1 and examples[0]["response"]


@pytest.mark.parametrize("text, match", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": \n', r"line 2 is not valid JSON"),
    ('{\n  "prompt": "a",\n  "response" "b"\n}\n', r"not valid JSON \(line 3, column 14\)"),
    ('[{"prompt": "a", "response": "b"},\n', r"not valid JSON \(line 2"),
])
def test_bad_json_names_file_and_line_on_every_path(tmp_path, tok, text, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(JsonFileError, match=match) as ei:
        read_json_items(path)
    assert str(path) in str(ei.value)
    with pytest.raises(JsonFileError, match=match):
        load_records(path)
    with pytest.raises(DataError, match=match):
        load_examples(path, tokenizer=tok)


def test_list_lines_and_blank_files(tmp_path):
    items = [{"a": 1}, {"b": [1, 2]}]
    (tmp_path / "l.json").write_text(json.dumps(items, indent=1))
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(x) for x in items) + "\n\n")
    (tmp_path / "blank.jsonl").write_text(" \n\n")
    assert read_json_items(tmp_path / "l.json") == read_json_items(tmp_path / "l.jsonl") == items
    assert read_json_items(tmp_path / "blank.jsonl") == []
    with pytest.raises(DataError, match="no records"):
        load_examples(tmp_path / "blank.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"a": "\xe9"}\n')
    with pytest.raises(JsonFileError, match="not UTF-8"):
        read_json_items(tmp_path / "latin1.jsonl")


def test_persona_file_read_once_matches_load_records(tmp_path, tok):
    recs = make_persona_empathy(n_users=6, queries_per_user=2)["train"][:4]
    save_records(recs, tmp_path / "p.jsonl")
    assert load_records(tmp_path / "p.jsonl") == recs
    examples, kind = load_examples(tmp_path / "p.jsonl", tokenizer=tok, context="shared")
    assert kind == "views" and len(examples) == 4 and set(examples[0]) == {"prompt", "response"}
