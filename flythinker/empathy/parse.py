"""Parsers: the policy's "analysis + response" output, and the judge's score markers.

Every judge parser returns a number or raises :class:`JudgeParseError` with the reason; the caller counts failures
(what a failure becomes is decided by the scoring rules, :mod:`.rules`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .rules import JudgeParseError, strict_score

# "# Analysis ... # Response ..." (PERM's policy format; headings case-insensitive, any number of '#').
_POLICY = re.compile(r"#+\s*analysis\s*:?\s*(?P<analysis>.*?)\s*#+\s*response\s*:?\s*(?P<response>.*)\Z",
                     re.IGNORECASE | re.DOTALL)


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


def parse_score(text: str, marker: str, lo: int, hi: int) -> float:
    """The score in ``text`` for ``marker`` (``score_line``: ``Score: N``; ``boxed``: ``\\boxed{N}``; ``total``:
    ``Total Score: N[/100]`` or a JSON object of five 0-20 parts) under the ``strict`` rules: the last
    occurrence, a denominator equal to ``hi``, the value in ``[lo, hi]`` (:func:`.rules.strict_score`)."""

    return strict_score(text, marker, lo, hi)


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
