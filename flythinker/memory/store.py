"""A per-user memory store: one JSON file, written atomically under a file lock, with every change recorded.

File layout (``<folder>/<user_id>.json``)::

    {"format": "flythinker.memory/1", "user_id": "...", "memories": [MemoryItem...],
     "actions": [{"action": "add|modify|delete|retain|refuse", "memory_id": "...", "at": "ISO time",
                  "source": "...", "before": {...} | null}]}

Policy when storing: an item labelled ``Constraints_and_Boundaries/Do_Not_Remember`` is never stored -- the store
records a ``refuse`` action with the memory id but not the value (the user asked for it to be forgotten).
Constraint items (disliked / sensitive topics) are stored and are the first thing the reasoner's view shows
(see :mod:`flythinker.memory.reasoner`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .schema import DO_NOT_REMEMBER, MemoryError_, MemoryItem, items_from_list

FORMAT = "flythinker.memory/1"
ACTIONS = ("add", "modify", "delete", "retain", "refuse")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class UpdateReport:
    """What one :meth:`MemoryStore.apply` did: memory ids per action."""

    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    retained: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


class MemoryStore:
    """The memories of one user, kept in ``path`` (created on first :meth:`save`).

    Args:
        path: the store's JSON file.
        user_id: the user (default: the file's stem).
    """

    def __init__(self, path: str | Path, user_id: str | None = None):
        self.path = Path(path).expanduser()
        self.user_id = user_id or self.path.stem
        self.memories: list[MemoryItem] = []
        self.actions: list[dict[str, Any]] = []
        if self.path.exists():
            self._read()

    @classmethod
    def open(cls, path: str | Path) -> MemoryStore:
        """An existing store; ``FileNotFoundError`` if there is none."""
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"memory store not found: {path}")
        return cls(path)

    def _read(self) -> None:
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise MemoryError_(f"{self.path}: not a JSON memory store ({exc})") from exc
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise MemoryError_(f"{self.path}: not a flythinker memory store (format {FORMAT!r} expected)")
        self.user_id = str(d.get("user_id") or self.user_id)
        self.memories = items_from_list(d.get("memories") or [])
        self.actions = list(d.get("actions") or [])

    def _lock(self):
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path) + ".lock")

    def save(self) -> Path:
        """Write the store atomically (temporary sibling + ``os.replace``) under its file lock."""
        from flythinker.hub import atomic_write_bytes

        payload = {"format": FORMAT, "user_id": self.user_id, "memories": [m.to_dict() for m in self.memories],
                   "actions": self.actions}
        with self._lock():
            atomic_write_bytes(self.path, json.dumps(payload, ensure_ascii=False, indent=1).encode("utf-8"))
        return self.path

    def __len__(self) -> int:
        return len(self.memories)

    def get(self, memory_id: str) -> MemoryItem | None:
        return next((m for m in self.memories if m.memory_id == memory_id), None)

    def _record(self, action: str, memory_id: str, source: str, before: MemoryItem | None = None) -> None:
        self.actions.append({"action": action, "memory_id": memory_id, "at": _now(), "source": source,
                             "before": before.to_dict() if before is not None else None})

    def _refused(self, item: MemoryItem) -> bool:
        return item.label == DO_NOT_REMEMBER

    def _fresh_id(self) -> str:
        used = {m.memory_id for m in self.memories}
        n = len(self.memories) + 1
        while f"m{n}" in used:
            n += 1
        return f"m{n}"

    def add(self, item: MemoryItem, source: str = "api") -> bool:
        """Store ``item`` (a new id if its id is taken); ``False`` (and a ``refuse`` action) for a
        do-not-remember item."""
        if self._refused(item):
            self._record("refuse", item.memory_id, source)
            return False
        if self.get(item.memory_id) is not None:
            item.memory_id = self._fresh_id()
        item.updated_at = item.updated_at or _now()
        self.memories.append(item)
        self._record("add", item.memory_id, source)
        return True

    def apply(self, new_state: Sequence[MemoryItem], source: str = "update") -> UpdateReport:
        """Replace the memories with ``new_state`` (an updater's output), recording per id: ``retain`` (same
        content), ``modify`` (same id, new content; the old item kept in ``before``), ``add`` (new id),
        ``delete`` (an id no longer present), ``refuse`` (do-not-remember items, not stored)."""
        rep = UpdateReport()
        old = {m.memory_id: m for m in self.memories}
        kept: list[MemoryItem] = []
        for item in new_state:
            if self._refused(item):
                self._record("refuse", item.memory_id, source)
                rep.refused.append(item.memory_id)
                continue
            prev = old.pop(item.memory_id, None)
            if prev is None:
                self._record("add", item.memory_id, source)
                rep.added.append(item.memory_id)
            elif _content(prev) == _content(item):
                rep.retained.append(item.memory_id)
                self._record("retain", item.memory_id, source)
            else:
                item.updated_at = _now()
                self._record("modify", item.memory_id, source, before=prev)
                rep.modified.append(item.memory_id)
            kept.append(item)
        for mid, prev in old.items():
            self._record("delete", mid, source, before=prev)
            rep.deleted.append(mid)
        self.memories = kept
        return rep

    def extend(self, items: Iterable[MemoryItem], source: str = "extract") -> list[str]:
        """:meth:`add` each item; returns the ids stored."""
        return [it.memory_id for it in items if self.add(it, source)]


def _content(m: MemoryItem) -> tuple:
    return (m.type, m.label, m.value, m.confidence, m.time_scope, m.emotion, m.preference_attitude)


__all__ = ["ACTIONS", "FORMAT", "MemoryStore", "UpdateReport"]
