"""PersonaEmp's evaluation protocol (after PersonalizedEmpathy ``evaluation/``; the code is ours).

1. **Criteria, once.** For every (session, query, dimension) the criteria judge writes 4-6 weighted criteria
   specific to this user (:func:`~flythinker.empathy.prompts.criteria_prompt`), stored in a *sidecar* JSON file
   in the authors' layout ``[{"session_id", "criterias": [{"query_id", "resonation": text, ...}, ...]}, ...]``.
   The file is rewritten atomically after every ``save_every`` calls under a lock, and a rerun fills only what
   is missing (resumable). Criteria embedded in the data (``queries[j].criteria``) are used as they are.
2. **Judging a predictions file** against those fixed criteria (PereGRM's fixed-criteria judge, ``role=
   "evaluation"``): the judge sees memories, situation, persona, the query and the response, never the past
   conversation. Predictions: the authors' layout (a list aligned with the sessions, each ``{"responses":
   [{"response": text}, ...]}`` aligned with its queries) or rows ``{"query_id", "response"}``.
3. **Report.** Per-dimension tables (n, unparsed, mean; by query category) and the authors' summary figure:
   the mean over dimensions of each dimension's mean score, divided by 5 (unparsed scores left out, as theirs).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flythinker.persona.records import PersonaRecord

from .judge import EmpathyJudge, JudgeResult
from .parse import JudgeParseError, parse_criteria
from .prompts import criteria_prompt
from .records import JudgeContext
from .rubrics import Rubric

DIMENSIONS = ("resonation", "expression", "reception")


def load_sessions(path: str | Path) -> tuple[list[dict], list[PersonaRecord]]:
    """The raw sessions of a PersonaEmp file and their records (one per query, in file order)."""
    from flythinker.persona.jsonio import read_json_items
    from flythinker.persona.loaders import parse_records

    items = read_json_items(Path(path))
    return items, parse_records(items, str(path), format="personaemp")


def protocol_context(rec: PersonaRecord, criteria: dict[str, str] | None = None) -> JudgeContext:
    """The judge's view under the protocol: memories, situation, persona and query (no past conversation)."""
    return JudgeContext(query=rec.query.text, persona=rec.persona.profile or "",
                        memories=[m.value for m in rec.memories], situation=rec.query.situation or "",
                        criteria=dict(criteria if criteria is not None else rec.meta.get("criteria") or {}),
                        item_id=rec.record_id)


# ---------------------------------------------------------------- 1. the criteria sidecar

def _init_sidecar(sessions: list[dict], existing: list | None, path: Path) -> list[dict]:
    """The sidecar skeleton for ``sessions``, with what ``existing`` already holds (checked to match)."""
    out = []
    for i, s in enumerate(sessions):
        sid = str(s.get("session_id") or i)
        crits = [{"query_id": str(q.get("query_id") or f"{sid}:{j}")} for j, q in enumerate(s.get("queries", []))]
        if existing is not None and i < len(existing):
            old = existing[i]
            if not isinstance(old, dict) or str(old.get("session_id")) != sid or \
                    len(old.get("criterias", [])) != len(crits):
                raise ValueError(f"{path}: entry {i} does not match session {sid!r} of the data (another data file's "
                                 "criteria?); use a new --criteria file")
            for c, o in zip(crits, old["criterias"]):
                c.update({k: v for k, v in o.items() if k in DIMENSIONS and isinstance(v, str) and v.strip()})
        out.append({"session_id": sid, "criterias": crits})
    return out


def write_criteria(sessions: list[dict], records: list[PersonaRecord], path: str | Path, judge: EmpathyJudge,
                   dimensions: Sequence[str] = DIMENSIONS, save_every: int = 16, limit: int | None = None
                   ) -> dict[str, int]:
    """Fill the criteria sidecar at ``path`` (created, or resumed when it exists) with ``judge``'s backend and
    its ``criteria_settings`` (``limit``: only the first N queries). Queries whose data embeds criteria are
    skipped. Returns counts: ``written``,
    ``present`` (already there), ``failed`` (empty outputs, left missing for a rerun)."""
    from filelock import FileLock

    from flythinker.hub import atomic_write_bytes

    path = Path(path)
    with FileLock(str(path) + ".lock", timeout=0):
        existing = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        if existing is not None and not isinstance(existing, list):
            raise ValueError(f"{path}: a criteria file is a JSON list of sessions")
        side = _init_sidecar(sessions, existing, path)
        slots = [c for s in side for c in s["criterias"]]
        jobs, counts = [], {"written": 0, "present": 0, "failed": 0}
        for rec, slot in list(zip(records, slots, strict=True))[:limit]:
            for d in dimensions:
                if slot.get(d) or (rec.meta.get("criteria") or {}).get(d):
                    counts["present"] += 1
                else:
                    jobs.append((slot, d, criteria_prompt(judge.rubric.dimension(d), protocol_context(rec, {}))))
        cs = judge.criteria_settings

        def save() -> None:
            atomic_write_bytes(path, json.dumps(side, ensure_ascii=False, indent=1).encode("utf-8"))

        for s in range(0, len(jobs), max(1, save_every)):
            chunk = jobs[s:s + save_every]
            texts = judge.backend.generate([j[2] for j in chunk], n=1, temperature=cs.temperature, top_p=cs.top_p,
                                           max_new_tokens=cs.max_new_tokens)
            for (slot, d, _), (text,) in zip(chunk, texts):
                try:
                    slot[d] = parse_criteria(text)
                    counts["written"] += 1
                except JudgeParseError:
                    counts["failed"] += 1
            save()
        if not jobs:
            save()
    return counts


def read_criteria(path: str | Path | None, records: list[PersonaRecord], limit: int | None = None
                  ) -> list[dict[str, str]]:
    """Per record (the first ``limit``), its fixed criteria: the sidecar's (matched by position and checked by
    ``query_id``), else the data's own. A missing dimension raises ``ValueError`` naming the query."""
    side = json.loads(Path(path).read_text(encoding="utf-8")) if path else []
    slots = [c for s in side for c in s.get("criterias", [])]
    if side and len(slots) != len(records):
        raise ValueError(f"{path}: {len(slots)} criteria entries for {len(records)} queries")
    out = []
    for k, rec in enumerate(records[:limit]):
        crit = dict(rec.meta.get("criteria") or {})
        if slots:
            if str(slots[k].get("query_id")) != rec.record_id:
                raise ValueError(f"{path}: entry {k} is for query {slots[k].get('query_id')!r}, not {rec.record_id!r}")
            crit.update({d: v for d, v in slots[k].items() if d in DIMENSIONS and v})
        missing = [d for d in DIMENSIONS if not crit.get(d)]
        if missing:
            raise ValueError(f"query {rec.record_id!r} has no criteria for {missing}: write them first "
                             "(flythinker judge ... --criteria FILE)")
        out.append(crit)
    return out


# ---------------------------------------------------------------- 2. predictions

def read_predictions(path: str | Path, sessions: list[dict], records: list[PersonaRecord]) -> list[str]:
    """One response per record, from the authors' aligned layout or from ``{"query_id", "response"}`` rows."""
    from flythinker.persona.jsonio import read_json_items

    items = read_json_items(Path(path))
    if items and isinstance(items[0], dict) and "responses" in items[0]:
        if len(items) != len(sessions):
            raise ValueError(f"{path}: {len(items)} prediction sessions for {len(sessions)} data sessions")
        out = []
        for i, (p, s) in enumerate(zip(items, sessions)):
            resp = p.get("responses")
            if not isinstance(resp, list) or len(resp) != len(s.get("queries", [])):
                raise ValueError(f"{path}: session {i} ({s.get('session_id')!r}) needs one response per query "
                                 f"({len(s.get('queries', []))})")
            out += [r.get("response") if isinstance(r, dict) else r for r in resp]
    else:
        by_id = {str(p.get("query_id")): p.get("response") for p in items if isinstance(p, dict)}
        missing = [r.record_id for r in records if r.record_id not in by_id]
        if missing:
            raise ValueError(f"{path}: no response for {len(missing)} queries (first: {missing[:3]})")
        out = [by_id[r.record_id] for r in records]
    bad = [records[k].record_id for k, r in enumerate(out) if r is not None and not isinstance(r, str)]
    if bad:
        raise ValueError(f"{path}: responses must be strings (queries {bad[:3]})")
    return [r or "" for r in out]


# ---------------------------------------------------------------- 3. judging and the report

def evaluate(records: list[PersonaRecord], responses: Sequence[str], criteria: Sequence[dict[str, str]],
             judge: EmpathyJudge, batch_size: int = 8) -> tuple[list[JudgeResult], dict[str, Any]]:
    """Judge ``responses`` (one per record) against the fixed ``criteria``; empty responses are not judged and
    count as unparsed. Returns the per-item results and :func:`report`."""
    if judge.rubric.dynamic_criteria:
        raise ValueError("the PersonaEmp protocol judges against fixed criteria: use get_rubric('peregrm', "
                         "dynamic_criteria=False)")
    results: list[JudgeResult | None] = [None] * len(records)
    todo = [k for k, r in enumerate(responses) if r.strip()]
    for s in range(0, len(todo), batch_size):
        idx = todo[s:s + batch_size]
        got = judge.score([responses[k] for k in idx], [protocol_context(records[k], criteria[k]) for k in idx])
        for k, r in zip(idx, got):
            results[k] = r
    for k, r in enumerate(results):
        if r is None:
            results[k] = JudgeResult(scores=dict.fromkeys(DIMENSIONS), reward=None,
                                     failures={d: "empty response" for d in DIMENSIONS})
    return results, report(records, results, judge.rubric)


def _table(values: list[float | None]) -> dict[str, Any]:
    got = [v for v in values if v is not None]
    return {"n": len(got), "unparsed": len(values) - len(got), "mean": statistics.fmean(got) if got else None}


def report(records: list[PersonaRecord], results: Sequence[JudgeResult], rubric: Rubric) -> dict[str, Any]:
    """Per-dimension tables (overall and by query category) and ``overall``: mean of the per-dimension means /
    the scale maximum (the authors' "overall empathy score"; ``None`` when a dimension has no score)."""
    dims = [d.name for d in rubric.dimensions]
    per_dim = {d: _table([r.scores.get(d) for r in results]) for d in dims}
    cats: dict[str, dict[str, Any]] = {}
    for cat in sorted({rec.query.category or "-" for rec in records}):
        rows = [r for rec, r in zip(records, results) if (rec.query.category or "-") == cat]
        cats[cat] = {d: _table([r.scores.get(d) for r in rows]) for d in dims}
    means = [per_dim[d]["mean"] for d in dims]
    hi = rubric.dimensions[0].hi
    overall = None if any(m is None for m in means) else sum(means) / len(means) / hi
    return {"items": len(results), "overall": overall, "dimensions": per_dim, "by_category": cats}


def format_report(rep: dict[str, Any]) -> str:
    """The report as text: the summary figure, then the per-dimension and per-category tables."""
    ov = "-" if rep["overall"] is None else f"{rep['overall']:.4f}"
    lines = [f"overall empathy score (mean of dimension means / 5): {ov}   ({rep['items']} responses)",
             f"{'dimension':12s} {'category':22s} {'n':>5s} {'unparsed':>9s} {'mean':>7s}"]
    for d, t in rep["dimensions"].items():
        lines.append(_row(d, "all", t))
        for cat, tables in rep["by_category"].items():
            lines.append(_row("", cat, tables[d]))
    return "\n".join(lines)


def _row(d: str, cat: str, t: dict[str, Any]) -> str:
    mean = "-" if t["mean"] is None else f"{t['mean']:.3f}"
    return f"{d:12s} {cat[:22]:22s} {t['n']:5d} {t['unparsed']:9d} {mean:>7s}"


__all__ = ["DIMENSIONS", "evaluate", "format_report", "load_sessions", "protocol_context", "read_criteria",
           "read_predictions", "report", "write_criteria"]
