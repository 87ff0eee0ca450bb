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


def _rubric_block(dim: Dimension) -> str:
    """Definition, checks and levels of ``dim`` as the judge reads them."""
    parts = [f"Dimension: {dim.name} ({dim.perspective}'s view). {dim.question}"]
    if dim.definition:
        parts.append(f"Definition: {dim.definition}")
    if dim.checks:
        parts.append("Checks (take the person's place):\n" + "\n".join(f"- {c}" for c in dim.checks))
    if dim.levels:
        parts.append(f"Scale:\n{_levels(dim)}")
    return "\n".join(parts)


def _answer_format(dim: Dimension, expected: bool) -> tuple[str, str]:
    """(format instruction, assistant prefix)."""
    if dim.marker == "boxed":
        if expected:
            return f"Answer with the score only, as \\boxed{{N}} with N from {dim.lo} to {dim.hi}.", "Score: \\boxed{"
        return ("First write 'Analysis:' and a short analysis, then the final line 'Scores: \\boxed{N}' with N an "
                f"integer from {dim.lo} to {dim.hi}."), ""
    if expected:
        return f"Answer with the score only: an integer from {dim.lo} to {dim.hi}.", "Score:"
    return (f"Write 'Reason:' and one or two sentences, then the final line 'Score: N' with N an integer from "
            f"{dim.lo} to {dim.hi}."), ""


def _messages(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def dimension_prompt(dim: Dimension, ctx: JudgeContext, text: str, expected: bool = False,
                     criteria: str | None = None) -> JudgePrompt:
    """Score ``text`` (the response, or the analysis for an ``analysis`` dimension) on ``dim`` (1-5), with the
    person's persona, memories, situation and message in view; ``criteria``: fixed criteria for this query."""
    what = "the supporter's private analysis of the person" if dim.reads == "analysis" else "the reply"
    fmt, prefix = _answer_format(dim, expected)
    crit = (f"\n\nFixed criteria written beforehand for this person and query (score against them; do not "
            f"write new ones):\n{criteria.strip()}") if criteria else ""
    user = (f"{_context_block(ctx)}\n\n---\nThe text to judge ({what}):\n{text.strip() or '(empty)'}\n---\n\n"
            f"{_rubric_block(dim)}{crit}\n\n{fmt}")
    return JudgePrompt(_messages(user), dim.name, marker="boxed" if dim.marker == "boxed" else "score_line",
                       lo=dim.lo, hi=dim.hi, prefix=prefix)


def dynamic_criteria_prompt(dim: Dimension, ctx: JudgeContext, response: str) -> JudgePrompt:
    """PereGRM training: ONE call in which the judge writes criteria specific to this person for ``dim``, analyses
    the reply against them step by step, and gives the score as ``\\boxed{N}`` (1 = meets none, 3 = some,
    5 = all). Sampled ``trials`` times independently (K = 4 in the authors' script)."""
    user = (f"{_context_block(ctx)}\n\n---\nThe reply:\n{response.strip() or '(empty)'}\n---\n\n"
            f"{_rubric_block(dim)}\n\nFirst derive concrete criteria for THIS person, situation and message on "
            f"this dimension, grounded in general emotional intelligence and using the memories and persona as "
            "evidence of what would work for them. Then analyse the reply against your criteria, step by step and "
            "as strictly as you can. Score 1 if the reply meets none of the criteria, 3 if it meets some, 5 if it "
            "meets all.\nOutput three lines:\nSpecific Criteria: <your criteria>\nAnalysis: <your analysis>\n"
            f"Scores: \\boxed{{N}} with N from {dim.lo} to {dim.hi}")
    return JudgePrompt(_messages(user), dim.name, marker="boxed", lo=dim.lo, hi=dim.hi)


_BYSTANDER_KEYS = ("Content Effectiveness", "Logical Structure & Clarity", "Communication Efficiency",
                   "Objectivity & Neutrality", "Information Accuracy & Verifiability")


def bystander_prompt(dim: Dimension, ctx: JudgeContext, response: str, expected: bool = False,
                     style: str = "perm") -> JudgePrompt:
    """The bystander: five parts 0-20 each (sum 0-100) from a neutral, unemotional standpoint.

    ``style="perm"``: sees the situation and the persona besides the message and the reply; answers one line per
    part and ``Total Score: X / 100``. ``style="peregrm"``: sees only the message and the reply; answers a JSON
    object of the five parts. ``expected``: one overall 1-5 rating (mapped to 0-100 by the judge)."""
    parts = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(BYSTANDER_PARTS))
    seen = ""
    if style == "perm":
        if ctx.situation.strip():
            seen += f"Situation:\n{ctx.situation.strip()}\n\n"
        if ctx.persona.strip():
            seen += f"About the person:\n{ctx.persona.strip()}\n\n"
    head = (f"{seen}A person wrote:\n{ctx.query.strip()}\n\n---\nThe reply:\n{response.strip() or '(empty)'}\n"
            f"---\n\nYou are a neutral bystander judging content, reasoning, efficiency, objectivity and accuracy "
            f"only; emotional expressiveness alone earns nothing and padding costs efficiency. Consider these five "
            f"parts:\n{parts}\n\n")
    if expected:
        user = head + "Give one overall rating of the reply: an integer from 1 (very poor) to 5 (excellent), only."
        return JudgePrompt(_messages(user), dim.name, marker="score_line", lo=1, hi=5, prefix="Score:")
    if style == "peregrm":
        keys = ", ".join(f'"{k}": <0-20>' for k in _BYSTANDER_KEYS)
        user = head + f"Score each part independently from 0 to 20 and answer with this JSON object only: {{{keys}}}"
    else:
        user = head + ("Score each part independently from 0 to 20, one line per part with a short reason, then "
                       "the final line 'Total Score: X / 100' where X is their sum.")
    return JudgePrompt(_messages(user), dim.name, marker="total", lo=0, hi=100)


def criteria_prompt(dim: Dimension, ctx: JudgeContext) -> JudgePrompt:
    """Evaluation criteria for one query (PersonaEmp's protocol: written once, stored, reused by every judged
    model): 4 to 6 weighted criteria (weights summing to 100%) specific to this person on ``dim``, with general
    emotional intelligence as the baseline and persona/memories as the refinement; never rewarding a mere
    mention of a remembered fact."""
    user = (f"{_context_block(ctx)}\n\n{_rubric_block(dim)}\n\nBefore any reply is judged, write the criteria "
            f"a reply must meet for THIS person on '{dim.name}'. Start from what the message needs now, then use the "
            "persona and memories to refine what would feel understood, appropriate and safe for them. Do not "
            "reward recalling a remembered fact as such. Write 'Specific Criteria:' followed by 4 to 6 numbered "
            "lines 'name (weight%): what a strong reply shows', the weights summing to 100%.")
    return JudgePrompt(_messages(user), dim.name, kind="criteria", marker="", lo=0, hi=0)


__all__ = ["MAX_HISTORY_TURNS", "SYSTEM", "JudgePrompt", "bystander_prompt", "criteria_prompt", "dimension_prompt",
           "dynamic_criteria_prompt"]
