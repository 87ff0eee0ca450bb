"""Empathy judges: PERM- and PereGRM-style rubrics as data, prompts, parsers, aggregation and judge backends.

    from flythinker.empathy import EmpathyJudge, HFJudgeBackend, JudgeContext, get_rubric
    judge = EmpathyJudge(get_rubric("perm", analysis=False), HFJudgeBackend(), mode="expected")
    [r.reward for r in judge.score(["I'm so sorry..."], [JudgeContext(query="My dog died.")])]

- ``rubrics``: :func:`perm_rubric` (resonation on the analysis part of a ``# Analysis / # Response`` reply
  with ``policy_format="analysis_response"``, on the response with ``analysis=False``; expression, reception;
  bystander 0-100),
  :func:`peregrm_rubric` (dynamic or fixed per-user criteria, ``\\boxed{x}``).
- ``prompts``: judge prompts in our own words (after arXiv 2601.10532 and 2606.00728).
- ``parse``: the policy's "# Analysis / # Response" format; ``Score: N``, ``\\boxed{N}``, ``Total Score: N/100``.
- ``aggregate``: mean / harmonic / geometric, the bystander term ``coef * (B/100 - 1)``, PERM's length penalty.
- ``backends``: local HF LM (batched; expected-score mode), OpenAI-compatible HTTP (``openai`` client), a callable.
- ``rules``: the scoring rules by name: ``authors`` (each rubric's repository) and ``strict`` (checked scales).
- ``judge``: :class:`EmpathyJudge` (counted failures; what they become is the rules' choice).
- ``server``: a small OpenAI-compatible server for a local HF model (``python -m flythinker.empathy.server``).
"""

from .aggregate import aggregate, bystander_term, combine, length_penalty
from .backends import CallableJudgeBackend, HFJudgeBackend, JudgeBackend, JudgeBackendError, OpenAIJudgeBackend
from .judge import MIN_SCORE_MASS, EmpathyJudge, JudgeResult
from .parse import JudgeParseError, PolicyOutput, parse_criteria, parse_policy_output, parse_score, strip_think
from .prompts import JudgePrompt, bystander_prompt, criteria_prompt, dimension_prompt, dynamic_criteria_prompt
from .records import JudgeContext, context_from_record, contexts_from_columns, judge_items
from .rubrics import RUBRICS, Dimension, Rubric, get_rubric, peregrm_rubric, perm_rubric
from .rules import RULES, JudgeSettings, default_settings, read_score

__all__ = [
    "MIN_SCORE_MASS", "RUBRICS", "RULES", "CallableJudgeBackend", "Dimension", "EmpathyJudge", "HFJudgeBackend",
    "JudgeBackend", "JudgeBackendError", "JudgeContext", "JudgeParseError", "JudgePrompt", "JudgeResult",
    "JudgeSettings", "OpenAIJudgeBackend", "PolicyOutput", "Rubric", "aggregate", "bystander_prompt",
    "bystander_term", "combine", "context_from_record", "contexts_from_columns", "criteria_prompt",
    "default_settings", "dimension_prompt", "dynamic_criteria_prompt", "get_rubric", "judge_items",
    "length_penalty", "parse_criteria", "parse_policy_output", "parse_score", "peregrm_rubric", "perm_rubric",
    "read_score", "strip_think",
]
