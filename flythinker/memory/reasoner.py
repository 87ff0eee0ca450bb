"""The reasoner's view from a memory store: what the query needs, under the reasoner's token budget.

Split context (docs/design.md): the generator reads the query alone; the reasoner reads the system prompt, the
memories selected for the query and, optionally, the most recent dialogue turns, then the query. Selection:
constraint memories (disliked / sensitive topics) first, always, in store order; then the other memories ranked
by BM25 against the query; ``Do_Not_Remember`` items are never shown (a store never holds them, a packet might).
Memories are added in that order while the chat-templated reasoner prompt fits ``max_reasoner_tokens``; recent
turns (newest first) fill what room is left. The result is a :class:`~flythinker.persona.views.Views`, so
:func:`flythinker.persona.generate_inputs` and ``FlyThinkerForCausalLM.generate`` take it as they take a persona
record's views.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import DO_NOT_REMEMBER, MemoryItem

DEFAULT_MEMORY_SYSTEM_PROMPT = ("You are a helpful, warm assistant. Adapt your reply to this user, using what you "
                                "know about them and respecting the topics they want avoided.")


@dataclass
class MemoryViews:
    """``views`` (generator and reasoner prompt ids), ``used_ids`` (memories in the reasoner's view, in order),
    ``dropped_ids`` (selected but left out to fit the budget), ``recent_turns`` (dialogue turns included)."""

    views: Any
    used_ids: list[str] = field(default_factory=list)
    dropped_ids: list[str] = field(default_factory=list)
    recent_turns: int = 0


def rank_memories(memories: Sequence[MemoryItem], query: str, retriever=None) -> list[MemoryItem]:
    """Constraints first (store order), then the rest by relevance to ``query`` -- BM25, or ``retriever`` (a
    callable ``texts -> object with rank(query)``, e.g. a trained dense ``DualEncoder``); no do-not-remember
    items."""
    from .retrieval import BM25Retriever

    shown = [m for m in memories if m.label != DO_NOT_REMEMBER]
    constraints = [m for m in shown if m.is_constraint]
    rest = [m for m in shown if not m.is_constraint]
    if rest:
        ranker = (BM25Retriever if retriever is None else retriever)([m.value for m in rest])
        rest = [rest[i] for i in ranker.rank(query)]
    return constraints + rest


def _user_text(memories: Sequence[MemoryItem], turns: Sequence[tuple[str, str]], query: str) -> str:
    parts = []
    if memories:
        parts.append("What you know about this user:\n" + "\n".join(
            f"- {'[avoid] ' if m.is_constraint else ''}{m.value}" for m in memories))
    if turns:
        parts.append("Recent conversation (oldest first):\n" + "\n".join(
            f"{'User' if r == 'user' else 'Assistant'}: {t}" for r, t in turns))
    parts.append(f"Their request:\n{query.strip()}")
    return "\n\n".join(parts)


def _ids(tokenizer, system: str, user: str) -> list[int]:
    from flythinker.persona.views import render_chat

    text = render_chat(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": user}], True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def memory_views(memories: Sequence[MemoryItem], query: str, tokenizer, *, max_reasoner_tokens: int = 1024,
                 recent_turns: Sequence[tuple[str, str]] = (), system_prompt: str = DEFAULT_MEMORY_SYSTEM_PROMPT,
                 max_memories: int | None = None, retriever=None) -> MemoryViews:
    """Split-context views for ``query`` from ``memories`` (see module doc).

    Args:
        memories: the user's memories (e.g. ``MemoryStore.open(path).memories``).
        query: the user's request (the generator's whole prompt besides the system prompt).
        tokenizer: the pair's tokenizer (chat template applied; the fallback template otherwise).
        max_reasoner_tokens: budget of the reasoner's prompt, in tokens.
        recent_turns: ``(role, text)`` dialogue turns, oldest first; the newest that fit are included.
        max_memories: at most this many memories (after ranking), budget permitting.
        retriever: ranks the non-constraint memories instead of BM25 (see :func:`rank_memories`).

    Returns:
        :class:`MemoryViews`; ``views.reasoner_prompt_ids`` is at most ``max_reasoner_tokens`` long.
        ``ValueError`` if the query alone does not fit.
    """
    if not query or not query.strip():
        raise ValueError("memory_views needs a non-empty query")
    ranked = rank_memories(memories, query, retriever)[:max_memories]
    if len(_ids(tokenizer, system_prompt, _user_text([], [], query))) > max_reasoner_tokens:
        raise ValueError(f"the query alone exceeds the reasoner budget of {max_reasoner_tokens} tokens")
    used: list[MemoryItem] = []
    for m in ranked:
        if len(_ids(tokenizer, system_prompt, _user_text([*used, m], [], query))) <= max_reasoner_tokens:
            used.append(m)
    turns: list[tuple[str, str]] = []
    for t in reversed(list(recent_turns)):
        if len(_ids(tokenizer, system_prompt, _user_text(used, [t, *turns], query))) > max_reasoner_tokens:
            break
        turns.insert(0, t)
    from flythinker.persona.views import Views

    reasoner = _ids(tokenizer, system_prompt, _user_text(used, turns, query))
    generator = _ids(tokenizer, system_prompt, query.strip())
    used_ids = {m.memory_id for m in used}
    dropped = [m.memory_id for m in ranked if m.memory_id not in used_ids]
    views = Views(generator, reasoner, None, "split", truncated_memories=len(dropped))
    return MemoryViews(views, [m.memory_id for m in used], dropped, len(turns))


def load_memories(path: str | Path) -> tuple[list[MemoryItem], list[tuple[str, str]], str]:
    """``(memories, dialogue turns, description)`` from a memory store file or an AlpsBench session packet
    (its human-verified Task 1 memories and its dialogue). ``ValueError`` for any other file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"memory file not found: {path}")
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from exc
    if isinstance(head, dict) and head.get("format", "").startswith("flythinker.memory/"):
        from .store import MemoryStore

        store = MemoryStore.open(path)
        return store.memories, [], f"memory store {store.user_id!r} ({len(store)} memories)"
    if isinstance(head, dict) and "session_id" in head and "dialogue" in head:
        from flythinker.alpsbench.data import packet_from_dict

        p = packet_from_dict(head, str(path))
        turns = [(t.role, t.text) for t in p.dialogue]
        return list(p.task1_gold or []), turns, f"AlpsBench session {p.session_id} ({len(p.task1_gold or [])} memories)"
    raise ValueError(f"{path} is neither a flythinker memory store nor an AlpsBench session packet")


__all__ = ["DEFAULT_MEMORY_SYSTEM_PROMPT", "MemoryViews", "load_memories", "memory_views", "rank_memories"]
