"""FlyThinkerCollator: masking, padding sides, EOS, truncation, split context, errors."""

import pytest
import torch

from flythinker.training.collator import IGNORE_INDEX, FlyThinkerCollator
from flythinker.training.toy import char_tokenizer

X = IGNORE_INDEX  # short, for the expected label rows


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_shared_context_left_padding_ids():
    c = FlyThinkerCollator(pad_token_id=0, eos_token_id=2)
    b = c([([5, 6, 7], [8, 9]), ([5], [10])])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2], [0, 0, 0, 5, 10, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert b["labels"].tolist() == [[X, X, X, 8, 9, 2], [X, X, X, X, 10, 2]]
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long for v in b.values())


def test_right_padding_and_no_eos():
    c = FlyThinkerCollator(pad_token_id=0, eos_token_id=2, padding_side="right", add_eos=False)
    b = c([{"prompt": [5, 6], "response": [8]}, {"prompt": [5], "response": [9, 9, 9]}])
    assert b["input_ids"].tolist() == [[5, 6, 8, 0], [5, 9, 9, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b["labels"].tolist() == [[X, X, 8, X], [X, 9, 9, 9]]


def test_eos_not_doubled():
    c = FlyThinkerCollator(pad_token_id=0, eos_token_id=2)
    b = c([([5], [8, 2])])
    assert b["input_ids"].tolist() == [[5, 8, 2]]


def test_strings_and_chat_messages(tok):
    c = FlyThinkerCollator(tokenizer=tok)
    b = c([{"prompt": "ab=", "response": "ba"}])
    ids = tok("ab=")["input_ids"] + tok("ba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert b["input_ids"][0].tolist() == ids
    assert tok.decode([t for t in b["labels"][0].tolist() if t != IGNORE_INDEX], skip_special_tokens=True) == "ba"
    # chat messages (and chat_template=True for plain strings) go through the template
    msgs = [{"role": "user", "content": "hi"}]
    b1 = c([{"prompt": msgs, "response": "yo"}])
    b2 = FlyThinkerCollator(tokenizer=tok, chat_template=True)([{"prompt": "hi", "response": "yo"}])
    assert torch.equal(b1["input_ids"], b2["input_ids"])
    assert tok.decode(b1["input_ids"][0]).startswith("u:hi\na:yo")


def test_split_context_alignment_left_padding():
    c = FlyThinkerCollator(pad_token_id=0, eos_token_id=2)
    b = c([
        {"generator_prompt": [5], "reasoner_prompt": [6, 6, 6, 6], "response": [8, 9]},
        {"generator_prompt": [5, 5, 5], "reasoner_prompt": [6], "response": [10]},
    ])
    assert b["input_ids"].tolist() == [[0, 5, 8, 9, 2], [5, 5, 5, 10, 2]]
    assert b["reasoner_input_ids"].tolist() == [[6, 6, 6, 6, 8, 9, 2], [0, 0, 0, 0, 6, 10, 2]]
    assert b["reasoner_attention_mask"].tolist() == [[1] * 7, [0, 0, 0, 0, 1, 1, 1]]
    # left padding: each row's response occupies the same trailing columns in both views
    L, Lr = b["input_ids"].shape[1], b["reasoner_input_ids"].shape[1]
    for row in range(2):
        n = int((b["labels"][row] != IGNORE_INDEX).sum())
        assert torch.equal(b["input_ids"][row, L - n :], b["reasoner_input_ids"][row, Lr - n :])


def test_truncation_drops_oldest_prompt_tokens_and_keeps_views_aligned():
    c = FlyThinkerCollator(pad_token_id=0, eos_token_id=2, max_length=5, reasoner_max_length=4)
    with pytest.warns(UserWarning, match="truncated 1 of 1 examples"):
        b = c([{"generator_prompt": [11, 12, 13, 14], "reasoner_prompt": [21, 22, 23], "response": [8, 9]}])
    # reasoner caps the response at 3 tokens (>= 1 prompt token): 8, 9, eos fits; prompts lose their oldest tokens
    assert b["input_ids"].tolist() == [[13, 14, 8, 9, 2]]
    assert b["reasoner_input_ids"].tolist() == [[23, 8, 9, 2]]
    # a response longer than the room is cut on the right, identically in both views, and gets no EOS
    b = c([{"generator_prompt": [11], "reasoner_prompt": [21], "response": [8, 9, 10, 11, 12]}])
    assert b["input_ids"].tolist() == [[11, 8, 9, 10]]
    assert b["reasoner_input_ids"].tolist() == [[21, 8, 9, 10]]


def test_truncation_is_counted_and_warned_once():
    """Cuts are never silent: the first batch that is cut warns with its counts, every later cut is counted in
    `collator.truncation`."""
    import warnings

    c = FlyThinkerCollator(pad_token_id=0, eos_token_id=2, max_length=6, reasoner_max_length=5)
    fits = {"generator_prompt": [11], "reasoner_prompt": [21], "response": [8]}
    long_prompts = {"generator_prompt": [11, 12, 13, 14, 15], "reasoner_prompt": [21, 22, 23, 24], "response": [8]}
    long_response = {"generator_prompt": [11], "reasoner_prompt": [21], "response": [8, 9, 10, 11, 12, 13]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c([fits, fits])  # nothing cut: no warning, nothing counted
    assert set(c.truncation.values()) == {0}
    with pytest.warns(UserWarning) as record:
        c([fits, long_prompts, long_response])
    assert len(record) == 1
    msg = str(record[0].message)
    assert "truncated 2 of 3 examples" in msg and "max_length=6, reasoner_max_length=5" in msg
    # long_prompts: 5 + 2 (response + eos) > 6 -> 1 oldest token cut; reasoner 4 + 2 > 5 -> 1; long_response: room 4
    # (reasoner cap 5 - 1 prompt token), 6 tokens + eos -> 3 cut
    assert "1 generator prompts lost 1 oldest tokens" in msg and "3 tokens" in msg
    assert c.truncation == {"examples": 2, "prompts": 1, "prompt_tokens": 1, "reasoner_prompts": 1,
                            "reasoner_prompt_tokens": 1, "responses": 1, "response_tokens": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per collator: later cuts are counted only
        c([long_prompts, long_prompts])
    assert c.truncation["examples"] == 4 and c.truncation["prompt_tokens"] == 3
    # an EOS that no longer fits is a cut too (the model would never learn to stop on that example)
    c2 = FlyThinkerCollator(pad_token_id=0, eos_token_id=2, max_length=4)
    with pytest.warns(UserWarning, match="1 responses were cut on the right by 1 tokens"):
        b = c2([([5], [6, 7, 8])])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8]]


def test_pad_to_multiple_of():
    b = FlyThinkerCollator(pad_token_id=0, eos_token_id=2, pad_to_multiple_of=4)([([5], [6])])
    assert b["input_ids"].tolist() == [[0, 5, 6, 2]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 6, 2]]


@pytest.mark.parametrize(
    "features, match",
    [
        ([{"prompt": [1]}], "no 'response'"),
        ([{"question": [1], "response": [2]}], "needs 'prompt'"),
        ([{"generator_prompt": [1], "response": [2]}], "missing"),
        ([([1], [])], "empty response"),
        ([([1], [2]), ([1], [2], [3])], "mixes"),
        ([("text", [2])], "no tokenizer"),
        ([([1, -4], [2])], "negative"),
        ([([], [], [2])], "non-empty"),
        ([], "empty batch"),
    ],
)
def test_bad_input_errors(features, match):
    with pytest.raises(ValueError, match=match):
        FlyThinkerCollator(pad_token_id=0, eos_token_id=2)(features)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="padding_side"):
        FlyThinkerCollator(pad_token_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="pad token"):
        FlyThinkerCollator()
    with pytest.raises(ValueError, match="max_length"):
        FlyThinkerCollator(pad_token_id=0, eos_token_id=2, max_length=1)
    with pytest.raises(TypeError):
        FlyThinkerCollator(pad_token_id=0, eos_token_id=2)([([1.5], [2])])
    with pytest.raises(TypeError):
        FlyThinkerCollator(pad_token_id=0, eos_token_id=2)([42])


def test_persona_views_fit_the_caps_without_losing_the_chat_header(tmp_path):
    """`max_length` caps prompt + response: persona views get the budget the response leaves, so history is dropped
    from the oldest end and every example still starts with the chat template's header (the collator never has
    to cut it off)."""
    from flythinker.persona import save_records
    from flythinker.persona.empathy_dataset import make_persona_empathy
    from flythinker.persona.wordlevel import word_tokenizer
    from flythinker.training.data import load_examples

    recs = make_persona_empathy(n_users=12, queries_per_user=2, seed=0)["train"][:6]
    save_records(recs, tmp_path / "p.jsonl")
    texts = [t.text for r in recs for t in r.history] + [r.query.text for r in recs] + [r.response for r in recs]
    tok = word_tokenizer(texts)
    full, kind = load_examples(tmp_path / "p.jsonl", tokenizer=tok, context="split")
    assert kind == "views"
    cap_g, cap_r = 120, 200
    capped, _ = load_examples(tmp_path / "p.jsonl", tokenizer=tok, context="split", max_generator_tokens=cap_g,
                              max_reasoner_tokens=cap_r)
    assert any(len(f["reasoner_prompt"]) + len(f["response"]) > cap_r for f in full)  # the cap really bites
    for f, c in zip(full, capped, strict=True):
        assert c["response"] == f["response"]
        assert len(c["reasoner_prompt"]) + len(c["response"]) <= cap_r
        assert len(c["generator_prompt"]) + len(c["response"]) <= cap_g
        head = f["reasoner_prompt"][:5]
        assert c["reasoner_prompt"][:5] == head  # the header survives
