"""Typed memory items with AlpsBench's schema.

A memory item is one fact, preference, habit or boundary about one user, as AlpsBench (arXiv 2603.26680) stores
them: ``memory_id``, ``type`` (``direct``: stated; ``indirect``: implied), ``label`` (a path of the taxonomy below,
or ``UNMAPPED`` with a ``label_suggestion``), ``value`` (the fact in one sentence), ``evidence`` (the user turn that
supports it), ``confidence`` in [0, 1], ``time_scope``, ``emotion``, ``preference_attitude`` and ``updated_at``.

:func:`MemoryItem.from_dict` reads the released data and model outputs leniently where the data is lenient
(a missing confidence, an ``evidence_text`` string instead of an ``evidence`` object) and strictly where a wrong
value would mislead (a non-string value, an unknown type): :class:`MemoryError_` names the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: The label taxonomy of AlpsBench's extraction instructions (paths; ``UNMAPPED`` is the escape hatch).
TAXONOMY: tuple[str, ...] = (
    "Personal_Background/Identity", "Personal_Background/Education", "Personal_Background/Occupation",
    "Personal_Background/Location", "States_Experiences/Physical_State", "States_Experiences/Mental_State",
    "States_Experiences/Past_Experience", "Possessions/Important_Items", "Possessions/Pet", "Possessions/House",
    "Possessions/Car", "Preferences/Food", "Preferences/Entertainment", "Preferences/Sports", "Preferences/Reading",
    "Preferences/Music", "Preferences/Travel_Mode", "Preferences/Shopping", "Preferences/Interaction_Preferences",
    "Thoughts/Opinions/Positive", "Thoughts/Opinions/Negative", "Thoughts/Curiosity", "Thoughts/Goals/Short_Term",
    "Thoughts/Goals/Long_Term", "Plans/Schedule", "Plans/Commitments", "Social_Relationships/Family",
    "Social_Relationships/Friends", "Social_Relationships/Colleagues", "Social_Relationships/Partners",
    "Social_Relationships/Adversarial", "Constraints_and_Boundaries/Disliked_Topics",
    "Constraints_and_Boundaries/Sensitive_Topics", "Constraints_and_Boundaries/Do_Not_Remember",
)
UNMAPPED = "UNMAPPED"
DO_NOT_REMEMBER = "Constraints_and_Boundaries/Do_Not_Remember"
#: Labels that constrain what the assistant may say (kept, and always shown to the reasoner first).
CONSTRAINT_PREFIX = "Constraints_and_Boundaries/"
MEMORY_TYPES = ("direct", "indirect")


class MemoryError_(ValueError):  # noqa: N801 - ``MemoryError`` is a builtin
    """A memory item that cannot be read: the message names the item and the field."""


@dataclass
class Evidence:
    """Where a memory comes from: the session, the utterance index in it (or ``None``), the user's text."""

    session_id: str | None = None
    utterance_index: int | None = None
    text: str = ""


@dataclass
class MemoryItem:
    """One memory of one user (AlpsBench's schema). ``label`` is a taxonomy path or ``UNMAPPED``."""

    memory_id: str
    value: str
    type: str = "direct"
    label: str = UNMAPPED
    label_suggestion: str | None = None
    reasoning: str | None = None
    evidence: Evidence = field(default_factory=Evidence)
    confidence: float | None = None
    time_scope: str | None = None
    emotion: str | None = None
    preference_attitude: str | None = None
    updated_at: str | None = None

    @property
    def is_constraint(self) -> bool:
        """A boundary the assistant must respect (disliked or sensitive topic)."""
        return self.label.startswith(CONSTRAINT_PREFIX) and self.label != DO_NOT_REMEMBER

    @property
    def in_taxonomy(self) -> bool:
        return self.label in TAXONOMY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, *, default_id: str = "m?", strict: bool = True) -> MemoryItem:
        """Read one item. ``type`` is kept as written (the released data has a few ``implied``/``explicit``
        types; the scorer compares types as strings). ``strict=False`` coerces a non-string ``value``/``type`` to
        text (model outputs); ``strict=True`` raises :class:`MemoryError_` on either."""
        if not isinstance(d, dict):
            raise MemoryError_(f"memory item {default_id}: expected an object, got {type(d).__name__}")
        mid = str(d.get("memory_id") or d.get("id") or default_id)
        value = d.get("value", "")
        if not isinstance(value, str):
            if strict:
                raise MemoryError_(f"memory item {mid}: 'value' must be a string, got {type(value).__name__}")
            import json

            value = json.dumps(value, ensure_ascii=False)
        kind = d.get("type") or "direct"
        if not isinstance(kind, str):
            if strict:
                raise MemoryError_(f"memory item {mid}: 'type' must be a string, got {type(kind).__name__}")
            kind = str(kind)
        return cls(memory_id=mid, value=value, type=kind, label=str(d.get("label") or UNMAPPED),
                   label_suggestion=_opt_str(d.get("label_suggestion")), reasoning=_opt_str(d.get("reasoning")),
                   evidence=_evidence(d), confidence=_confidence(d.get("confidence"), mid, strict),
                   time_scope=_opt_str(d.get("time_scope")), emotion=_opt_str(d.get("emotion")),
                   preference_attitude=_opt_str(d.get("preference_attitude")), updated_at=_opt_str(d.get("updated_at")))


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _evidence(d: dict) -> Evidence:
    ev = d.get("evidence")
    if isinstance(ev, dict):
        idx = ev.get("utterance_index")
        idx = idx if isinstance(idx, int) else None
        return Evidence(_opt_str(ev.get("session_id")), idx, str(ev.get("text") or ""))
    return Evidence(text=str(d.get("evidence_text") or (ev if isinstance(ev, str) else "") or ""))


def _confidence(v: Any, mid: str, strict: bool) -> float | None:
    if v is None:
        return None
    try:
        c = float(v)
    except (TypeError, ValueError):
        if strict:
            raise MemoryError_(f"memory item {mid}: 'confidence' must be a number, got {v!r}") from None
        return None
    return min(1.0, max(0.0, c))


def items_from_list(rows: Any, *, strict: bool = True, id_prefix: str = "m") -> list[MemoryItem]:
    """A list of item dicts as :class:`MemoryItem` (ids ``m1, m2, ...`` where missing)."""
    if not isinstance(rows, list):
        raise MemoryError_(f"expected a list of memory items, got {type(rows).__name__}")
    return [MemoryItem.from_dict(r, default_id=f"{id_prefix}{i + 1}", strict=strict) for i, r in enumerate(rows)]


__all__ = ["CONSTRAINT_PREFIX", "DO_NOT_REMEMBER", "MEMORY_TYPES", "TAXONOMY", "UNMAPPED", "Evidence", "MemoryError_",
           "MemoryItem", "items_from_list"]
