"""Predictors: public ``model_input`` rows in, prediction rows out (the harness's contract).

A predictor maps a batch of rows of one task to prediction rows with exactly the keys AlpsBench's harness
accepts (``benchmark_id`` plus ``memory_items`` for Task 1/2, ``answer``/``reason``/``selected_memory_id`` for
Task 3, ``answer``/``used_memory_fact`` for Task 4) and keeps a :class:`ParseStats` of unreadable model outputs
(an unreadable output still gives a valid row -- an empty list or empty answer -- and is counted).

- :class:`BM25Predictor`: Task 3 by BM25 over the candidates (no model).
- :class:`ModelPredictor`: every task through a judge backend (local HF model or FlyThinker pair, OpenAI-compatible
  endpoint, callable) with :mod:`flythinker.memory.operations`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flythinker.memory.parse import ParseStats
from flythinker.memory.schema import MemoryItem, items_from_list

PREDICTION_KEYS = {"task1": ("benchmark_id", "memory_items"), "task2": ("benchmark_id", "memory_items"),
                   "task3": ("benchmark_id", "answer", "reason", "selected_memory_id"),
                   "task4": ("benchmark_id", "answer", "used_memory_fact")}


def row_task(row: dict[str, Any]) -> str:
    """The row's task (``task1`` .. ``task4``); ``ValueError`` for anything else."""
    task = row.get("task") if isinstance(row, dict) else None
    if task not in PREDICTION_KEYS or "benchmark_id" not in row or not isinstance(row.get("input"), dict):
        raise ValueError("not an AlpsBench model_input row (needs 'benchmark_id', 'task' in task1..task4, 'input')")
    return task


def _public_item(m: MemoryItem) -> dict[str, Any]:
    d = m.to_dict()
    d["evidence_text"] = d.pop("evidence", {}).get("text", "")
    return {k: v for k, v in d.items() if v is not None}


def _memories(row: dict) -> list[MemoryItem]:
    return items_from_list([m for m in row["input"].get("memory") or [] if isinstance(m, dict)], strict=False)


def _task4_memories(row: dict) -> list[MemoryItem]:
    mi = row["input"].get("model_input") or {}
    sel = mi.get("selected_memory")
    return [MemoryItem.from_dict(sel, strict=False)] if isinstance(sel, dict) and sel.get("value") else []


class BM25Predictor:
    """Task 3: the candidate with the highest Okapi BM25 score for the query."""

    def __init__(self):
        self.stats = ParseStats()

    def predict(self, rows: Sequence[dict]) -> list[dict]:
        from .evaluate import bm25_ranker

        out = []
        for row in rows:
            if row_task(row) != "task3":
                raise ValueError(f"the bm25 predictor answers Task 3 only, got {row['task']}")
            cands = row["input"].get("candidate_memories") or []
            best = cands[bm25_ranker(str(row["input"].get("query") or ""), cands)] if cands else {}
            out.append({"benchmark_id": row["benchmark_id"], "answer": str(best.get("value") or ""),
                        "reason": "highest BM25 score for the query", "selected_memory_id":
                            str(best.get("memory_id") or "")})
            self.stats.record(None)
        return out


class ModelPredictor:
    """All tasks through ``backend`` (a :class:`~flythinker.empathy.backends.JudgeBackend`)."""

    def __init__(self, backend, max_new_tokens: int = 512):
        self.backend, self.max_new_tokens = backend, max_new_tokens
        self.stats = ParseStats()

    def _merge(self, stats: ParseStats) -> None:
        self.stats.ok += stats.ok
        self.stats.failed += stats.failed
        self.stats.reasons.update(stats.reasons)

    def predict(self, rows: Sequence[dict]) -> list[dict]:
        tasks = {row_task(r) for r in rows}
        if len(tasks) != 1:
            raise ValueError(f"one task per batch, got {sorted(tasks)}")
        return getattr(self, f"_{tasks.pop()}")(list(rows))

    def _task1(self, rows):
        from flythinker.memory.operations import extract

        items, stats = extract(self.backend, [r["input"].get("dialogue") or [] for r in rows], self.max_new_tokens)
        self._merge(stats)
        return [{"benchmark_id": r["benchmark_id"], "memory_items": [_public_item(m) for m in (it or [])]}
                for r, it in zip(rows, items)]

    def _task2(self, rows):
        from flythinker.memory.operations import update

        items, stats = update(self.backend, [_memories(r) for r in rows],
                              [r["input"].get("new_dialogue") or [] for r in rows], self.max_new_tokens)
        self._merge(stats)
        # an unreadable update keeps the memory as it was (and is counted in stats)
        return [{"benchmark_id": r["benchmark_id"], "memory_items": [_public_item(m) for m in
                                                                     (it if it is not None else _memories(r))]}
                for r, it in zip(rows, items)]

    def _task3(self, rows):
        from flythinker.memory.operations import retrieve

        out = []
        for r in rows:
            cands = r["input"].get("candidate_memories") or []
            mems = items_from_list([c for c in cands if isinstance(c, dict)], strict=False)
            pick = retrieve(str(r["input"].get("query") or ""), mems, backend=self.backend)
            self.stats.record(None if pick else ValueError("no candidate named"))
            best = cands[pick[0]] if pick else {}
            out.append({"benchmark_id": r["benchmark_id"], "answer": str(best.get("value") or ""),
                        "reason": "chosen by the model", "selected_memory_id": str(best.get("memory_id") or "")})
        return out

    def _task4(self, rows):
        from flythinker.memory.operations import utilise

        answers, stats = utilise(self.backend, [str(r["input"].get("query") or "") for r in rows],
                                 [_task4_memories(r) for r in rows], self.max_new_tokens)
        self._merge(stats)
        return [{"benchmark_id": r["benchmark_id"], "answer": a.answer, "used_memory_fact": a.used_memory_fact}
                for r, a in zip(rows, answers)]


__all__ = ["PREDICTION_KEYS", "BM25Predictor", "ModelPredictor", "row_task"]
