"""Parsers: the policy's "analysis + response" output, and the judge's score markers.

Every judge parser returns a number or raises :class:`JudgeParseError` with the reason; the caller counts failures
(nothing is silently replaced: a fallback score is an explicit option of :class:`flythinker.empathy.EmpathyJudge`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# "# Analysis ... # Response ..." (PERM's policy format; headings case-insensitive, any number of '#').
_POLICY = re.compile(r"#+\s*analysis\s*:?\s*(?P<analysis>.*?)\s*#+\s*response\s*:?\s*(?P<response>.*)\Z",
                     re.IGNORECASE | re.DOTALL)
_SCORE_LINE = re.compile(r"score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{\s*(-?\d+(?:\.\d+)?)\s*\}")
_TOTAL = re.compile(r"total\s*score\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*100)?", re.IGNORECASE)


class JudgeParseError(ValueError):
    """A judge output without a readable, in-range score."""


@dataclass
class PolicyOutput:
    """A policy completion split into its ``analysis`` and ``response`` parts; ``format_ok`` False when the
    ``# Analysis`` / ``# Response`` headings were expected but not found (both parts are then empty)."""

    analysis: str
    response: str
    format_ok: bool


def parse_policy_output(text: str, with_analysis: bool = True) -> PolicyOutput:
    """Split ``text``. ``with_analysis=False`` (plain-response mode): the whole text is the response."""
    if not with_analysis:
        return PolicyOutput("", text.strip(), True)
    m = _POLICY.search(text)
    if not m:
        return PolicyOutput("", "", False)
    return PolicyOutput(m.group("analysis").strip(), m.group("response").strip(), True)


def strip_think(text: str) -> str:
    """The text after the last ``</think>`` (PereGRM judges the response after a reasoning block), else all."""
    i = text.rfind("</think>")
    return text[i + len("</think>"):].strip() if i >= 0 else text.strip()


def _last(pattern: re.Pattern, text: str, what: str) -> float:
    found = pattern.findall(text)
    if not found:
        raise JudgeParseError(f"no {what} in judge output: {text[-120:]!r}")
    return float(found[-1])  # the final verdict: judges often quote the scale before answering


def parse_score(text: str, marker: str, lo: int, hi: int) -> float:
    """The score in ``text`` for ``marker`` (``score_line``: ``Score: N``; ``boxed``: ``\\boxed{N}``; ``total``:
    ``Total Score: N[/100]``), the last occurrence, checked to lie in ``[lo, hi]``."""
    pattern, what = {"score_line": (_SCORE_LINE, "'Score: N' line"), "boxed": (_BOXED, "\\boxed{N}"),
                     "total": (_TOTAL, "'Total Score: N/100'")}.get(marker, (None, None))
    if pattern is None:
        raise ValueError(f"unknown marker {marker!r}")
    v = _last(pattern, text, what)
    if not lo <= v <= hi:
        raise JudgeParseError(f"score {v:g} outside [{lo}, {hi}]")
    return v


_CRITERIA = re.compile(r"specific\s+criteria\s*:?\s*(.*?)(?:\n\s*(?:analysis|scores?)\s*:|\Z)",
                       re.IGNORECASE | re.DOTALL)


def parse_criteria(text: str) -> str:
    """The criteria a PereGRM criteria call wrote (the text after ``Specific Criteria:``, up to ``Analysis:`` /
    ``Score:``, else the whole text stripped). Raises :class:`JudgeParseError` on empty output."""
    m = _CRITERIA.search(text)
    out = (m.group(1) if m else text).strip()
    if not out:
        raise JudgeParseError("empty criteria")
    return out


__all__ = ["JudgeParseError", "PolicyOutput", "parse_criteria", "parse_policy_output", "parse_score", "strip_think"]
