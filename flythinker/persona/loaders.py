"""Load persona/empathy data sets into :class:`PersonaRecord` lists.

Formats (``format=``):

- ``"longlamp"``: LongLaMP / FlyThinker style JSON: ``profile`` (a string, or a list of past documents),
  ``inp`` or ``input`` (the query), optional ``target`` or ``output`` (the reference), optional ``id``/``user_id``.
- ``"personaemp"``: PersonaEmp (PersonalizedEmpathy ``final_data``; AlpsBench task 4) JSON sessions:
  ``session_id`` (``"english_77"``), optional ``persona.persona_profile``, ``conversation[{role, text}]``,
  ``extracted_memory[{label, label_suggestion, value, evidence}]`` (evidence a string or an object),
  ``queries[{query_id, query, category, situation_id, situation{situation, ...}, relevant_mem (1-based),
  reasoning, criteria{dimension: text}}]``. One record per query, every field kept (``meta``, see
  :func:`_parse_personaemp`); there is no reference response.
- ``"perm"``: PERM JSONL: ``persona.identity``, ``scenario``, ``dialogue`` (``dialogue[0]`` is the query,
  ``dialogue[1]``, when present, the reference response).
- ``"flythinker"``: :meth:`PersonaRecord.to_dict` rows (what the bundled ``persona-empathy`` writes).
- ``"auto"``: decided from the fields of the first record.

The file may hold a JSON list, a single JSON object, or JSON lines (read by :func:`.jsonio.read_json_items`, the
reader every data path shares; a file that is not JSON raises its ``JsonFileError`` naming the line). A malformed
record raises :class:`RecordError` (a ``ValueError``) naming the file, the record index/id and the field. With
``on_error="skip"`` bad records are skipped and a warning gives their count; nothing is dropped silently.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .jsonio import read_json_items
from .records import FieldError, Memory, Persona, PersonaRecord, Query, Turn

FORMATS = ("auto", "longlamp", "personaemp", "perm", "flythinker")
_ROLE_ALIASES = {"user": "user", "human": "user", "seeker": "user", "assistant": "assistant", "gpt": "assistant",
                 "bot": "assistant", "ai": "assistant", "supporter": "assistant", "system": "system"}


class RecordError(ValueError):
    """A record in an input file is malformed; the message names the file, record and field."""

    def __init__(self, source: str, index: int, record_id: Any, fld: str, problem: str):
        self.source, self.index, self.record_id, self.field = source, index, record_id, fld
        rid = f" (id={record_id!r})" if record_id is not None else ""
        super().__init__(f"{source}: record {index}{rid}: field {fld!r}: {problem}")


class _Bad(Exception):
    """Internal: a field problem, turned into RecordError with the record's position by the caller."""

    def __init__(self, fld: str, problem: str):
        super().__init__(fld, problem)
        self.field, self.problem = fld, problem


# ---------------------------------------------------------------- field helpers

def _get(d: dict, fld: str, *, required: bool = True, types: tuple = (str,), alias: tuple[str, ...] = ()):
    for name in (fld, *alias):
        if name in d and d[name] is not None:
            v = d[name]
            if not isinstance(v, types):
                want = "/".join(t.__name__ for t in types)
                raise _Bad(name, f"expected {want}, got {type(v).__name__}")
            return v
    if required:
        names = " or ".join(repr(n) for n in (fld, *alias))
        raise _Bad(fld, f"missing (expected {names})")
    return None


def _text(v: Any, fld: str) -> str:
    """A dialogue item: a plain string, or a dict with ``content``/``text``."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict):
        for k in ("content", "text", "value"):
            if isinstance(v.get(k), str):
                return v[k]
    raise _Bad(fld, f"expected a string or a dict with 'content'/'text', got {type(v).__name__}")


def _role(v: Any, fld: str) -> str:
    if not isinstance(v, str) or v.lower() not in _ROLE_ALIASES:
        raise _Bad(fld, f"unknown role {v!r} (expected one of {sorted(_ROLE_ALIASES)})")
    return _ROLE_ALIASES[v.lower()]


def _as_str(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False)


# ---------------------------------------------------------------- per-format parsers (one raw item -> records)

def _parse_longlamp(d: dict, index: int) -> list[PersonaRecord]:
    rid = str(d.get("id", index))
    query = _get(d, "inp", alias=("input",))
    target = _get(d, "target", required=False, alias=("output",))
    profile = _get(d, "profile", types=(str, list))
    persona, memories = Persona(), []
    if isinstance(profile, str):
        persona = Persona(profile=profile)
    else:
        for j, item in enumerate(profile):
            if isinstance(item, str):
                memories.append(Memory(value=item, label="past_document"))
            elif isinstance(item, dict):
                # Past documents have task-specific keys (title/abstract, reviewText/summary, content):
                # keep every scalar field so nothing is lost; ids are bookkeeping, not content.
                parts = [f"{k}: {v}" for k, v in item.items() if k != "id" and isinstance(v, (str, int, float))]
                if not parts:
                    raise _Bad(f"profile[{j}]", "a profile item has no text fields")
                memories.append(Memory(value="\n".join(parts), label="past_document"))
            else:
                raise _Bad(f"profile[{j}]", f"expected str or dict, got {type(item).__name__}")
    user = str(d.get("user_id", d.get("name", rid)))
    return [PersonaRecord(record_id=rid, user_id=user, query=Query(text=query), persona=persona,
                          memories=memories, response=target)]


_PE_SESSION_PARTS = ("queries", "conversation", "extracted_memory")


def _personaemp_persona(d: dict) -> Persona:
    """The session's persona: ``persona.persona_profile``; a persona object without one is kept as its JSON (as
    the authors' criteria script does); no persona at all (AlpsBench-derived sessions) -> an empty persona."""
    persona_d = _get(d, "persona", required=False, types=(dict, str))
    if persona_d is None:
        return Persona()
    if isinstance(persona_d, str):
        return Persona(profile=persona_d)
    profile = persona_d.get("persona_profile")
    if profile is None:
        return Persona(profile=json.dumps(persona_d, ensure_ascii=False))
    if not isinstance(profile, str):
        raise _Bad("persona.persona_profile", f"expected str, got {type(profile).__name__}")
    return Persona(profile=profile)


def _personaemp_memories(d: dict) -> tuple[list[Memory], list[dict]]:
    """Memories (``value``, ``label``, ``evidence`` as text: an evidence object is kept as its JSON) and, per
    memory, the fields a :class:`Memory` has no slot for (e.g. ``label_suggestion``)."""
    memories, extra = [], []
    for j, m in enumerate(_get(d, "extracted_memory", required=False, types=(list,)) or []):
        if not isinstance(m, dict) or not isinstance(m.get("value"), str):
            raise _Bad(f"extracted_memory[{j}].value", "expected a dict with a string 'value'")
        memories.append(Memory(value=m["value"], label=_as_str(m.get("label")), evidence=_as_str(m.get("evidence"))))
        extra.append({k: v for k, v in m.items() if k not in ("value", "label", "evidence")})
    return memories, extra


def _personaemp_query(q: Any, j: int) -> tuple[Query, dict]:
    if not isinstance(q, dict) or not isinstance(q.get("query"), str) or not q["query"].strip():
        raise _Bad(f"queries[{j}].query", "expected a dict with a non-empty string 'query'")
    sit = q.get("situation")
    if isinstance(sit, dict):
        sit = sit.get("situation")
    if sit is not None and not isinstance(sit, str):
        raise _Bad(f"queries[{j}].situation", f"expected str or dict with 'situation', got {type(sit).__name__}")
    crit = q.get("criteria")
    if crit is not None and not isinstance(crit, (dict, str)):
        raise _Bad(f"queries[{j}].criteria", f"expected an object of per-dimension texts, got {type(crit).__name__}")
    rel = q.get("relevant_mem")
    if rel is not None and (not isinstance(rel, list) or not all(isinstance(k, int) for k in rel)):
        raise _Bad(f"queries[{j}].relevant_mem", "expected a list of 1-based memory indices")
    return Query(text=q["query"], situation=sit, category=_as_str(q.get("category"))), \
        {k: v for k, v in q.items() if k != "query"}


def _parse_personaemp(d: dict, index: int) -> list[PersonaRecord]:
    """One record per query. ``meta``: ``protocol`` ("personaemp": the policy sees memories + query only),
    ``criteria`` (per-dimension fixed criteria, if present), ``relevant_mem`` (1-based, as in the data),
    ``query_fields`` (every field of the query object but the text), ``session_fields`` (every session field but
    queries / conversation / memories), ``memory_fields`` (per memory, the fields beyond value/label/evidence)."""
    sid = str(d.get("session_id", index))
    persona = _personaemp_persona(d)
    history = []
    for j, t in enumerate(_get(d, "conversation", required=False, types=(list,)) or []):
        if not isinstance(t, dict):
            raise _Bad(f"conversation[{j}]", f"expected a dict with role/text, got {type(t).__name__}")
        history.append(Turn(role=_role(t.get("role"), f"conversation[{j}].role"),
                            text=_text(t, f"conversation[{j}].text")))
    memories, memory_fields = _personaemp_memories(d)
    session_fields = {k: v for k, v in d.items() if k not in _PE_SESSION_PARTS}
    out = []
    for j, q in enumerate(_get(d, "queries", types=(list,))):
        query, fields = _personaemp_query(q, j)
        meta = {"protocol": "personaemp", "query_fields": fields, "session_fields": session_fields,
                "memory_fields": memory_fields, "query_index": j}
        if isinstance(fields.get("criteria"), dict):
            meta["criteria"] = fields["criteria"]
        if fields.get("relevant_mem") is not None:
            meta["relevant_mem"] = fields["relevant_mem"]
        out.append(PersonaRecord(record_id=str(q.get("query_id") or f"{sid}:{j}"), user_id=sid, query=query,
                                 persona=persona, history=list(history), memories=list(memories), response=None,
                                 meta=meta))
    return out


def _parse_perm(d: dict, index: int) -> list[PersonaRecord]:
    persona_d = _get(d, "persona", types=(dict,))
    if not isinstance(persona_d.get("identity"), str):
        raise _Bad("persona.identity", "missing or not a string")
    # Other persona keys are appended to the profile (nothing dropped).
    extra = [f"{k}: {_as_str(v)}" for k, v in persona_d.items() if k != "identity"]
    scenario = _get(d, "scenario")
    dialogue = _get(d, "dialogue", types=(list,))
    if not dialogue:
        raise _Bad("dialogue", "empty (dialogue[0] must be the query)")
    query = _text(dialogue[0], "dialogue[0]")
    response = _text(dialogue[1], "dialogue[1]") if len(dialogue) > 1 else None
    rid = str(d.get("id", index))
    meta = {"dialogue_tail": [_text(x, f"dialogue[{k + 2}]") for k, x in enumerate(dialogue[2:])]} \
        if len(dialogue) > 2 else {}
    return [PersonaRecord(record_id=rid, user_id=str(d.get("user_id", rid)),
                          query=Query(text=query, situation=scenario),
                          persona=Persona(profile="\n".join([persona_d["identity"], *extra])),
                          response=response, meta=meta)]


def _parse_flythinker(d: dict, index: int) -> list[PersonaRecord]:
    try:
        return [PersonaRecord.from_dict(d)]
    except KeyError as e:
        raise _Bad(str(e.args[0]), "missing") from None
    except FieldError as e:
        raise _Bad(e.field, e.problem) from None
    except (TypeError, ValueError) as e:
        raise _Bad("record", str(e)) from None


_PARSERS: dict[str, Callable[[dict, int], list[PersonaRecord]]] = {
    "longlamp": _parse_longlamp, "personaemp": _parse_personaemp, "perm": _parse_perm,
    "flythinker": _parse_flythinker,
}


def detect_format(item: dict) -> str:
    """Guess the format of one raw record from its keys; ``ValueError`` when none fits."""
    if not isinstance(item, dict):
        raise ValueError(f"cannot detect format: records must be JSON objects, got {type(item).__name__}")
    keys = set(item)
    if {"record_id", "query"} <= keys:
        return "flythinker"
    if "queries" in keys and ("conversation" in keys or "extracted_memory" in keys or "persona" in keys):
        return "personaemp"
    if "dialogue" in keys and ("scenario" in keys or "persona" in keys):
        return "perm"
    if "profile" in keys and ({"inp", "input"} & keys):
        return "longlamp"
    raise ValueError(f"cannot detect format from keys {sorted(keys)}; pass format= one of {FORMATS[1:]}")


def load_records(path: str | Path, format: str = "auto", on_error: str = "raise") -> list[PersonaRecord]:
    """Read ``path`` (JSON list/object or JSON lines) into records.

    ``format``: one of ``auto``, ``longlamp``, ``personaemp``, ``perm``, ``flythinker`` (module docstring).
    ``on_error``: ``"raise"`` (default) raises :class:`RecordError` on the first malformed record;
    ``"skip"`` skips malformed records and warns with their count and the first error.
    """
    return parse_records(read_json_items(path), str(path), format=format, on_error=on_error)


def _parse_item(parse, item: Any, i: int, source: str) -> list[PersonaRecord] | RecordError:
    """Records of raw item `i`, or the RecordError that says what is wrong with it."""
    rid = item.get("session_id", item.get("record_id", item.get("id"))) if isinstance(item, dict) else None
    try:
        if not isinstance(item, dict):
            raise _Bad("<record>", f"expected a JSON object, got {type(item).__name__}")
        return parse(item, i)
    except _Bad as e:
        return RecordError(source, i, rid, e.field, e.problem)
    except FieldError as e:  # a record dataclass's own check (a text field of another format's record)
        return RecordError(source, i, rid, e.field, e.problem)
    except (TypeError, ValueError) as e:
        return RecordError(source, i, rid, "record", str(e))


def parse_records(items: list[Any], source: str, format: str = "auto", on_error: str = "raise"
                  ) -> list[PersonaRecord]:
    """Raw JSON items (as :func:`.jsonio.read_json_items` returns them) -> records; `source` names them in errors.

    Arguments as in :func:`load_records` (which is ``parse_records(read_json_items(path), str(path), ...)``).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if format == "auto":
        if not items:
            return []
        format = detect_format(items[0])
    parse = _PARSERS[format]
    records: list[PersonaRecord] = []
    errors: list[RecordError] = []
    empty = 0
    for i, item in enumerate(items):
        recs = _parse_item(parse, item, i, source)
        if isinstance(recs, RecordError):
            if on_error == "raise":
                raise recs
            errors.append(recs)
        else:
            empty += not recs
            records.extend(recs)
    if errors:
        warnings.warn(f"{source}: skipped {len(errors)} of {len(items)} malformed records (first: {errors[0]})",
                      stacklevel=3)
    if empty:
        warnings.warn(f"{source}: {empty} of {len(items)} records produced no examples (e.g. sessions with an "
                      "empty 'queries' list)", stacklevel=3)
    return records


def save_records(records: list[PersonaRecord], path: str | Path) -> Path:
    """Write records as JSON lines in the ``flythinker`` format (read back with :func:`load_records`); returns
    `path`. Written atomically (``flythinker.hub.atomic_write_bytes``): a killed writer leaves the old file or
    none, never a truncated one that would still parse."""
    from flythinker.hub import atomic_write_bytes

    text = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)
    return atomic_write_bytes(path, text.encode("utf-8"))
