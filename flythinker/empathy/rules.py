"""Scoring rules: how a judge's text becomes a number, and what a failure becomes.

Two named rule sets, chosen with one option (``EmpathyJudge(rules=...)``, ``flythinker judge --rules``,
``flythinker rl --rules``):

``"authors"``
    What each rubric's own repository does with the same judge output (read from PERM ``perm/utils.py`` and
    PersonalizedEmpathy ``train/verl/utils/reward_score/peregrm_reward.py`` / ``evaluation/utils.py``; the code
    here is ours):

    - PERM ``Score:``: the *first* line that starts with ``Score:`` (no leading spaces or markdown); the text
      after the colon must be an integer (``4``, ``0``, ``7`` and ``-1`` are read as such; ``4/5``, ``4.5``,
      ``4 (good)`` make the output unparsed; later ``Score:`` lines are never looked at). A failure becomes the
      batch mean of that dimension (all failures in a batch: an error, as in the authors' code).
    - PERM bystander: the first line matching ``total score: N / M`` (case-insensitive, any ``M``: ``18/20`` is
      read as 18); no ``/`` (``Total Score: 78``) is unparsed -> batch mean.
    - PERM aggregation: ``harmonic`` and ``geometric`` skip dimensions scored ``<= 0``; ``mean`` does not; no
      range check (``Score: 7`` counts as 7/5).
    - PereGRM ``\\boxed{}``: the *first* ``\\boxed{digits-and-dots}`` (``\\boxed{ 4 }`` does not match), divided by
      5 and capped at 1; no match -> 0.6 (i.e. 3 on the 1-5 scale); each of the K trials falls back on its own.
    - PereGRM bystander: a JSON object (inside a ```` ```json ```` fence or bare) whose values are summed, /100,
      capped at 1; anything else -> 0.8 (80 of 100).
    - PereGRM aggregation: harmonic mean, 0 if any dimension is 0.

``"strict"``
    Today's parsing made safe: the last score marker wins (judges quote the scale before answering); markdown
    bold is allowed; a denominator must equal the scale's maximum (``Score: 4/5`` is 4, ``Score: 2/10`` and
    ``Total Score: 18/20`` are refused); out-of-scale values are refused; the bystander may answer with the
    ``Total Score`` line or a JSON object of five 0-20 parts. A failure is counted and the item has no reward
    (``None``) -- never a silent 0; :class:`flythinker.rl.JudgeReward` turns it into the group's mean reward
    (advantage 0) for TRL.

Every parser returns a number or raises :class:`~flythinker.empathy.parse.JudgeParseError` (the reason).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass


class JudgeParseError(ValueError):
    """A judge output without a readable, in-range score."""


RULES = ("authors", "strict")

# PereGRM's fixed fallbacks on the raw scales (0.6 of 5, 0.8 of 100).
PEREGRM_DIMENSION_FALLBACK = 3.0
PEREGRM_BYSTANDER_FALLBACK = 80.0


def check_rules(rules: str) -> str:
    if rules not in RULES:
        raise ValueError(f"rules must be one of {RULES}, got {rules!r}")
    return rules


# ---------------------------------------------------------------- authors: PERM

def perm_score_authors(text: str | None) -> float:
    """PERM's ``Score: N``: the first line beginning ``Score:``; its value must be an integer."""
    if not isinstance(text, str):
        raise JudgeParseError("no judge output")
    for line in text.splitlines():
        if line.startswith("Score:"):
            try:
                return float(int(line.split(":")[1].strip()))  # Python's int(): "4", "-1", "+3"; not "4/5"
            except ValueError:
                raise JudgeParseError(f"first 'Score:' line is not an integer: {line!r}") from None
    raise JudgeParseError("no line starting with 'Score:'")


_PERM_TOTAL = re.compile(r"total score:\s*(\d+)\s*/\s*\d+")


def perm_total_authors(text: str | None) -> float:
    """PERM's bystander: the first line with ``total score: N / M`` (lower-cased; ``M`` unchecked)."""
    if not isinstance(text, str) or not text:
        raise JudgeParseError("no judge output")
    for line in text.splitlines():
        m = _PERM_TOTAL.search(line.lower()) if line.strip() else None
        if m:
            return float(int(m.group(1)))
    raise JudgeParseError("no 'Total Score: N / M' line")


# ---------------------------------------------------------------- authors: PereGRM

_PEREGRM_BOXED = re.compile(r"\\boxed\{([\d.]+)\}")


def peregrm_boxed_authors(text: str | None) -> float:
    """PereGRM's ``\\boxed{N}``: the first match of digits and dots, capped at 5 (their ``min(N/5, 1)``).

    A match that is not a number (``\\boxed{1.2.3}``) raises in the authors' code; here it is a parse failure
    (then the 0.6 fallback)."""
    if not isinstance(text, str):
        raise JudgeParseError("no judge output")
    m = _PEREGRM_BOXED.search(text)
    if not m:
        raise JudgeParseError("no \\boxed{N} (digits and dots only)")
    try:
        value = float(m.group(1))
    except ValueError:
        raise JudgeParseError(f"\\boxed{{{m.group(1)}}} is not a number") from None
    return min(value, 5.0)


def peregrm_bystander_authors(text: str | None) -> float:
    """PereGRM's bystander: a JSON object (fenced or bare) whose values are summed, capped at 100."""
    if not isinstance(text, str) or not text:
        raise JudgeParseError("no judge output")
    if "```" in text:
        text = text.split("```json")[-1].split("```")[0].strip()
    try:
        obj = json.loads(text, strict=False)
        total = sum(float(v) for v in obj.values())
    except (ValueError, TypeError, AttributeError) as e:
        raise JudgeParseError(f"bystander output is not a JSON object of numbers ({type(e).__name__})") from None
    return min(total, 100.0)


# ---------------------------------------------------------------- strict

_NUM = r"(-?\d+(?:\.\d+)?)"
_STRICT_SCORE = re.compile(r"score\s*\**\s*[:=]\s*\**\s*" + _NUM + r"\s*(?:/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)
_STRICT_BOXED = re.compile(r"\\boxed\{\s*" + _NUM + r"\s*(?:/\s*(\d+(?:\.\d+)?))?\s*\}")
_STRICT_TOTAL = re.compile(r"total\s*score\s*\**\s*[:=]?\s*\**\s*" + _NUM + r"\s*(?:/\s*(\d+(?:\.\d+)?))?",
                           re.IGNORECASE)


def _strict_last(pattern: re.Pattern, text: str, what: str, lo: float, hi: float) -> float:
    found = pattern.findall(text) if isinstance(text, str) else []
    if not found:
        raise JudgeParseError(f"no {what} in judge output: {str(text)[-120:]!r}")
    value, denom = found[-1]
    if denom and float(denom) != hi:
        raise JudgeParseError(f"score {value}/{denom} is not on the {lo:g}-{hi:g} scale")
    v = float(value)
    if not lo <= v <= hi:
        raise JudgeParseError(f"score {v:g} outside [{lo:g}, {hi:g}]")
    return v


def strict_score(text: str, marker: str, lo: float, hi: float) -> float:
    """``marker``: ``score_line`` (``Score: N``), ``boxed`` (``\\boxed{N}``) or ``total`` (``Total Score: N``,
    or a JSON object of five 0-20 parts). The last occurrence; denominator and range checked."""
    if marker == "score_line":
        return _strict_last(_STRICT_SCORE, text, "'Score: N' line", lo, hi)
    if marker == "boxed":
        return _strict_last(_STRICT_BOXED, text, "\\boxed{N}", lo, hi)
    if marker == "total":
        try:
            return _strict_last(_STRICT_TOTAL, text, "'Total Score: N/100'", lo, hi)
        except JudgeParseError as first:
            try:
                return strict_bystander_json(text)
            except JudgeParseError:
                raise first from None
    raise ValueError(f"unknown marker {marker!r}")


_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)


def strict_bystander_json(text: str) -> float:
    """The last JSON object in ``text`` with five numeric parts, each in [0, 20]: their sum."""
    for chunk in reversed(_JSON_OBJECT.findall(text or "")):
        try:
            obj = json.loads(chunk)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        vals = list(obj.values())
        if len(vals) != 5 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            raise JudgeParseError(f"bystander JSON needs five numeric parts, got {obj!r:.120}")
        if not all(0 <= v <= 20 for v in vals):
            raise JudgeParseError(f"bystander JSON parts must lie in [0, 20], got {vals}")
        return float(sum(vals))
    raise JudgeParseError("no bystander JSON object")


# ---------------------------------------------------------------- dispatch

def read_score(text: str, rules: str, rubric: str, marker: str, lo: float, hi: float) -> float:
    """The score in one judge output under ``rules`` for ``rubric`` (``perm``/``peregrm``) and ``marker``."""
    if rules == "strict":
        return strict_score(text, marker, lo, hi)
    if rubric == "perm":
        return perm_total_authors(text) if marker == "total" else perm_score_authors(text)
    return peregrm_bystander_authors(text) if marker == "total" else peregrm_boxed_authors(text)


def batch_mean_fill(values: Sequence[float | None], what: str) -> list[float]:
    """PERM: missing values become the mean of the others in the batch (all missing: an error)."""
    got = [v for v in values if v is not None]
    if not got:
        raise JudgeParseError(f"every {what} score in the batch failed to parse (PERM's rule has no value to "
                              "substitute); check the judge and its prompt")
    mean = sum(got) / len(got)
    return [mean if v is None else v for v in values]


def aggregate_authors(scores: dict[str, float], his: dict[str, float], how: str, rubric: str) -> float:
    """The authors' aggregation on raw scores (no range check). PERM's harmonic/geometric skip dimensions
    scored ``<= 0`` (0 when none is left); PereGRM's harmonic is 0 when any dimension is ``<= 0``."""
    s = [scores[d] / his[d] for d in scores]
    if how == "mean":
        return sum(s) / len(s)
    if rubric == "peregrm" and how == "harmonic":
        return 0.0 if any(v <= 0 for v in s) else len(s) / sum(1.0 / v for v in s)
    pos = [v for v in s if v > 0]
    if not pos:
        return 0.0
    if how == "harmonic":
        return len(pos) / sum(1.0 / v for v in pos)
    if how == "geometric":
        prod = 1.0
        for v in pos:
            prod *= v
        return prod ** (1.0 / len(pos))
    raise ValueError(f"unknown aggregation {how!r}")


# ---------------------------------------------------------------- judge sampling settings per role

@dataclass(frozen=True)
class JudgeSettings:
    """How one judge role samples. ``top_p`` / ``max_new_tokens`` ``None``: not sent (the server's default; a
    local judge uses top-p 1 and :data:`LOCAL_MAX_NEW_TOKENS`). ``trials``: independent samples per dimension."""

    temperature: float = 0.0
    top_p: float | None = None
    max_new_tokens: int | None = None
    trials: int = 1


LOCAL_MAX_NEW_TOKENS = 1024
ROLES = ("criteria", "training", "evaluation")

# The papers' settings (PERM perm/api_call.py + grpo.py; PersonalizedEmpathy train_llm.sh, peregrm_reward.py,
# evaluation/eval.py, prepare_criteria.py).
AUTHORS_SETTINGS = {
    "perm": {"training": JudgeSettings(0.3, 0.9, 1024, 1), "evaluation": JudgeSettings(0.3, 0.9, 1024, 1),
             "criteria": JudgeSettings(0.3, 0.9, 1024, 1)},
    "peregrm": {"training": JudgeSettings(0.3, None, None, 4), "evaluation": JudgeSettings(0.3, None, 2048, 1),
                "criteria": JudgeSettings(0.2, None, 2048, 1)},
}
STRICT_SETTINGS = JudgeSettings(0.0, None, 512, 1)


def default_settings(rules: str, rubric: str, role: str) -> JudgeSettings:
    """The judge settings for ``role`` (``criteria``/``training``/``evaluation``) under ``rules``."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if check_rules(rules) == "strict":
        return STRICT_SETTINGS
    return AUTHORS_SETTINGS[rubric][role]


__all__ = ["AUTHORS_SETTINGS", "LOCAL_MAX_NEW_TOKENS", "PEREGRM_BYSTANDER_FALLBACK", "PEREGRM_DIMENSION_FALLBACK",
           "ROLES", "RULES", "STRICT_SETTINGS", "JudgeSettings", "aggregate_authors", "batch_mean_fill",
           "check_rules", "default_settings", "peregrm_boxed_authors", "peregrm_bystander_authors",
           "perm_score_authors", "perm_total_authors", "read_score", "strict_bystander_json", "strict_score"]
