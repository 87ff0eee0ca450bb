"""build_views: split vs shared, chat template applied, oldest-first truncation reported, fallback template."""

import warnings

import pytest
import torch

from flythinker.persona import (
    FALLBACK_TEMPLATE,
    Memory,
    Persona,
    PersonaRecord,
    Query,
    Turn,
    build_views,
    render_chat,
)
from flythinker.persona.wordlevel import word_tokenizer


def _record(n_sessions=4, response="sure , here is a plan .", short=None):
    hist = []
    for i in range(n_sessions):
        hist += [Turn("user", f"old question number{i} about topic{i}"), Turn("assistant", f"old answer{i} .")]
    return PersonaRecord(
        record_id="r1", user_id="u1", query=Query(text="what should i do now ?", situation="exam week stress"),
        persona=Persona(profile="likes cats and long walks", short=short, traits={"secret": "hidden_trait_value"}),
        history=hist, memories=[Memory("mem first fact", label="fact"), Memory("mem second fact", label="fact")],
        response=response)


@pytest.fixture(scope="module")
def tok():
    r = _record(short="a student who likes cats")
    words = [t.text for t in r.history] + [m.value for m in r.memories] + [r.persona.profile, r.persona.short,
                                                                           r.query.text, r.query.situation,
                                                                           r.response, "helpful warm assistant"]
    return word_tokenizer(words)


def _text(tok, ids):
    return tok.decode(ids)


def test_split_views_content(tok):
    r = _record()
    v = build_views(r, tok, mode="split", system_prompt="helpful warm assistant")
    g, rs = _text(tok, v.generator_prompt_ids), _text(tok, v.reasoner_prompt_ids)
    # generator: the query only (no persona, no history, no situation)
    assert "what should i do now ?" in g
    for absent in ("cats", "old", "mem", "exam"):
        assert absent not in g
    # reasoner: persona, memories, every past turn, situation and query
    for present in ("cats", "mem first fact", "mem second fact", "question number0", "answer3", "exam week",
                    "what should i do now ?"):
        assert present in rs
    assert "hidden_trait_value" not in rs and "hidden_trait_value" not in g  # structured traits never rendered
    assert len(v.reasoner_prompt_ids) > 3 * len(v.generator_prompt_ids)
    assert v.mode == "split" and not v.truncated
    # both prompts end with the template's generation prompt; the response ends with eos
    gen_prompt = tok("<|im_start|> assistant", add_special_tokens=False)["input_ids"]
    assert v.generator_prompt_ids[-2:] == gen_prompt and v.reasoner_prompt_ids[-2:] == gen_prompt
    assert v.response_ids[-1] == tok.eos_token_id
    assert _text(tok, v.response_ids[:-1]) == "sure , here is a plan ."


def test_chat_template_applied_exactly(tok):
    r = _record()
    v = build_views(r, tok, mode="split", system_prompt="helpful warm assistant")
    msgs = [{"role": "system", "content": "helpful warm assistant"}, {"role": "user", "content": r.query.text}]
    expected = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert v.generator_prompt_ids == tok(expected, add_special_tokens=False)["input_ids"]


def test_short_persona_line_only_in_generator_view(tok):
    v = build_views(_record(short="a student who likes cats"), tok, system_prompt="helpful warm assistant")
    g = _text(tok, v.generator_prompt_ids)
    assert "a student who likes cats" in g and "long walks" not in g and "old" not in g


def test_shared_views_identical(tok):
    r = _record()
    v = build_views(r, tok, mode="shared", system_prompt="helpful warm assistant")
    s = build_views(r, tok, mode="split", system_prompt="helpful warm assistant")
    assert v.generator_prompt_ids == v.reasoner_prompt_ids == s.reasoner_prompt_ids
    assert v.response_ids == s.response_ids


def test_truncation_drops_oldest_turns_first(tok):
    r = _record(n_sessions=4)
    full = build_views(r, tok, system_prompt="")
    budget = len(full.reasoner_prompt_ids) - 5  # one turn has to go
    with pytest.warns(UserWarning, match="dropped 1 oldest turns"):
        v = build_views(r, tok, max_reasoner_tokens=budget, system_prompt="")
    assert len(v.reasoner_prompt_ids) <= budget and v.truncated_turns == 1 and v.truncated_memories == 0
    rs = _text(tok, v.reasoner_prompt_ids)
    assert "number0" not in rs and "answer0" in rs and "number3" in rs and "mem first fact" in rs
    assert v.generator_prompt_ids == full.generator_prompt_ids and v.response_ids == full.response_ids


def test_truncation_then_memories_then_persona(tok):
    r = _record(n_sessions=2)
    no_hist = PersonaRecord("x", "u", r.query, r.persona, [], [], r.response)
    base = len(build_views(no_hist, tok, system_prompt="").reasoner_prompt_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warn=False: no warning, fields still say it
        v = build_views(r, tok, max_reasoner_tokens=base - 2, system_prompt="", warn=False)
    assert v.truncated_turns == 4 and v.truncated_memories == 2 and v.truncated_persona_words > 0
    rs = _text(tok, v.reasoner_prompt_ids)
    assert "old" not in rs and "mem" not in rs and "walks" in rs and "likes" not in rs  # profile cut at the front
    with pytest.raises(ValueError, match="query alone needs"):
        build_views(r, tok, max_reasoner_tokens=5, system_prompt="")


def test_shared_uses_smaller_budget_and_generator_budget(tok):
    r = _record(short="a student who likes cats")
    full = build_views(r, tok, mode="shared", system_prompt="")
    v = build_views(r, tok, mode="shared", max_reasoner_tokens=10_000, max_generator_tokens=len(
        full.generator_prompt_ids) - 1, system_prompt="", warn=False)
    assert v.truncated_turns == 1 and v.generator_prompt_ids == v.reasoner_prompt_ids
    split = build_views(r, tok, system_prompt="")
    v = build_views(r, tok, max_generator_tokens=len(split.generator_prompt_ids) - 1, system_prompt="", warn=False)
    assert v.generator_persona_dropped and "cats" not in _text(tok, v.generator_prompt_ids)
    with pytest.raises(ValueError, match="generator's query view needs"):
        build_views(r, tok, max_generator_tokens=3, system_prompt="")


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="mode must be"):
        build_views(_record(), tok, mode="both")
    with pytest.raises(ValueError, match="max_reasoner_tokens must be a positive int"):
        build_views(_record(), tok, max_reasoner_tokens=0)


def test_no_response_gives_none(tok):
    assert build_views(_record(response=None), tok).response_ids is None


def test_fallback_template_without_chat_template():
    r = _record()
    t = word_tokenizer([x.text for x in r.history] + [r.query.text, r.response, "### System User Assistant"],
                       chat_template=False)
    assert not t.chat_template
    text = render_chat(t, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == FALLBACK_TEMPLATE.format(role="User", content="hi", end="") + "### Assistant\n"
    v = build_views(r, t, system_prompt="")
    assert _text(t, v.generator_prompt_ids) == "### User what should i do now ? ### Assistant"
    assert v.response_ids[-1] == t.eos_token_id


@pytest.mark.integration
def test_smollm2_chat_template():
    from flythinker.hub import load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    r = _record()
    v = build_views(r, tok, system_prompt="Be kind.")
    g = tok.decode(v.generator_prompt_ids)
    assert g == ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nwhat should i do now ?<|im_end|>\n"
                 "<|im_start|>assistant\n")
    rs = tok.decode(v.reasoner_prompt_ids)
    assert rs.startswith("<|im_start|>system\nBe kind.") and "old answer3 ." in rs and rs.endswith("assistant\n")
    assert tok.decode(v.response_ids) == "sure , here is a plan .<|im_end|>\n"
    budget = len(v.reasoner_prompt_ids) - 4
    t = build_views(r, tok, system_prompt="Be kind.", max_reasoner_tokens=budget, warn=False)
    assert len(t.reasoner_prompt_ids) <= budget and t.truncated_turns >= 1
    assert "number0" not in tok.decode(t.reasoner_prompt_ids)


class _CountingTokenizer:
    """The word tokenizer, counting how many texts it encodes (everything else passes through)."""

    def __init__(self, tok):
        self._tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("mode, caps", [  # unbudgeted sizes: generator 29 (38 with the short line), reasoner 124,
    ("split", (None, None)), ("split", (100, None)), ("split", (None, 40)),  # response 8 tokens
    ("split", (110, 45)), ("split", (2000, 2000)),
    ("shared", (None, None)), ("shared", (100, None)), ("shared", (None, 90)), ("shared", (110, 95)),
])
@pytest.mark.parametrize("short", [None, "a student who likes cats"])
def test_count_response_equals_two_pass_budget_and_tokenises_once(tok, mode, caps, short):
    """A sequence cap (prompt + response) becomes a prompt budget in one build: the same views as the two-pass
    recipe it replaces (build, measure the response, build again with cap - response), with fewer encodes."""
    r_cap, g_cap = caps
    r = _record(short=short)
    counting = _CountingTokenizer(tok)
    one = build_views(r, counting, mode=mode, max_reasoner_tokens=r_cap, max_generator_tokens=g_cap, warn=False,
                      count_response=True)
    single_calls, counting.calls = counting.calls, 0
    first = build_views(r, counting, mode=mode, warn=False)
    n = len(first.response_ids)
    two = first
    if r_cap is not None or g_cap is not None:
        two = build_views(r, counting, mode=mode, warn=False,
                          max_reasoner_tokens=None if r_cap is None else max(r_cap - n, 1),
                          max_generator_tokens=None if g_cap is None else max(g_cap - n, 1))
        assert single_calls < counting.calls
    assert one == two
    if r_cap is not None:
        assert len(one.reasoner_prompt_ids) + n <= r_cap
    if g_cap is not None:
        assert len(one.generator_prompt_ids) + n <= g_cap


def test_views_as_training_examples(tok):
    r = _record(short="a student who likes cats")
    split, shared = build_views(r, tok), build_views(r, tok, mode="shared")
    assert split.example() == {"generator_prompt": split.generator_prompt_ids,
                               "reasoner_prompt": split.reasoner_prompt_ids, "response": split.response_ids}
    assert split.example("shared") == {"prompt": split.reasoner_prompt_ids, "response": split.response_ids}
    assert split.example("generator") == {"prompt": split.generator_prompt_ids, "response": split.response_ids}
    assert shared.example() == {"prompt": shared.generator_prompt_ids, "response": shared.response_ids}
    with pytest.raises(ValueError, match="context must be"):
        split.example("both")
    with pytest.raises(ValueError, match="no response"):
        build_views(_record(response=None), tok).example()


def test_generate_inputs_left_pads_each_context(tok):
    from flythinker.persona import generate_inputs

    views = [build_views(_record(), tok, mode="split", system_prompt=s) for s in ("a", "a much longer system text")]
    split = generate_inputs(views, pad_id=0)
    for key, rows in (("input_ids", [v.generator_prompt_ids for v in views]),
                      ("reasoner_input_ids", [v.reasoner_prompt_ids for v in views])):
        ids = split[key]
        mask = split["attention_mask" if key == "input_ids" else "reasoner_attention_mask"]
        assert ids.shape == (2, max(map(len, rows))) and mask.sum(1).tolist() == [len(r) for r in rows]
        for row, m, want in zip(ids, mask, rows):  # left padding: the prompt ends at the last position
            assert row[m.bool()].tolist() == want and bool(m[-1]) and (row[~m.bool()] == 0).all()
    shared = generate_inputs(views, pad_id=0, context="shared")
    assert set(shared) == {"input_ids", "attention_mask"} and torch.equal(shared["input_ids"],
                                                                          split["reasoner_input_ids"])
    alone = generate_inputs(views, pad_id=0, context="generator")
    assert set(alone) == {"input_ids", "attention_mask"} and torch.equal(alone["input_ids"], split["input_ids"])
    with pytest.raises(ValueError, match="context must be"):
        generate_inputs(views, pad_id=0, context="full")
    with pytest.raises(ValueError, match="at least one"):
        generate_inputs([], pad_id=0)


def test_personaemp_protocol_view():
    # PersonaEmp protocol: the policy sees the memories and the query; persona, situation and the conversation
    # are for the judge. The broad view stays available by name.
    from pathlib import Path

    from flythinker.persona import load_records

    rec = load_records(Path(__file__).parent / "data" / "persona_personaemp.json")[0]
    rec.persona = Persona(profile="secretpersona words")
    rec.query.situation = "secretsituation"
    words = [t.text for t in rec.history] + [m.value for m in rec.memories] + [
        rec.query.text, rec.persona.profile, "secretsituation", "helpful warm assistant"]
    wt = word_tokenizer(words)
    for mode in ("split", "shared"):
        v = build_views(rec, wt, mode=mode)
        text = wt.decode(v.reasoner_prompt_ids)
        assert "Germany within 1 month" in text and "embassy" in text
        assert "secretpersona" not in text and "secretsituation" not in text and "regulations" not in text
        assert "secretpersona" not in wt.decode(v.generator_prompt_ids)
        full = wt.decode(build_views(rec, wt, mode=mode, view="full").reasoner_prompt_ids)
        assert "secretpersona" in full and "secretsituation" in full and "regulations" in full
    with pytest.raises(ValueError, match="view must be one of"):
        build_views(rec, wt, view="everything")
