"""What a judge sees about a user and where responses to judge come from.

:class:`JudgeContext` is the judge-side view of one request (the *policy* may see less, e.g. PereGRM's policy reads
memories + query, while persona and situation go only to the judge). :func:`contexts_from_columns` builds contexts
from GRPO dataset columns (:func:`flythinker.rl.grpo_rows`); :func:`judge_items` reads a JSONL/JSON file in any
layout :func:`flythinker.persona.load_records` knows and picks the response to judge.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flythinker.persona.records import PersonaRecord


@dataclass
class JudgeContext:
    """The request a response answers. ``criteria``: fixed per-dimension criteria (PereGRM evaluation), if any."""

    query: str
    persona: str = ""
    memories: list[str] = field(default_factory=list)
    situation: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)  # (role, text), oldest first
    criteria: dict[str, str] = field(default_factory=dict)
    item_id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.query, str) or not self.query.strip():
            raise ValueError(f"JudgeContext.query must be a non-empty string (item {self.item_id!r})")


def context_from_record(rec: PersonaRecord) -> JudgeContext:
    """Judge context of a :class:`PersonaRecord` (profile, or the short persona line; memory values; situation)."""
    persona = rec.persona.profile or rec.persona.short or ""
    crit = rec.meta.get("criteria") if isinstance(rec.meta.get("criteria"), dict) else {}
    return JudgeContext(query=rec.query.text, persona=persona, memories=[m.value for m in rec.memories],
                        situation=rec.query.situation or "", history=[(t.role, t.text) for t in rec.history],
                        criteria=dict(crit), item_id=rec.record_id)


def _col(columns: Mapping[str, Any], name: str, i: int, default: Any = "") -> Any:
    v = columns.get(name)
    return default if v is None else v[i]


def contexts_from_columns(n: int, columns: Mapping[str, Sequence[Any]]) -> list[JudgeContext]:
    """Contexts for ``n`` completions from dataset columns ``query`` (required), ``persona``, ``memories`` (list or
    JSON list), ``situation``, ``criteria`` (dict or JSON dict), ``record_id``."""
    if "query" not in columns:
        raise ValueError("judge rewards need a 'query' dataset column (see flythinker.rl.grpo_rows)")
    out = []
    for i in range(n):
        mem = _col(columns, "memories", i, [])
        mem = json.loads(mem) if isinstance(mem, str) else list(mem)
        crit = _col(columns, "criteria", i, {})
        crit = json.loads(crit) if isinstance(crit, str) and crit else (crit or {})
        out.append(JudgeContext(query=_col(columns, "query", i), persona=_col(columns, "persona", i),
                                memories=[str(m) for m in mem], situation=_col(columns, "situation", i),
                                criteria=dict(crit), item_id=str(_col(columns, "record_id", i, i))))
    return out


def _last_assistant(rec: PersonaRecord) -> tuple[str | None, str | None]:
    """(user turn before it, last assistant turn) of the record's history, or (None, None)."""
    for k in range(len(rec.history) - 1, -1, -1):
        if rec.history[k].role == "assistant":
            before = next((rec.history[j].text for j in range(k - 1, -1, -1) if rec.history[j].role == "user"), None)
            return before, rec.history[k].text
    return None, None


def judge_items(path: str | Path, format: str = "auto") -> list[tuple[JudgeContext, str]]:
    """``(context, response)`` pairs from a data file.

    - flythinker format: the record's ``response``;
    - PERM layout: the dialogue's last assistant turn (``dialogue[1]``, or the last odd turn of a longer dialogue);
    - PersonaEmp layout: the last assistant turn of ``conversation``, judged against the user turn before it
      (one item per session: every query record of a session shares that conversation).

    Records without a response raise ``ValueError`` naming them (nothing is skipped silently).
    """
    from flythinker.persona.jsonio import read_json_items
    from flythinker.persona.loaders import detect_format, load_records

    if format == "auto":
        items = read_json_items(Path(path))
        if not items:
            raise ValueError(f"{path}: no records")
        format = detect_format(items[0])
    records = load_records(path, format=format)
    out: list[tuple[JudgeContext, str]] = []
    missing: list[str] = []
    seen_sessions: set[str] = set()
    for rec in records:
        ctx = context_from_record(rec)
        if format == "perm":
            turns = [rec.query.text, *([rec.response] if rec.response is not None else []),
                     *rec.meta.get("dialogue_tail", [])]
            k = len(turns) - 1 if len(turns) % 2 == 0 else len(turns) - 2  # last odd index: an assistant turn
            response = turns[k] if k >= 1 else None
            if k >= 1:
                ctx.query = turns[k - 1]
        elif format == "personaemp":
            if rec.user_id in seen_sessions:
                continue
            seen_sessions.add(rec.user_id)
            before, response = _last_assistant(rec)
            if before:
                ctx.query = before
        else:
            response = rec.response
        if response is None or not str(response).strip():
            missing.append(rec.record_id)
            continue
        out.append((ctx, str(response)))
    if missing:
        raise ValueError(f"{path}: {len(missing)} records have no response to judge (first: {missing[:5]})")
    return out


__all__ = ["JudgeContext", "context_from_record", "contexts_from_columns", "judge_items"]
