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


class FieldError(TypeError, ValueError):
    """A record field of the wrong type or with invalid text; `field` names it (e.g. ``persona.profile``).

    Both a TypeError and a ValueError, so callers that catch either keep working."""

    def __init__(self, fld: str, problem: str):
        super().__init__(f"{fld}: {problem}")
        self.field, self.problem = fld, problem


def check_text(value: Any, fld: str, *, optional: bool = False) -> None:
    """`value` must be a str (or None when `optional`) that is valid Unicode: a lone surrogate (JSON allows
    ``"\\ud800"``) cannot be encoded and would fail deep inside a tokenizer."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise FieldError(fld, f"expected a string{' or null' if optional else ''}, got {type(value).__name__} "
                              f"({value!r:.40})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FieldError(fld, f"invalid Unicode at character {exc.start} (a lone surrogate "
                              f"{value[exc.start]!r}); the text must be valid UTF-8") from None


def _check_list(values: Any, fld: str, kind: type) -> None:
    if not isinstance(values, list):
        raise FieldError(fld, f"expected a list, got {type(values).__name__}")
    for i, v in enumerate(values):
        if not isinstance(v, kind):
            raise FieldError(f"{fld}[{i}]", f"expected a {kind.__name__}, got {type(v).__name__}")


@dataclass
class Turn:
    """One past conversation turn. ``role`` is one of ``system``, ``user``, ``assistant``."""

    role: str
    text: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise FieldError("role", f"must be one of {ROLES}, got {self.role!r}")
        check_text(self.text, "text")


@dataclass
class Memory:
    """One extracted memory about the user (AlpsBench/PersonaEmp style): a value with an optional label."""

    value: str
    label: str | None = None
    evidence: str | None = None

    def __post_init__(self) -> None:
        check_text(self.value, "value")
        check_text(self.label, "label", optional=True)
        check_text(self.evidence, "evidence", optional=True)


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

    def __post_init__(self) -> None:
        check_text(self.profile, "profile")
        check_text(self.short, "short", optional=True)
        if not isinstance(self.traits, dict):
            raise FieldError("traits", f"expected an object of strings, got {type(self.traits).__name__}")
        for key, value in self.traits.items():
            check_text(value, f"traits.{key}")


@dataclass
class Query:
    """The request: the user's message now, plus the situation it arises in (if the data gives one)."""

    text: str
    situation: str | None = None
    category: str | None = None

    def __post_init__(self) -> None:
        check_text(self.text, "text")
        if not self.text.strip():
            raise FieldError("text", "must be a non-empty string")
        check_text(self.situation, "situation", optional=True)
        check_text(self.category, "category", optional=True)


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

    def __post_init__(self) -> None:
        check_text(self.record_id, "record_id")
        check_text(self.user_id, "user_id")
        for name, kind in (("query", Query), ("persona", Persona)):
            if not isinstance(getattr(self, name), kind):
                raise FieldError(name, f"expected a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        _check_list(self.history, "history", Turn)
        _check_list(self.memories, "memories", Memory)
        check_text(self.response, "response", optional=True)
        if not isinstance(self.meta, dict):
            raise FieldError("meta", f"expected an object, got {type(self.meta).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the ``flythinker`` on-disk format read back by ``load_records``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PersonaRecord:
        """Inverse of :meth:`to_dict`. Raises ``KeyError`` (a missing field) or :class:`FieldError` naming the
        field (``persona.profile``, ``history[2].text``, ...) of the wrong type."""
        return cls(
            record_id=_scalar_id(d["record_id"], "record_id"),
            user_id=_scalar_id(d["user_id"], "user_id"),
            query=_sub(Query, d["query"], "query"),
            persona=_sub(Persona, d.get("persona", {}), "persona"),
            history=[_sub(Turn, t, f"history[{i}]") for i, t in enumerate(_listed(d, "history"))],
            memories=[_sub(Memory, m, f"memories[{i}]") for i, m in enumerate(_listed(d, "memories"))],
            response=d.get("response"),
            meta=d.get("meta", {}),
        )


def _scalar_id(value: Any, fld: str) -> str:
    """Ids may be JSON numbers or strings (-> str); anything else is a FieldError."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise FieldError(fld, f"expected a string or an integer, got {type(value).__name__}")
    return str(value)


def _listed(d: dict[str, Any], fld: str) -> list:
    value = d.get(fld, [])
    if not isinstance(value, list):
        raise FieldError(fld, f"expected a list, got {type(value).__name__}")
    return value


def _sub(kind: type, value: Any, fld: str):
    """`kind(**value)` with errors named under `fld` (``persona`` + ``profile`` -> ``persona.profile``)."""
    if not isinstance(value, dict):
        raise FieldError(fld, f"expected an object, got {type(value).__name__}")
    try:
        return kind(**value)
    except FieldError as exc:
        raise FieldError(f"{fld}.{exc.field}", exc.problem) from None
    except TypeError as exc:  # an unknown or missing key
        raise FieldError(fld, str(exc).replace(f"{kind.__name__}.__init__() ", "")) from None
