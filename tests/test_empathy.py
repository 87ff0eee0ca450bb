"""Empathy judges: parsers and aggregation against the formulas, malformed outputs counted, the three data layouts,
and a tiny random HF LM judging end to end (generate and expected-score modes)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flythinker.empathy import (
    CallableJudgeBackend,
    EmpathyJudge,
    HFJudgeBackend,
    JudgeContext,
    JudgeParseError,
    aggregate,
    bystander_term,
    combine,
    get_rubric,
    judge_items,
    length_penalty,
    parse_criteria,
    parse_policy_output,
    parse_score,
    strip_think,
)

CTX = JudgeContext(query="My dog died yesterday and I can't stop crying.", persona="Quiet; values honesty.",
                   memories=["has a dog named Rex"], situation="grieving", item_id="x1")


# ---------------------------------------------------------------- parsers
@pytest.mark.parametrize("text,marker,lo,hi,want", [
    ("Reason: warm.\nScore: 4", "score_line", 1, 5, 4.0),
    ("The scale is 1-5. Score: 2 ... on reflection\nScore: 3", "score_line", 1, 5, 3.0),  # the last one wins
    ("score = **5**", "score_line", 1, 5, 5.0),
    ("Analysis: kind\nScores: \\boxed{4}", "boxed", 1, 5, 4.0),
    ("\\boxed{ 2 } then \\boxed{5}", "boxed", 1, 5, 5.0),
    ("1. 18\n2. 16\nTotal Score: 83/100", "total", 0, 100, 83.0),
    ("total score: 70", "total", 0, 100, 70.0),
])
def test_parse_score_golden(text, marker, lo, hi, want):
    assert parse_score(text, marker, lo, hi) == want


@pytest.mark.parametrize("text,marker,lo,hi", [
    ("I think it is good.", "score_line", 1, 5),       # no marker
    ("Score: 7", "score_line", 1, 5),                  # out of range
    ("Score: 0", "score_line", 1, 5),
    ("\\boxed{}", "boxed", 1, 5),
    ("Score: 4", "boxed", 1, 5),                        # wrong marker
    ("Total Score: 130/100", "total", 0, 100),
    ("", "total", 0, 100),
])
def test_parse_score_malformed_raises(text, marker, lo, hi):
    with pytest.raises(JudgeParseError):
        parse_score(text, marker, lo, hi)


def test_parse_policy_output():
    po = parse_policy_output("# Analysis\nShe feels alone.\n\n# Response\nThat sounds so hard.")
    assert (po.analysis, po.response, po.format_ok) == ("She feels alone.", "That sounds so hard.", True)
    po = parse_policy_output("## analysis: x\n### RESPONSE: y")
    assert (po.analysis, po.response) == ("x", "y")
    bad = parse_policy_output("Just a reply without headings.")
    assert (bad.analysis, bad.response, bad.format_ok) == ("", "", False)
    plain = parse_policy_output("  Just a reply.  ", with_analysis=False)
    assert (plain.response, plain.format_ok) == ("Just a reply.", True)
    assert strip_think("<think>hmm</think> Hello") == "Hello"
    assert parse_criteria("Specific Criteria:\n1. a\n2. b\nAnalysis: z") == "1. a\n2. b"
    with pytest.raises(JudgeParseError):
        parse_criteria("   ")


# ---------------------------------------------------------------- aggregation (formulas of the module docstring)
def test_aggregate_golden():
    s = [0.55, 0.77, 0.66]
    assert aggregate(s, "mean") == pytest.approx(sum(s) / 3)
    assert aggregate(s, "harmonic") == pytest.approx(3 / (1 / 0.55 + 1 / 0.77 + 1 / 0.66))
    assert aggregate(s, "harmonic") == pytest.approx(0.648, abs=5e-4)  # PereGRM's figure: 0.65
    assert aggregate(s, "geometric") == pytest.approx((0.55 * 0.77 * 0.66) ** (1 / 3))
    assert aggregate([0.0, 1.0, 1.0], "harmonic") == 0.0  # any zero -> 0
    assert bystander_term(76, 0.5) == pytest.approx(-0.12)
    assert bystander_term(100, 0.5) == 0.0 and bystander_term(0, 0.1) == pytest.approx(-0.1)
    assert length_penalty(800) == pytest.approx(-0.032) and length_penalty(700) == 0.0
    # PERM's reward: H + 0.5 (B/100 - 1) - 0.001 max(0, len - 768)
    r = combine({"a": 4, "b": 5, "c": 3}, {"a": 5, "b": 5, "c": 5}, "harmonic", bystander=80, bystander_coef=0.5,
                penalty=length_penalty(778))
    assert r == pytest.approx(3 / (5 / 4 + 1 + 5 / 3) + 0.5 * (0.8 - 1) - 0.01)
    with pytest.raises(ValueError):
        aggregate([1.2], "mean")
    with pytest.raises(ValueError):
        aggregate([0.5], "median")
    with pytest.raises(ValueError):
        bystander_term(101, 0.5)


# ---------------------------------------------------------------- judge logic with a callable backend
def _scripted(scores: dict[str, str]):
    """A callable judge answering per dimension (read from the prompt) with a fixed text."""
    calls = []

    def fn(messages):
        user = messages[-1]["content"] if messages[-1]["role"] == "user" else messages[-2]["content"]
        calls.append(user)
        if "Specific Criteria" in user:
            return scores.get("criteria", "Specific Criteria:\n1. name the loss")
        if "Total Score" in user:
            return scores["bystander"]
        for name in ("resonation", "expression", "reception"):
            if f"Dimension: {name}" in user:
                return scores[name]
        raise AssertionError(user[:200])

    fn.calls = calls
    return fn


def test_perm_judge_reward_and_analysis_routing():
    fn = _scripted({"resonation": "Reason: r\nScore: 4", "expression": "Score: 5", "reception": "Score: 2",
                    "bystander": "Total Score: 60/100"})
    judge = EmpathyJudge(get_rubric("perm"), CallableJudgeBackend(fn), policy_format="analysis_response")
    (r,) = judge.score(["# Analysis\nANALYSIS-TEXT\n# Response\nRESPONSE-TEXT"], [CTX])
    assert r.scores == {"resonation": 4, "expression": 5, "reception": 2, "bystander": 60}
    assert r.reward == pytest.approx(3 / (5 / 4 + 1 + 5 / 2) + 0.5 * (0.6 - 1))
    res_prompt = next(c for c in fn.calls if "Dimension: resonation" in c)
    exp_prompt = next(c for c in fn.calls if "Dimension: expression" in c)
    assert "ANALYSIS-TEXT" in res_prompt and "RESPONSE-TEXT" not in res_prompt
    assert "RESPONSE-TEXT" in exp_prompt and "ANALYSIS-TEXT" not in exp_prompt
    by_prompt = next(c for c in fn.calls if "Total Score" in c)
    assert "values honesty" in by_prompt and "grieving" in by_prompt  # PERM's bystander sees persona + scenario


def test_malformed_outputs_are_counted_not_replaced():
    fn = _scripted({"resonation": "Score: 4", "expression": "it was nice", "reception": "Score: 9",
                    "bystander": "no idea"})
    judge = EmpathyJudge(get_rubric("perm", analysis=False), CallableJudgeBackend(fn))
    (r,) = judge.score(["I'm sorry."], [CTX])
    assert r.reward is None
    assert set(r.failures) == {"expression", "reception", "bystander"}
    assert r.scores["expression"] is None and r.scores["resonation"] == 4
    rep = judge.report()
    assert rep["parse_failures"] == 3 and rep["score_calls"] == 4 and rep["items_without_reward"] == 1
    assert rep["parse_failure_rate"] == pytest.approx(0.75)
    # the fallback is explicit, and counted
    fb = EmpathyJudge(get_rubric("perm", analysis=False), CallableJudgeBackend(fn),
                      fallback={"dimension": 3.0, "bystander": 80.0})
    (r2,) = fb.score(["I'm sorry."], [CTX])
    assert sorted(r2.fallbacks) == ["bystander", "expression", "reception"]
    assert r2.reward == pytest.approx(3 / (5 / 4 + 5 / 3 + 5 / 3) + 0.5 * (0.8 - 1))
    assert fb.report()["fallbacks"] == 3
    with pytest.raises(ValueError):
        EmpathyJudge(get_rubric("perm"), CallableJudgeBackend(fn), fallback={"resonation": 3})


def test_policy_format_failure_counted():
    fn = _scripted({"resonation": "Score: 4", "expression": "Score: 4", "reception": "Score: 4",
                    "bystander": "Total Score: 90/100"})
    judge = EmpathyJudge(get_rubric("perm"), CallableJudgeBackend(fn), policy_format="analysis_response")
    (r,) = judge.score(["no headings here"], [CTX])
    assert r.format_ok is False and r.reward is None and "format" in r.failures
    assert judge.report()["format_failures"] == 1


def test_peregrm_one_call_trials_and_fixed_criteria():
    answers = iter(["Specific Criteria: x\nAnalysis: y\nScores: \\boxed{4}", "Analysis: y\nScores: \\boxed{2}"] * 100)
    seen = []

    def fn(messages):
        user = messages[-1]["content"]
        seen.append(user)
        if "JSON object" in user:
            return '{"a": 10, "b": 10, "c": 10, "d": 10, "e": 10}'
        if "Before any reply is judged" in user:
            return "Specific Criteria:\n1. CRIT-FOR-REX (100%): names the loss"
        return next(answers)

    judge = EmpathyJudge(get_rubric("peregrm"), CallableJudgeBackend(fn), trials=2, temperature=0.7)
    (r,) = judge.score(["I'm so sorry about Rex."], [CTX])
    assert r.scores["resonation"] == 3.0  # mean of the two trials (4, 2)
    assert r.reward == pytest.approx(0.6 + 0.5 * (0.5 - 1))
    assert judge.report().get("criteria_calls", 0) == 0  # criteria, analysis and score in one call
    one_call = next(s for s in seen if "Dimension: reception" in s)
    assert "Specific Criteria" in one_call and "I'm so sorry about Rex." in one_call and "has a dog" in one_call
    bystander = next(s for s in seen if "JSON object" in s)
    assert "values honesty" not in bystander and CTX.query in bystander  # PereGRM's bystander: message + reply
    # fixed criteria: written once per query and cached, or taken from the context
    fixed = EmpathyJudge(get_rubric("peregrm", dynamic_criteria=False), CallableJudgeBackend(fn))
    fixed.score(["ok"], [CTX])
    fixed.score(["ok again"], [CTX])
    assert fixed.report()["criteria_calls"] == 3
    assert any("CRIT-FOR-REX" in s and "Dimension: reception" in s for s in seen)
    ctx = JudgeContext(query=CTX.query, criteria={"resonation": "A", "expression": "B", "reception": "C"})
    given = EmpathyJudge(get_rubric("peregrm", dynamic_criteria=False), CallableJudgeBackend(fn))
    given.score(["ok"], [ctx])
    assert given.report().get("criteria_calls", 0) == 0
    with pytest.raises(ValueError, match="temperature"):
        EmpathyJudge(get_rubric("peregrm"), CallableJudgeBackend(fn), trials=4, temperature=0.0)
    # PereGRM's evaluation reports the arithmetic mean of the dimensions
    ev = EmpathyJudge(get_rubric("peregrm", dynamic_criteria=False, aggregation="mean"),
                      CallableJudgeBackend(lambda m: '{"a": 20, "b": 20, "c": 20, "d": 20, "e": 20}'
                                           if "JSON object" in m[-1]["content"]
                                           else "Score: \\boxed{1}" if "resonation" in m[-1]["content"]
                                           else "Score: \\boxed{4}"))
    (r,) = ev.score(["ok"], [ctx])
    assert r.reward == pytest.approx((1 / 5 + 4 / 5 + 4 / 5) / 3)


# ---------------------------------------------------------------- data layouts for `flythinker judge`
def test_judge_items_three_layouts(tmp_path):
    ours = tmp_path / "ours.jsonl"
    ours.write_text(json.dumps({"record_id": "r1", "user_id": "u1", "query": {"text": "I failed."},
                                "persona": {"profile": "shy"}, "response": "That hurts."}) + "\n")
    perm = tmp_path / "perm.jsonl"
    perm.write_text(json.dumps({"id": 7, "persona": {"identity": "a nurse"}, "scenario": "night shift",
                                "dialogue": ["I'm exhausted.", "Rest first.", "But I can't.",
                                             "Then let's plan one small break."]}) + "\n")
    pemp = tmp_path / "pemp.json"
    pemp.write_text(json.dumps([{"session_id": "s1", "persona": {"persona_profile": "anxious"},
                                 "conversation": [{"role": "user", "text": "Hi, exams soon."},
                                                  {"role": "assistant", "text": "You can do it."}],
                                 "extracted_memory": [{"label": "x", "value": "student"}],
                                 "queries": [{"query": "q1"}, {"query": "q2"}]}]))
    (c1, r1), = judge_items(ours)
    assert (c1.query, c1.persona, r1) == ("I failed.", "shy", "That hurts.")
    (c2, r2), = judge_items(perm)
    assert (c2.query, r2, c2.situation) == ("But I can't.", "Then let's plan one small break.", "night shift")
    items = judge_items(pemp)
    assert len(items) == 1 and items[0][1] == "You can do it." and items[0][0].query == "Hi, exams soon."
    assert items[0][0].memories == ["student"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"record_id": "r2", "user_id": "u", "query": {"text": "hi"}}) + "\n")
    with pytest.raises(ValueError, match="no response"):
        judge_items(bad)


# ---------------------------------------------------------------- a tiny HF LM judge end to end
@pytest.fixture(scope="module")
def tiny_judge():
    from transformers import AutoModelForCausalLM

    from flythinker.empathy.prompts import SYSTEM
    from flythinker.persona.wordlevel import word_tokenizer
    from flythinker.training.toy import tiny_config

    words = [SYSTEM, CTX.query, CTX.persona, "Score : Reason Total / 100 \\ boxed { } Analysis Specific Criteria",
             " ".join(str(i) for i in range(0, 101))]
    tok = word_tokenizer(words)
    cfg = tiny_config("llama", hidden_size=32, vocab_size=len(tok), num_hidden_layers=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return HFJudgeBackend(model, tok, batch_size=3)


def test_tiny_lm_judge_expected_mode(tiny_judge):
    # a random tiny LM puts a few % of its probability on the score tokens, under the default min_score_mass (the
    # weighted-mean arithmetic is what this test checks; the threshold: tests/test_hostile_input.py)
    judge = EmpathyJudge(get_rubric("perm", analysis=False), tiny_judge, mode="expected", min_score_mass=0.0)
    results = judge.score(["I am so sorry .", "ok", "Score : 5"], [CTX] * 3)
    for r in results:
        for d in ("resonation", "expression", "reception"):
            assert 1.0 <= r.scores[d] <= 5.0
        assert 0.0 <= r.scores["bystander"] <= 100.0
        assert r.reward is not None and -0.5 <= r.reward <= 1.0
    # the expected score is the probability-weighted mean over the score tokens of the next-token distribution
    from flythinker.empathy.prompts import dimension_prompt

    p = dimension_prompt(get_rubric("perm").dimension("expression"), CTX, "ok", expected=True)
    (val, mass), = tiny_judge.expected_scores([p])
    batch = tiny_judge._batch([tiny_judge._text(p)])
    with torch.no_grad():
        probs = torch.softmax(tiny_judge.model(**batch).logits[0, -1].float(), -1)
    ids = tiny_judge.score_token_ids(1, 5)
    pm = {v: float(probs[i].sum().detach()) for v, i in ids.items()}
    assert val == pytest.approx(sum(v * m for v, m in pm.items()) / sum(pm.values()), rel=1e-5)
    assert mass == pytest.approx(sum(pm.values()), rel=1e-5) and 0 < mass < 1
    assert judge.report()["mean_score_token_mass"] > 0


def test_tiny_lm_judge_generate_mode_counts_failures(tiny_judge):
    # a random tiny LM almost never writes "Score: N": every failure must be counted, none silently scored
    judge = EmpathyJudge(get_rubric("perm", analysis=False), tiny_judge, mode="generate", max_new_tokens=6)
    results = judge.score(["I am so sorry ."] * 2, [CTX] * 2)
    rep = judge.report()
    n_fail = sum(len([k for k in r.failures if k != "format"]) for r in results)
    assert rep["score_calls"] == 8 and rep["parse_failures"] == n_fail
    for r in results:
        assert (r.reward is None) == bool(r.failures)
        for d, v in r.scores.items():
            assert (v is None) == (d in r.failures)
    sampled = EmpathyJudge(get_rubric("peregrm"), tiny_judge, trials=2, temperature=1.0, max_new_tokens=4)
    sampled.score(["ok"], [CTX])
    assert sampled.report()["score_calls"] == 7 and "criteria_calls" not in sampled.report()  # bystander: once


def test_expected_mode_needs_single_token_scores(tiny_judge):
    with pytest.raises(ValueError, match="single token"):
        tiny_judge.score_token_ids(1, 1000)
    with pytest.raises(NotImplementedError):
        CallableJudgeBackend(lambda m: "x").expected_scores([])
    assert math.isfinite(tiny_judge.expected_scores(
        [__import__("flythinker.empathy.prompts", fromlist=["x"]).bystander_prompt(
            get_rubric("perm").bystander, CTX, "ok", expected=True)])[0][0])
