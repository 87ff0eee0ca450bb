"""Judge prompts (our own wording, after PERM arXiv 2601.10532 and PereGRM arXiv 2606.00728).

A :class:`JudgePrompt` is chat messages for one judge call plus what to read back. In ``expected`` mode the
judge is asked for the number only, and the prompt carries an assistant prefix (``"Score:"`` or
``"Score: \\boxed{"``) after which a local judge's next-token distribution over the score tokens gives the
probability-weighted score (G-Eval style) without any free text to parse. The 0-100 bystander has no one-token
score, so in expected mode it is asked for an overall 1-5 rating over the same five parts, mapped to
``100 * (s - 1) / 4``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .records import JudgeContext
from .rubrics import BYSTANDER_PARTS, Dimension

MAX_HISTORY_TURNS = 6  # the judge sees the latest turns only (prompt cost; a 135M judge loses long contexts)
SYSTEM = ("You are an experienced counsellor and a careful, strict evaluator of empathetic conversations. "
          "Judge only what is written; do not reward length or flattery.")


@dataclass
class JudgePrompt:
    """One judge call: ``messages`` (system + user), ``prefix`` (assistant text to continue from, expected mode),
    and how to read the answer (``marker``, ``lo``/``hi``; ``kind`` is ``"score"`` or ``"criteria"``)."""

    messages: list[dict[str, str]]
    dimension: str
    kind: str = "score"
    marker: str = "score_line"
    lo: int = 1
    hi: int = 5
    prefix: str = ""


def _context_block(ctx: JudgeContext, with_persona: bool = True, with_memories: bool = True) -> str:
    parts = []
    if with_persona and ctx.persona.strip():
        parts.append(f"About the person:\n{ctx.persona.strip()}")
    if with_memories and ctx.memories:
        parts.append("What is known about them from before:\n" + "\n".join(f"- {m}" for m in ctx.memories))
    if ctx.history:
        turns = ctx.history[-MAX_HISTORY_TURNS:]
        parts.append("Earlier conversation with them (oldest first):\n" + "\n".join(
            f"{'Person' if role == 'user' else 'Assistant'}: {text}" for role, text in turns))
    if ctx.situation.strip():
        parts.append(f"Their situation:\n{ctx.situation.strip()}")
    parts.append(f"What they said:\n{ctx.query.strip()}")
    return "\n\n".join(parts)


def _levels(dim: Dimension) -> str:
    return "\n".join(f"{k} - {v}" for k, v in sorted(dim.levels.items()))


def _answer_format(dim: Dimension, expected: bool) -> tuple[str, str]:
    """(format instruction, assistant prefix)."""
    if dim.marker == "boxed":
        if expected:
            return f"Answer with the score only, as \\boxed{{N}} with N from {dim.lo} to {dim.hi}.", "Score: \\boxed{"
        return ("First write 'Analysis:' and a short analysis, then the final line 'Score: \\boxed{N}' with N an "
                f"integer from {dim.lo} to {dim.hi}."), ""
    if expected:
        return f"Answer with the score only: an integer from {dim.lo} to {dim.hi}.", "Score:"
    return (f"Write 'Reason:' and one or two sentences, then the final line 'Score: N' with N an integer from "
            f"{dim.lo} to {dim.hi}."), ""


def dimension_prompt(dim: Dimension, ctx: JudgeContext, text: str, expected: bool = False,
                     criteria: str | None = None) -> JudgePrompt:
    """Score ``text`` (the response, or the analysis for an ``analysis`` dimension) on ``dim`` (1-5)."""
    what = "the supporter's private analysis of the person" if dim.reads == "analysis" else "the reply"
    fmt, prefix = _answer_format(dim, expected)
    crit = f"\n\nCriteria for this person (use them to decide the score):\n{criteria.strip()}" if criteria else ""
    user = (f"{_context_block(ctx)}\n\n---\nThe text to judge ({what}):\n{text.strip() or '(empty)'}\n---\n\n"
            f"Dimension: {dim.name} ({dim.perspective}'s view). {dim.question}\nScale:\n{_levels(dim)}"
            f"{crit}\n\n{fmt}")
    return JudgePrompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], dim.name,
                       marker="boxed" if dim.marker == "boxed" else "score_line", lo=dim.lo, hi=dim.hi,
                       prefix=prefix)


def bystander_prompt(dim: Dimension, ctx: JudgeContext, response: str, expected: bool = False) -> JudgePrompt:
    """The bystander sees only what was said and the reply (no persona), scores five parts 0-20 each (sum 0-100),
    or in ``expected`` mode gives one overall 1-5 rating (mapped to 0-100 by the judge)."""
    parts = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(BYSTANDER_PARTS))
    head = (f"A person wrote:\n{ctx.query.strip()}\n\n---\nThe reply:\n{response.strip() or '(empty)'}\n---\n\n"
            f"You are a neutral bystander reading this exchange. Consider these five parts:\n{parts}\n\n")
    if expected:
        user = head + "Give one overall rating of the reply: an integer from 1 (very poor) to 5 (excellent), only."
        return JudgePrompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                           dim.name, marker="score_line", lo=1, hi=5, prefix="Score:")
    user = head + ("Give each part a score from 0 to 20, then the final line 'Total Score: X/100' where X is "
                   "their sum.")
    return JudgePrompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], dim.name,
                       marker="total", lo=0, hi=100)


def criteria_prompt(dim: Dimension, ctx: JudgeContext) -> JudgePrompt:
    """PereGRM's first call: write 3-5 criteria specific to this person for ``dim`` (from persona, memories,
    situation and what they said), without rewarding mere mentions of remembered facts."""
    user = (f"{_context_block(ctx)}\n\nBefore any reply is judged, write what a good reply must do for THIS "
            f"person on the dimension '{dim.name}' ({dim.question}). Base the criteria on their traits, needs and "
            "situation; do not reward merely repeating remembered facts. Write 'Specific Criteria:' followed by "
            "3 to 5 short numbered criteria.")
    return JudgePrompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], dim.name,
                       kind="criteria", marker="", lo=0, hi=0)


__all__ = ["MAX_HISTORY_TURNS", "SYSTEM", "JudgePrompt", "bystander_prompt", "criteria_prompt", "dimension_prompt"]
