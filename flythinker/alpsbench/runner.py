"""Run one AlpsBench task on a folder of annotation packets with a predictor, resumably, and score it.

The run folder holds ``predictions.jsonl`` (one prediction row per line, appended batch by batch and flushed),
``scores.jsonl`` and ``summary.json`` (written atomically at the end). A second run on the same folder skips the
rows already predicted (a half-written last line from a killed run is dropped and redone); the folder is locked
(``filelock``) while a run uses it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flythinker.memory.schema import items_from_list

from .data import Packet, Task3Item, release_rows
from .evaluate import mean_ci
from .matching import normalize_text, score_record
from .retrieval_task import candidate_pool, memory_bank, selection_scores


class ReleasedPredictor:
    """Task 1: the paper's released parsed output of ``model`` for each session (scores the released runs through
    the same path as any predictor)."""

    def __init__(self, model: str, packets: Sequence[Packet]):
        from flythinker.memory.parse import ParseStats

        self.outputs = {p.session_id: p.task1_outputs.get(model) for p in packets}
        missing = [s for s, o in self.outputs.items() if o is None]
        if len(missing) == len(self.outputs):
            raise ValueError(f"no released Task 1 output named {model!r} in these packets")
        self.stats = ParseStats()

    def predict(self, rows: Sequence[dict]) -> list[dict]:
        from .predictors import _public_item

        out = []
        for r in rows:
            items = self.outputs.get(r["session_id"])
            self.stats.record(None if items is not None else ValueError("no released output"))
            out.append({"benchmark_id": r["benchmark_id"], "memory_items": [_public_item(m) for m in items or []]})
        return out


def task_rows(packets: Sequence[Packet], task: str, ability: str | None = None, distractors: int = 100,
              bank_packets: Sequence[Packet] | None = None) -> list[tuple[dict, dict]]:
    """(model_input, reference) rows of ``task`` for ``packets``; Task 3 pools grown to ``distractors``."""
    if task not in ("task1", "task2", "task3", "task4"):
        raise ValueError(f"task must be task1..task4, got {task!r}")
    if task == "task4" and ability not in ("ability1", "ability2", "ability3", "ability4"):
        raise ValueError(f"task4 needs --ability ability1..ability4 (the packets carry those), got {ability!r}")
    rows = [r for p in packets for r in release_rows(p, task, ability)]
    if task == "task3" and distractors != 100:
        bank = memory_bank(bank_packets or packets)
        by_id = {p.session_id: p for p in packets}
        for inp, _ in rows:
            inp["input"]["candidate_memories"] = candidate_pool(by_id[inp["session_id"]], bank, distractors)
    return rows


def score_row(task: str, pred: dict, ref: dict) -> dict[str, float]:
    """Per-row scores: Task 1/2 the record-matching score (``score``, 0-100) and F1; Task 3 selection accuracy;
    Task 4 the harness's grounding proxy (``used_memory_fact`` contains or is contained in the gold memory)."""
    g = ref["gold"]
    if task in ("task1", "task2"):
        gold = items_from_list(g["memory_items"] if task == "task1" else g["answer"], strict=False)
        r = score_record(gold, items_from_list(pred["memory_items"], strict=False, id_prefix="p"))
        return {"score": r.algo, "f1": r.f1, "precision": r.precision, "recall": r.recall}
    if task == "task3":
        item = Task3Item("", [], str(g["selected_memory_id"]), str(g["selected_memory"]["value"]))
        return selection_scores(item, {"memory_id": pred["selected_memory_id"], "value": pred["answer"]})
    fact, gold_v = normalize_text(pred["used_memory_fact"]), normalize_text(g["selected_memory"]["value"])
    return {"grounding": float(bool(fact and gold_v) and (fact in gold_v or gold_v in fact)),
            "answered": float(bool(pred["answer"].strip()))}


def _done(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    lines = path.read_text(encoding="utf-8").splitlines()
    for ln in lines:
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:  # a half-written line from a killed run: redone
            continue
        done[row["benchmark_id"]] = row
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()), encoding="utf-8")
    return done


@dataclass
class RunResult:
    summary: dict[str, Any]
    predictions: list[dict]


def run_task(rows: Sequence[tuple[dict, dict]], predictor, out_dir: str | Path, task: str, batch_size: int = 8,
             progress: Callable | None = None, meta: dict | None = None) -> RunResult:
    """Predict every row not yet in ``out_dir/predictions.jsonl``, then score all rows and write the summary."""
    from filelock import FileLock, Timeout

    from flythinker.hub import atomic_write_json

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / ".run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"run folder {out} is in use by another run") from None
    try:
        t0 = time.time()
        pred_path = out / "predictions.jsonl"
        done = _done(pred_path)
        todo = [r for r in rows if r[0]["benchmark_id"] not in done]
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        with pred_path.open("a", encoding="utf-8") as fh:
            for batch in progress(batches, desc=task, unit="batch") if progress else batches:
                for p in predictor.predict([inp for inp, _ in batch]):
                    done[p["benchmark_id"]] = p
                    fh.write(json.dumps(p, ensure_ascii=False) + "\n")
                fh.flush()
        preds = [done[inp["benchmark_id"]] for inp, _ in rows]
        scores = [{"benchmark_id": inp["benchmark_id"], **score_row(task, p, ref)}
                  for (inp, ref), p in zip(rows, preds)]
        (out / "scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores), encoding="utf-8")
        keys = [k for k in scores[0] if k != "benchmark_id"] if scores else []
        summary = {"task": task, "n": len(rows), "resumed": len(rows) - len(todo), "predicted": len(todo),
                   "metrics": {k: mean_ci([s[k] for s in scores]) for k in keys},
                   "parse": predictor.stats.to_dict(), "wall_s": time.time() - t0, **(meta or {})}
        atomic_write_json(out / "summary.json", summary)
        return RunResult(summary, preds)
    finally:
        lock.release()


__all__ = ["ReleasedPredictor", "RunResult", "run_task", "score_row", "task_rows"]
