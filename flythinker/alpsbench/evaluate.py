"""Whole-benchmark evaluations: the released Task 1 outputs, and a retriever on Task 3 at each distractor level.

Each returns plain dicts (means, bootstrap 95% confidence intervals over sessions, counts) for the JSON reports
of ``benchmarks/alpsbench_*.py`` and ``flythinker alpsbench``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .data import Packet
from .matching import pair_table, rule_reviews, score_record
from .retrieval_task import candidate_pool, memory_bank, selection_scores

#: The paper's Table 2, Task 1 (extraction score), keyed by the model names of the released outputs.
PAPER_TASK1 = {"gemini-3-flash-preview": 51.67, "deepseek-reasoner": 47.79, "claude-sonnet-4-5-20250929": 41.64,
               "gpt-5.2": 41.43, "qwen3-max": 39.01, "gpt-4.1-mini_again": 33.69, "llama-4-maverick": 22.07}
#: The paper's nltk+bm25 retrieval accuracy at 100, 300, 500, 700, 1000 distractors (Figure 8).
PAPER_BM25 = {100: 0.259, 300: 0.192, 500: 0.168, 700: 0.152, 1000: 0.139}


def mean_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean and percentile-bootstrap 95% CI over the values (sessions)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return {"mean": float(x.mean()), "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "n": int(x.size)}


def score_released_task1(packets: Sequence[Packet], models: Sequence[str] | None = None,
                         matchers: Sequence[str] = ("greedy", "optimal"), with_rule_judge: bool = False,
                         progress: Callable | None = None) -> dict[str, Any]:
    """Score every model's released Task 1 output against the gold memories of each packet that carries both.

    Returns ``{model: {matcher: {"algo": mean_ci, "f1", "precision", "recall", "quality"}, ["rule_blend":
    mean_ci of the greedy 50/50 blend with :func:`rule_reviews`]}}`` over the sessions (one pair table per
    session and model, shared by the matchers)."""
    models = list(models or sorted({m for p in packets for m in p.task1_outputs}))
    keys = ("algo", "f1", "precision", "recall", "quality")
    out: dict[str, Any] = {}
    for name in models:
        rows = {mt: {k: [] for k in keys} for mt in matchers}
        blend: list[float] = []
        it = [p for p in packets if p.task1_gold is not None and name in p.task1_outputs]
        for p in progress(it, desc=name) if progress else it:
            gold, pred = p.task1_gold, p.task1_outputs[name]
            table = pair_table(gold, pred)
            for mt in matchers:
                r = score_record(gold, pred, matcher=mt, table=table)
                for k in keys:
                    rows[mt][k].append(getattr(r, k))
            if with_rule_judge:
                blend.append(score_record(gold, pred, reviewer=rule_reviews, table=table).final)
        out[name] = {mt: {k: mean_ci(v) for k, v in rows[mt].items()} for mt in matchers}
        if with_rule_judge:
            out[name]["rule_blend"] = mean_ci(blend)
    return out


def retrieval_accuracy(packets: Sequence[Packet], make_ranker: Callable[[str, list[dict]], int],
                       levels: Sequence[int], seed: int = 0, progress: Callable | None = None,
                       bank_packets: Sequence[Packet] | None = None) -> dict[int, Any]:
    """Task 3 at each distractor level: ``make_ranker(query, candidates) -> chosen index``. Pools come from
    :func:`candidate_pool` with the Task 1 gold memories of ``bank_packets`` (default ``packets``) as the bank.
    Returns per level the ``accuracy`` / ``harness`` / ``paper_overlap`` means with CIs."""
    bank = memory_bank(packets if bank_packets is None else bank_packets)
    items = [p for p in packets if p.task3 is not None]
    out: dict[int, Any] = {}
    for n in levels:
        scores: dict[str, list[float]] = {"accuracy": [], "harness": [], "paper_overlap": []}
        for p in progress(items, desc=f"d{n}") if progress else items:
            pool = candidate_pool(p, bank, n, seed)
            i = make_ranker(p.task3.query, pool)
            for k, v in selection_scores(p.task3, pool[i] if i is not None else None).items():
                scores[k].append(v)
        out[n] = {k: mean_ci(v) for k, v in scores.items()}
    return out


def bm25_ranker(query: str, candidates: list[dict]) -> int:
    """The top candidate by Okapi BM25 (the paper's variant) over the candidates' values."""
    from flythinker.memory.retrieval import BM25Retriever

    return BM25Retriever([str(c.get("value") or "") for c in candidates], method="robertson").rank(query, 1)[0]


__all__ = ["PAPER_BM25", "PAPER_TASK1", "bm25_ranker", "mean_ci", "retrieval_accuracy", "score_released_task1"]
