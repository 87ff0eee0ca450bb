"""The memory lifecycle over any judge backend: extract, update, retrieve, utilise (and judge utilisation).

Every operation takes a :class:`~flythinker.empathy.backends.JudgeBackend` -- a local HF model
(:class:`HFJudgeBackend`, which also takes a loaded FlyThinker pair with its tokenizer), an OpenAI-compatible
endpoint (:class:`OpenAIJudgeBackend`) or a Python callable (:class:`CallableJudgeBackend`) -- and runs a batch
of requests in one ``backend.generate`` call. Outputs are read with :mod:`flythinker.memory.parse`; an unreadable
output gives ``None`` in the result list (never an empty list that would look like "nothing to remember") and is
counted in the returned :class:`ParseStats`. The prompts are flythinker's own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .parse import OutputParseError, ParseStats, find_json, parse_memory_items, parse_selection
from .schema import TAXONOMY, MemoryItem

MAX_DIALOGUE_CHARS = 6000  # the dialogue shown to a model is cut from the start beyond this (newest turns kept)

EXTRACT_SYSTEM = (
    "You keep a long-term memory about one user. Read the conversation and list what is worth remembering "
    "about the USER (not the assistant, not fictional characters): stable facts, preferences, habits, plans, "
    "relationships, and topics they want avoided. Use only what the user's own turns support.\n"
    "Labels (pick one, or UNMAPPED with a label_suggestion like Domain/Aspect): " + ", ".join(TAXONOMY) + ".\n"
    'Answer with JSON only: {"memory_items": [{"type": "direct" or "indirect", "label": "...", '
    '"label_suggestion": null, "value": "one short sentence", "confidence": 0.5-0.95, '
    '"evidence_text": "the user words"}]}. Use an empty list when there is nothing about the user.')
UPDATE_SYSTEM = (
    "You maintain a user's memory list. Given the current memories and a new conversation, return the full "
    "updated list: keep unchanged items with their memory_id, change an item (same memory_id) when the new "
    "conversation contradicts or refines it, add new items (new memory_id) for new stable facts about the user. "
    "Answer with a JSON list of memory items only, same keys as the input.")
RETRIEVE_SYSTEM = (
    "Pick the one stored memory about the user that is most useful for answering their request. "
    'Answer with JSON only: {"selected_memory_id": "<id>", "reason": "<short>"}.')
UTILISE_SYSTEM = (
    "You are a personal assistant. Answer the user's request, using what you remember about them when it "
    "helps, and respecting any topic they asked you to avoid. Answer with JSON only: "
    '{"answer": "<your reply>", "used_memory_fact": "<the remembered fact you relied on, or empty>"}.')
#: Ability -> the yes/no question a judge answers about a reply (AlpsBench Task 4, abilities 1-4).
ABILITY_QUESTIONS = {
    "ability1": "Does the reply take the user's known persona (the memory) into account in a fitting way?",
    "ability2": "Does the reply follow the user's stated preference (the memory)?",
    "ability3": "Does the reply stay consistent with the user's role-play or fictional context (the memory) "
                "without confusing it with reality?",
    "ability4": "Does the reply respect the user's constraint or boundary (the memory)?",
}


def _dialogue_text(turns: Sequence[Any]) -> str:
    lines = []
    for t in turns:
        role = t.role if hasattr(t, "role") else t.get("role", "user")
        text = t.text if hasattr(t, "text") else t.get("text") or t.get("content") or ""
        lines.append(f"{'User' if role == 'user' else 'Assistant'}: {text}")
    text = "\n".join(lines)
    return text[-MAX_DIALOGUE_CHARS:]


def _memory_json(memories: Sequence[MemoryItem]) -> str:
    return json.dumps([{k: v for k, v in m.to_dict().items() if k in ("memory_id", "type", "label", "value",
                                                                      "confidence")} for m in memories],
                      ensure_ascii=False)


def _prompt(system: str, user: str, dimension: str):
    from flythinker.empathy.prompts import JudgePrompt

    return JudgePrompt(messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                       dimension=dimension, kind="text")


def _run(backend, prompts: list, max_new_tokens: int) -> list[str]:
    return [outs[0] for outs in backend.generate(prompts, n=1, temperature=0.0, max_new_tokens=max_new_tokens)]


def extract(backend, dialogues: Sequence[Sequence[Any]], max_new_tokens: int = 512
            ) -> tuple[list[list[MemoryItem] | None], ParseStats]:
    """Memory items for each dialogue (a list of turns: ``Turn`` or ``{"role", "text"}``); ``None`` where the
    output could not be read."""
    prompts = [_prompt(EXTRACT_SYSTEM, "Conversation:\n" + _dialogue_text(d), "memory_extract") for d in dialogues]
    return _parse_all(_run(backend, prompts, max_new_tokens), parse_memory_items)


def update(backend, memories: Sequence[Sequence[MemoryItem]], new_dialogues: Sequence[Sequence[Any]],
           max_new_tokens: int = 768) -> tuple[list[list[MemoryItem] | None], ParseStats]:
    """The updated memory list for each (memories, new dialogue) pair; ``None`` where unreadable."""
    prompts = [_prompt(UPDATE_SYSTEM, f"Current memories:\n{_memory_json(m)}\n\nNew conversation:\n"
                       f"{_dialogue_text(d)}", "memory_update") for m, d in zip(memories, new_dialogues, strict=True)]
    return _parse_all(_run(backend, prompts, max_new_tokens), lambda t: parse_memory_items(t, id_prefix="m"))


def _parse_all(texts: list[str], parse) -> tuple[list, ParseStats]:
    stats, out = ParseStats(), []
    for t in texts:
        try:
            out.append(parse(t))
            stats.record(None)
        except OutputParseError as e:
            out.append(None)
            stats.record(e)
    return out, stats


def retrieve(query: str, memories: Sequence[MemoryItem], k: int = 5, backend=None, retriever=None) -> list[int]:
    """Indices of the ``k`` memories most useful for ``query``: BM25 (default), another ranker with ``retriever``
    (a callable ``texts -> object with rank(query, k)``, e.g. a trained
    :class:`~flythinker.memory.dense_retriever.DualEncoder`), or with ``backend`` the model's single pick (a
    one-element list; empty when its output names no memory -- check ``retrieve_stats``)."""
    if not memories:
        return []
    if backend is None:
        from .retrieval import BM25Retriever

        return (BM25Retriever if retriever is None else retriever)([m.value for m in memories]).rank(query, k)
    ids = [f"c{i}" for i in range(len(memories))]
    listing = "\n".join(f"{cid}: {m.value}" for cid, m in zip(ids, memories))
    text = _run(backend, [_prompt(RETRIEVE_SYSTEM, f"Memories:\n{listing}\n\nRequest: {query}", "memory_retrieve")],
                128)[0]
    try:
        return [parse_selection(text, ids)]
    except OutputParseError:
        return []


@dataclass
class Utilisation:
    """One grounded answer: ``answer``, ``used_memory_fact``, ``parsed`` (False: the raw text is the answer)."""

    answer: str
    used_memory_fact: str
    parsed: bool


def utilise(backend, queries: Sequence[str], memories: Sequence[Sequence[MemoryItem]], max_new_tokens: int = 256
            ) -> tuple[list[Utilisation], ParseStats]:
    """Answer each query with its memories in the prompt (constraints listed first)."""
    prompts = []
    for q, mems in zip(queries, memories, strict=True):
        ordered = sorted(mems, key=lambda m: not m.is_constraint)
        listing = "\n".join(f"- {m.value}" for m in ordered) or "- (nothing)"
        prompts.append(_prompt(UTILISE_SYSTEM, f"What you remember about the user:\n{listing}\n\nRequest: {q}",
                               "memory_utilise"))
    stats, out = ParseStats(), []
    for text in _run(backend, prompts, max_new_tokens):
        try:
            obj = find_json(text)
            if not isinstance(obj, dict) or not isinstance(obj.get("answer"), str):
                raise OutputParseError("no 'answer' string in JSON")
            out.append(Utilisation(obj["answer"], str(obj.get("used_memory_fact") or ""), True))
            stats.record(None)
        except OutputParseError as e:
            out.append(Utilisation(text.strip(), "", False))
            stats.record(e)
    return out, stats


def judge_ability(backend, ability: str, queries: Sequence[str], memory_values: Sequence[str],
                  replies: Sequence[str]) -> tuple[list[float | None], ParseStats]:
    """Binary AlpsBench Task 4 judgement (abilities 1-4) of each reply: 1.0 yes, 0.0 no, ``None`` unreadable."""
    if ability not in ABILITY_QUESTIONS:
        raise ValueError(f"ability must be one of {sorted(ABILITY_QUESTIONS)} (ability5 is scored with the PERM "
                         f"rubric of flythinker.empathy), got {ability!r}")
    prompts = [_prompt("You judge a personal assistant's reply. Answer with one word: Yes or No.",
                       f"Memory about the user: {m}\nUser request: {q}\nAssistant reply: {r}\n\n"
                       f"{ABILITY_QUESTIONS[ability]} Answer Yes or No.", f"alps_{ability}")
               for q, m, r in zip(queries, memory_values, replies, strict=True)]
    stats, out = ParseStats(), []
    for text in _run(backend, prompts, 8):
        word = text.strip().lower().lstrip("*\"' ")
        if word.startswith("yes") or word.startswith("no"):
            out.append(1.0 if word.startswith("yes") else 0.0)
            stats.record(None)
        else:
            out.append(None)
            stats.record(OutputParseError(f"not yes/no: {text[:40]!r}"))
    return out, stats


__all__ = ["ABILITY_QUESTIONS", "Utilisation", "extract", "judge_ability", "retrieve", "update", "utilise"]
