"""Bad records and over-long data: a clear error naming file/record/field, or a counted and reported cut, never a
silent wrong answer."""

import json

import pytest
import torch

from flythinker.persona import RecordError, load_records
from flythinker.training.data import DataError, load_examples
from flythinker.training.toy import char_tokenizer, save_tiny_model


def _record(**changes):
    rec = {"record_id": "r1", "user_id": "u1", "query": {"text": "How should I rest?"},
           "persona": {"profile": "I love long walks."}, "response": "Take a walk."}
    for path, value in changes.items():
        *head, last = path.split(".")
        node = rec
        for key in head:
            node = node[key]
        node[last] = value
    return rec


@pytest.mark.parametrize("changes, field, problem", [
    ({"persona.profile": 5}, "persona.profile", "expected a string, got int"),
    ({"response": 123}, "response", "expected a string or null, got int"),
    ({"query.text": "hi \ud800 there"}, "query.text", "lone surrogate"),
    ({"history": [{"role": "user", "text": ["a"]}]}, "history[0].text", "expected a string"),
    ({"persona.traits": {"tone": 3}}, "persona.traits.tone", "expected a string"),
    ({"history": "not a list"}, "history", "expected a list"),
])
def test_record_field_types_named(tmp_path, changes, field, problem):
    path = tmp_path / "recs.jsonl"
    good = _record()
    # json.dumps escapes a lone surrogate as \ud800: valid JSON, invalid Unicode (what a hostile file holds)
    path.write_text(json.dumps(good) + "\n" + json.dumps(_record(record_id="r2", **changes)) + "\n")
    with pytest.raises(RecordError) as info:
        load_records(path)
    msg = str(info.value)
    assert str(path) in msg and "record 1" in msg and f"field {field!r}" in msg and problem in msg, msg


def test_invalid_utf8_training_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: not UTF-8 text \(byte 48\)"):
        load_examples(path)


def test_lone_surrogate_in_training_pair(tmp_path):
    path = tmp_path / "sur.jsonl"
    path.write_text(json.dumps({"prompt": "a\udc80", "response": "b"}) + "\n")
    with pytest.raises(DataError, match=r"record 1: prompt: invalid Unicode at character 1"):
        load_examples(path)


def test_max_length_caps_the_generator_view_only(tmp_path):
    """--max-length used to cap the reasoner's (long, personal) view too, cutting its system prompt and chat
    header off from the left. Now it caps the generator's view; the reasoner's has its own cap."""
    from flythinker.persona import Turn, save_records
    from flythinker.persona.records import Persona, PersonaRecord, Query
    from flythinker.training import FlyThinkerCollator

    tok = char_tokenizer()
    history = [Turn(role="user" if i % 2 == 0 else "assistant", text=f"turn {i} " + "x" * 30) for i in range(6)]
    rec = PersonaRecord(record_id="r", user_id="u", query=Query(text="How should I rest?"),
                        persona=Persona(profile="I love long walks."), history=history, response="Walk.")
    save_records([rec], tmp_path / "p.jsonl")
    examples, kind = load_examples(tmp_path / "p.jsonl", tokenizer=tok, context="split", max_generator_tokens=128)
    assert kind == "views"
    collator = FlyThinkerCollator(tokenizer=tok, add_eos=False, max_length=128)
    batch = collator(examples)
    r_ids = batch["reasoner_input_ids"][0][batch["reasoner_attention_mask"][0].bool()].tolist()
    want = examples[0]["reasoner_prompt"] + examples[0]["response"]
    assert r_ids == want and len(want) > 128  # the whole reasoner view, header included
    assert collator.truncation["reasoner_prompts"] == 0 and collator.truncation["examples"] == 0


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("pos")
    save_tiny_model(root / "gen", seed=0, hidden_size=64, max_position_embeddings=32)
    (root / "long.jsonl").write_text("".join(json.dumps({"prompt": "q" * 60, "response": "abc"}) + "\n"
                                             for _ in range(4)))
    return root


def test_train_refuses_max_length_over_max_position_embeddings(short_model, capsys):
    from flythinker.cli import main

    argv = ["train", "--generator", str(short_model / "gen"), "--data", str(short_model / "long.jsonl"),
            "--output-dir", str(short_model / "o1"), "--max-steps", "1", "--no-progress", "--max-length", "64"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "flythinker: error: --max-length 64 is over the generator's max_position_embeddings=32", err


def test_train_never_runs_past_max_position_embeddings(short_model, capsys):
    """A 61-token example on a 32-position model: cut to 32 tokens, warned and reported, not trained past."""
    from flythinker.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["train", "--generator", str(short_model / "gen"), "--data", str(short_model / "long.jsonl"),
                "--output-dir", str(short_model / "o2"), "--max-steps", "1", "--batch-size", "4", "--no-progress",
                "--chat-template", "off"]
        with pytest.warns(UserWarning, match="truncated 4 of 4 examples"):
            assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "truncated 4 examples to fit the caps (tokens cut: prompts 128" in err, err


def test_trainer_refuses_a_batch_past_max_position_embeddings(short_model, tmp_path):
    """The library path (FlyThinkerTrainer with an uncapped collator) refuses instead of training past it."""
    from transformers import TrainingArguments

    from flythinker.modeling import FlyThinkerForCausalLM
    from flythinker.training import FlyThinkerCollator
    from flythinker.training.trainer import FlyThinkerTrainer

    gen = str(short_model / "gen")
    model = FlyThinkerForCausalLM.from_pair(gen, gen, projection="pad")
    tok = char_tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                             report_to="none", use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
                             save_strategy="no")
    trainer = FlyThinkerTrainer(model=model, args=args, train_dataset=[{"prompt": "q" * 60, "response": "abc"}] * 2,
                                data_collator=FlyThinkerCollator(tokenizer=tok))
    with pytest.raises(ValueError, match="input_ids of 64 tokens, over the generator's max_position_embeddings=32"):
        trainer.train()
