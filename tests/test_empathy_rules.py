"""Scoring rules on hand-written judge outputs.

Expected values under ``authors`` are what the authors' code does with the same text (PERM ``perm/utils.py``:
``extract_score``, ``calculate_standby_reward``, ``replace_none_with_mean``, ``calculate_final_scores``;
PersonalizedEmpathy ``train/verl/utils/reward_score/peregrm_reward.py``: ``extract_boxed_score``,
``calculate_standby_reward``, ``compute_score``), worked out by hand from reading it. ``None`` = unparsed
(PERM: batch mean; PereGRM: its fixed fallback).
"""

from __future__ import annotations

import pytest

from flythinker.empathy import CallableJudgeBackend, EmpathyJudge, JudgeContext, get_rubric
from flythinker.empathy.backends import JudgeBackend
from flythinker.empathy.parse import JudgeParseError
from flythinker.empathy.rules import read_score
from flythinker.rl.rewards import JudgeReward, fill_group_means

FIVE = '{"Content Effectiveness": 15, "Logical Structure & Clarity": 16, "Communication Efficiency": 14, ' \
       '"Objectivity & Neutrality": 18, "Information Accuracy & Verifiability": 17}'

# (rubric, marker, judge output, authors, strict)
TABLE = [
    # PERM "Score:" lines on the 1-5 scale
    ("perm", "score_line", "Reason: warm and specific.\nScore: 4", 4.0, 4.0),
    ("perm", "score_line", "Reason: ok\nScore: 4/5", None, 4.0),
    ("perm", "score_line", "Reason: ok\n**Score:** 4", None, 4.0),
    ("perm", "score_line", "Reason: ok\nScore: 4.5", None, 4.5),
    ("perm", "score_line", "Score: 3\nOn reflection...\nScore: 5", 3.0, 5.0),  # first vs last
    ("perm", "score_line", "Reason: harmful\nScore: 0", 0.0, None),
    ("perm", "score_line", "Reason: ok\nScore: 2/10", None, None),  # a 1-10 answer on a 1-5 scale
    ("perm", "score_line", "Reason: great\nScore: 7", 7.0, None),  # out of scale
    ("perm", "score_line", "Reason: ok\n  Score: 4", None, 4.0),  # PERM needs the line to start with it
    ("perm", "score_line", "Score: 4 (solid)\nScore: 5", None, 5.0),  # PERM stops at the first line
    ("perm", "score_line", "I liked it.", None, None),
    # PERM bystander "Total Score"
    ("perm", "total", "1. Content: 15 / 20\n3. Total Score: 78 / 100", 78.0, 78.0),
    ("perm", "total", "Total Score: 78", None, 78.0),
    ("perm", "total", "Total Score: 18/20", 18.0, None),  # never 18/100 under strict
    ("perm", "total", "**Total Score:** 78/100", None, 78.0),
    ("perm", "total", "Total Score: 130/100", 130.0, None),
    ("perm", "total", "Total Score: 60/100\nTotal Score: 90/100", 60.0, 90.0),
    ("perm", "total", FIVE, None, 80.0),
    # PereGRM \boxed{} on the 1-5 scale (authors: capped at 5, i.e. min(x/5, 1))
    ("peregrm", "boxed", "Analysis: good\nScores: \\boxed{4}", 4.0, 4.0),
    ("peregrm", "boxed", "Scores: \\boxed{ 4 }", None, 4.0),
    ("peregrm", "boxed", "\\boxed{3} ... on reflection \\boxed{5}", 3.0, 5.0),
    ("peregrm", "boxed", "Scores: \\boxed{4.5}", 4.5, 4.5),
    ("peregrm", "boxed", "Scores: \\boxed{7}", 5.0, None),
    ("peregrm", "boxed", "Scores: \\boxed{0}", 0.0, None),
    ("peregrm", "boxed", "Scores: \\boxed{4/5}", None, 4.0),
    ("peregrm", "boxed", "Scores: \\boxed{2/10}", None, None),
    ("peregrm", "boxed", "Score: 4", None, None),
    # PereGRM bystander: a JSON object of five parts, summed (authors: capped at 100)
    ("peregrm", "total", FIVE, 80.0, 80.0),
    ("peregrm", "total", "```json\n" + FIVE + "\n```", 80.0, 80.0),
    ("peregrm", "total", "```\n" + FIVE + "\n```", None, 80.0),  # an untagged fence defeats the authors' split
    ("peregrm", "total", '{"a": 30, "b": 30, "c": 30, "d": 30, "e": 30}', 100.0, None),
    ("peregrm", "total", '{"a": "15", "b": 16, "c": 14, "d": 18, "e": 17}', 80.0, None),
    ("peregrm", "total", "Total Score: 78/100", None, 78.0),
    ("peregrm", "total", "[15, 16, 14, 18, 17]", None, None),
]


@pytest.mark.parametrize("rubric,marker,text,authors,strict", TABLE)
def test_rules_table(rubric, marker, text, authors, strict):
    lo, hi = (0, 100) if marker == "total" else (1, 5)
    for rules, want in (("authors", authors), ("strict", strict)):
        if want is None:
            with pytest.raises(JudgeParseError):
                read_score(text, rules, rubric, marker, lo, hi)
        else:
            assert read_score(text, rules, rubric, marker, lo, hi) == pytest.approx(want), rules


CTX = JudgeContext(query="My visa might not come in time.", persona="A parent; hides worry from the kids.",
                   memories=["Must travel to Germany within 1 month"], situation="Waiting on an embassy.")


def _by_dimension(answers: dict[str, list[str]]):
    """A callable judge that answers per dimension, cycling through that dimension's list of outputs."""
    counters = {k: 0 for k in answers}

    def fn(messages):
        user = messages[-1]["content"]
        key = "bystander" if ("neutral bystander" in user) else next(
            n for n in ("resonation", "expression", "reception") if f"Dimension: {n}" in user)
        out = answers[key][counters[key] % len(answers[key])]
        counters[key] += 1
        return out

    return fn


def test_perm_authors_batch_mean_and_harmonic_skip():
    fn = _by_dimension({"resonation": ["Score: 0", "Score: 4", "Score: 2"],
                        "expression": ["Score: 4", "Score: 4/5", "Score: 2"],
                        "reception": ["Score: 5", "Score: 5", "**Score:** 5"],
                        "bystander": ["Total Score: 80/100", "Total Score: 80", "Total Score: 50/100"]})
    judge = EmpathyJudge(get_rubric("perm", analysis=False), CallableJudgeBackend(fn), rules="authors")
    r = judge.score(["a", "b", "c"], [CTX] * 3)
    # item 0: resonation 0 is skipped by PERM's harmonic mean: 2 / (5/4 + 5/5)
    assert r[0].scores["resonation"] == 0.0
    assert r[0].reward == pytest.approx(2 / (5 / 4 + 1) + 0.5 * (0.8 - 1))
    # item 1: expression unparsed -> batch mean (4 + 2) / 2 = 3; bystander "78" without /100 -> mean(80, 50)
    assert r[1].scores["expression"] == 3.0 and r[1].scores["bystander"] == 65.0
    assert sorted(r[1].fallbacks) == ["bystander", "expression"]
    assert r[1].reward == pytest.approx(3 / (5 / 4 + 5 / 3 + 1) + 0.5 * (0.65 - 1))
    # item 2: "**Score:** 5" unparsed -> mean(5, 5)
    assert r[2].scores["reception"] == 5.0
    rep = judge.report()
    assert rep["parse_failures"] == 3 and rep["fallbacks"] == 3 and rep["items_without_reward"] == 0
    # the same outputs under strict: item 0 (Score: 0) has no reward; item 1 parses "4/5" but not "Total Score: 80"
    # ... which strict reads as 80 (no denominator): all parse except "Score: 0"
    strict = EmpathyJudge(get_rubric("perm", analysis=False), CallableJudgeBackend(fn), rules="strict")
    s = strict.score(["a", "b", "c"], [CTX] * 3)
    assert s[0].reward is None and "resonation" in s[0].failures
    assert s[1].scores["expression"] == 4.0 and s[2].scores["reception"] == 5.0
    assert strict.report()["items_without_reward"] == 1


def test_perm_authors_whole_batch_unparsed_is_an_error():
    fn = _by_dimension({"resonation": ["Score: 4/5"], "expression": ["Score: 4"], "reception": ["Score: 4"],
                        "bystander": ["Total Score: 80/100"]})
    judge = EmpathyJudge(get_rubric("perm", analysis=False), CallableJudgeBackend(fn), rules="authors")
    with pytest.raises(JudgeParseError, match="every resonation score"):
        judge.score(["a", "b"], [CTX] * 2)


def test_perm_authors_judges_empty_parts_without_headings():
    seen = []

    def fn(messages):
        seen.append(messages[-1]["content"])
        return "Total Score: 50/100" if "neutral bystander" in seen[-1] else "Score: 2"

    judge = EmpathyJudge(get_rubric("perm"), CallableJudgeBackend(fn), rules="authors",
                         policy_format="analysis_response")
    (r,) = judge.score(["no headings at all"], [CTX])
    assert r.format_ok is False and r.reward is not None  # PERM judges the empty analysis/response
    assert all("no headings at all" not in s for s in seen) and any("(empty)" in s for s in seen)


def test_peregrm_authors_trials_fallbacks_and_zero():
    fn = _by_dimension({"resonation": ["Scores: \\boxed{4}", "Scores: \\boxed{ 4 }", "\\boxed{5} \\boxed{1}", "none"],
                        "expression": ["Scores: \\boxed{0}"],
                        "reception": ["Scores: \\boxed{5}"],
                        "bystander": ["no json"]})
    judge = EmpathyJudge(get_rubric("peregrm"), CallableJudgeBackend(fn), rules="authors")
    assert judge.trials == 4 and judge.temperature == 0.3
    (r,) = judge.score(["reply"], [CTX])
    assert r.scores["resonation"] == pytest.approx((4 + 3 + 5 + 3) / 4)  # each failed trial -> 0.6 * 5
    assert r.scores["bystander"] == 80.0  # 0.8 fallback
    # a dimension at 0 zeroes PereGRM's harmonic mean; the bystander term remains
    assert r.reward == pytest.approx(0.0 + 0.5 * (0.8 - 1))
    assert judge.report()["fallbacks"] == 3


class _Recording(JudgeBackend):
    name = "recording"
    model_name = "rec"

    def __init__(self):
        self.calls = []

    def generate(self, prompts, *, n=1, temperature=0.0, top_p=None, max_new_tokens=256):
        self.calls.append({"n": n, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                           "kinds": {p.kind for p in prompts}})
        return [["Specific Criteria:\n1. c (100%): x" if p.kind == "criteria" else
                 ('{"a": 10, "b": 10, "c": 10, "d": 10, "e": 10}' if "JSON object" in p.messages[-1]["content"]
                  else "Total Score: 50 / 100" if p.marker == "total" else "Score: 4\nScores: \\boxed{4}")
                 ] * n for p in prompts]


@pytest.mark.parametrize("rubric,role,want,criteria", [
    ("perm", "training", {"n": 1, "temperature": 0.3, "top_p": 0.9, "max_new_tokens": 1024}, None),
    ("peregrm", "training", {"n": 4, "temperature": 0.3, "top_p": None, "max_new_tokens": None}, None),
    ("peregrm", "evaluation", {"n": 1, "temperature": 0.3, "top_p": None, "max_new_tokens": 2048},
     {"n": 1, "temperature": 0.2, "top_p": None, "max_new_tokens": 2048}),
])
def test_authors_judge_settings_per_role(rubric, role, want, criteria):
    backend = _Recording()
    rub = (get_rubric(rubric, dynamic_criteria=role == "training") if rubric == "peregrm"
           else get_rubric(rubric, analysis=False))
    judge = EmpathyJudge(rub, backend, rules="authors", role=role)
    judge.score(["reply"], [CTX])
    score_calls = [c for c in backend.calls if "score" in c["kinds"]]
    assert {k: score_calls[0][k] for k in want} == want
    if criteria:
        crit = next(c for c in backend.calls if "criteria" in c["kinds"])
        assert {k: crit[k] for k in criteria} == criteria
    if rubric == "peregrm" and role == "evaluation":
        assert judge.use_bystander is False  # PereGRM's evaluation has no bystander term
    strict = EmpathyJudge(rub, _Recording(), rules="strict", role=role)
    assert strict.settings.temperature == 0.0 and strict.settings.trials == 1


def test_rule_options_are_checked():
    fn = _by_dimension({})
    with pytest.raises(ValueError, match="rules must be"):
        EmpathyJudge(get_rubric("perm"), CallableJudgeBackend(fn), rules="lenient")
    with pytest.raises(ValueError, match="strict"):
        EmpathyJudge(get_rubric("perm"), CallableJudgeBackend(fn), rules="authors", fallback={"dimension": 3})
    with pytest.raises(ValueError, match="LengthPenalty"):
        EmpathyJudge(get_rubric("perm"), CallableJudgeBackend(fn), rules="authors", length_coef=0.001)


def test_strict_failure_becomes_group_mean_for_trl():
    assert fill_group_means([1.0, None, 0.5, None, None, 0.2], ["p", "p", "p", "q", "q", "q"]) == \
        [1.0, 0.75, 0.5, 0.2, 0.2, 0.2]
    assert fill_group_means([None, None], ["p", "p"]) == [None, None]
    fn = _by_dimension({"resonation": ["Score: 4", "Score: 9"], "expression": ["Score: 4"],
                        "reception": ["Score: 4"], "bystander": ["Total Score: 100/100"]})
    reward = JudgeReward(EmpathyJudge(get_rubric("perm", analysis=False), CallableJudgeBackend(fn), rules="strict"))
    logged = {}
    vals = reward(completions=["a", "b"], prompts=["p", "p"], query=[CTX.query] * 2,
                  log_metric=lambda k, v: logged.__setitem__(k, v))
    assert vals[0] == pytest.approx(0.8) and vals[1] == vals[0]  # the failed one gets its group's mean
    assert logged == {"judge/failed_completions": 1.0}
