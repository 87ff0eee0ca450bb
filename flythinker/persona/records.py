"""Typed records for a person and a request.

One :class:`PersonaRecord` is one request by one user: who they are (:class:`Persona`), what we know of
them from before (past conversation :class:`Turn` s and extracted :class:`Memory` items, oldest first),
what they ask now (:class:`Query`) and, when the data has one, the reference ``response``.
All loaders (``loaders.py``) and the bundled ``persona-empathy`` generator produce these records; the view
builders (``views.py``) consume them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass
class Turn:
    """One past conversation turn. ``role`` is one of ``system``, ``user``, ``assistant``."""

    role: str
    text: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Turn.role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.text, str):
            raise TypeError(f"Turn.text must be a str, got {type(self.text).__name__}")


@dataclass
class Memory:
    """One extracted memory about the user (AlpsBench/PersonaEmp style): a value with an optional label."""

    value: str
    label: str | None = None
    evidence: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.value, str):
            raise TypeError(f"Memory.value must be a str, got {type(self.value).__name__}")


@dataclass
class Persona:
    """Who the user is.

    ``profile``: free text (possibly long; reasoner side only).
    ``short``: an optional one-line summary, the most the generator sees in split context.
    ``traits``: optional structured traits (e.g. the hidden traits of the synthetic benchmark; never rendered
    into a prompt by the view builders, kept for evaluation).
    """

    profile: str = ""
    short: str | None = None
    traits: dict[str, str] = field(default_factory=dict)


@dataclass
class Query:
    """The request: the user's message now, plus the situation it arises in (if the data gives one)."""

    text: str
    situation: str | None = None
    category: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError("Query.text must be a non-empty str")


@dataclass
class PersonaRecord:
    """One user request with everything known about the user.

    ``history`` and ``memories`` are ordered oldest first; token budgets drop from the front.
    ``response`` is the reference answer or ``None`` (PersonaEmp-style data has none).
    """

    record_id: str
    user_id: str
    query: Query
    persona: Persona = field(default_factory=Persona)
    history: list[Turn] = field(default_factory=list)
    memories: list[Memory] = field(default_factory=list)
    response: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the ``flythinker`` on-disk format read back by ``load_records``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PersonaRecord:
        """Inverse of :meth:`to_dict`. Raises ``KeyError``/``TypeError``/``ValueError`` on bad fields."""
        return cls(
            record_id=str(d["record_id"]),
            user_id=str(d["user_id"]),
            query=Query(**d["query"]),
            persona=Persona(**d.get("persona", {})),
            history=[Turn(**t) for t in d.get("history", [])],
            memories=[Memory(**m) for m in d.get("memories", [])],
            response=d.get("response"),
            meta=dict(d.get("meta", {})),
        )
