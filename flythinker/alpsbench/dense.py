"""Task 3 with the dense retriever of :mod:`flythinker.memory.dense_retriever`: training on the train split only,
and a paired comparison with BM25 on identical candidate pools.

- :func:`split_sessions`: held-out sessions are those :func:`~flythinker.alpsbench.data.session_split` calls
  ``test``; the rest train, and one in ``VAL_SHARE`` of them (a second hash) is kept for validation (early
  stopping, choosing a head, the hybrid's BM25 weight).
- :func:`training_pairs`: (query, gold memory) pairs of Task 3, optionally also every Task 4 query with its
  memory, of the given sessions.
- :func:`embed_texts`: one pass of the frozen model over every query and memory text a run needs (the pools'
  candidates included), so that training and scoring only read cached features.
- :func:`fit_head` / :func:`frozen_baseline`: a trained head, or the untrained cosine of standardised features.
- :func:`compare_rankers`: every ranker on the same pools (:func:`~flythinker.alpsbench.candidate_pool`, seeded
  per session, as the BM25 benchmark draws them), per-session outcomes, so ours - BM25 is a paired difference.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flythinker.memory.dense_retriever import (
    DenseRetriever,
    DualEncoder,
    FeatureSpec,
    FrozenEncoder,
    frozen_dual,
    zscore,
)
from flythinker.memory.dense_training import BankFeatures, PairFeatures, TrainConfig, train_head
from flythinker.memory.retrieval import BM25Retriever

from .data import Packet, session_split
from .evaluate import mean_ci
from .matching import normalize_text
from .retrieval_task import candidate_pool, memory_bank, selection_scores

VAL_SHARE = 10
HYBRID_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # BM25 weights tried for the hybrid (0: dense only)
Ranker = Callable[[str, list[dict]], int]


@dataclass(frozen=True)
class Pair:
    """A (query, gold memory value) training pair of one session; ``source`` is ``task3`` or ``task4``."""

    session_id: str
    query: str
    memory: str
    source: str = "task3"


@dataclass
class Splits:
    """Sessions with a Task 3 item: ``train`` (head training), ``val`` (validation), ``test`` (held out)."""

    train: list[Packet]
    val: list[Packet]
    test: list[Packet]


def is_validation(session_id: str, share: int = VAL_SHARE) -> bool:
    """One training session in ``share`` (by SHA-256 of ``"val:" + id``) is a validation session."""
    return int(hashlib.sha256(f"val:{session_id}".encode()).hexdigest(), 16) % share == 0


def split_sessions(packets: Sequence[Packet], max_sessions: int | None = None, seed: int = 0) -> Splits:
    """Train / validation / held-out test sessions (only those with Task 3); ``max_sessions`` keeps a seeded sample
    of at most that many test and that many training (train + validation) sessions, for smoke runs."""
    t3 = [p for p in packets if p.task3 is not None]
    test = [p for p in t3 if session_split(p.session_id) == "test"]
    train = [p for p in t3 if session_split(p.session_id) == "train"]
    if max_sessions:
        rng = random.Random(seed)
        test = rng.sample(test, min(max_sessions, len(test)))
        train = rng.sample(train, min(max_sessions, len(train)))
    return Splits([p for p in train if not is_validation(p.session_id)],
                  [p for p in train if is_validation(p.session_id)], test)


def training_pairs(packets: Sequence[Packet], with_task4: bool = False) -> list[Pair]:
    """Task 3 (query, gold memory) pairs of ``packets``; with ``with_task4`` also each Task 4 query with its
    memory (empty queries or memories are skipped)."""
    out = [Pair(p.session_id, p.task3.query, p.task3.gold_value) for p in packets if p.task3 is not None]
    if with_task4:
        out += [Pair(p.session_id, str(q.get("query") or ""), r.memory_value, "task4")
                for p in packets for r in p.task4 for q in r.queries if q.get("query") and r.memory_value]
    return out


def pools_by_level(items: Sequence[Packet], bank: Sequence[tuple[str, dict]], levels: Sequence[int],
                   seed: int = 0) -> dict[int, list[list[dict]]]:
    """``{n: [candidate_pool(item, bank, n, seed) for item in items]}``."""
    return {n: [candidate_pool(p, bank, n, seed) for p in items] for n in levels}


def embed_texts(encoder: FrozenEncoder, queries: Sequence[str], memories: Sequence[str]) -> dict[str, Any]:
    """Encode (or find cached) every query and memory text; returns counts and the model's work."""
    before = (encoder.texts_encoded, encoder.tokens_encoded, encoder.seconds)
    encoder.encode(list(dict.fromkeys(queries)), "query")
    encoder.encode(list(dict.fromkeys(memories)), "memory")
    return {"queries": len(set(queries)), "memories": len(set(memories)),
            "texts_encoded": encoder.texts_encoded - before[0], "tokens_encoded": encoder.tokens_encoded - before[1],
            "model_seconds": encoder.seconds - before[2]}


class _Ids:
    """Stable int ids of strings (sessions, normalised memory texts)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, values: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.ids.setdefault(v, len(self.ids)) for v in values], dtype=torch.long)


def _features(encoder: FrozenEncoder, spec: FeatureSpec, texts: Sequence[str], kind: str) -> torch.Tensor:
    return spec.select(encoder.encode(texts, kind), encoder.layers)


def pair_features(encoder: FrozenEncoder, spec: FeatureSpec, pairs: Sequence[Pair], groups: _Ids,
                  keys: _Ids) -> PairFeatures:
    """Cached features of ``pairs``: `[N, D]` each side, with session and memory-text ids."""
    return PairFeatures(_features(encoder, spec, [p.query for p in pairs], "query"),
                        _features(encoder, spec, [p.memory for p in pairs], "memory"),
                        groups([p.session_id for p in pairs]), keys([normalize_text(p.memory) for p in pairs]))


def bank_features(encoder: FrozenEncoder, spec: FeatureSpec, bank: Sequence[tuple[str, dict]], groups: _Ids,
                  keys: _Ids) -> BankFeatures:
    """Cached features `[M, D]` of bank memories (``(session_id, {"value", ...})``), with their ids."""
    values = [str(m.get("value") or "") for _, m in bank]
    return BankFeatures(_features(encoder, spec, values, "memory"), groups([s for s, _ in bank]),
                        keys([normalize_text(v) for v in values]))


def fit_head(encoder: FrozenEncoder, spec: FeatureSpec, splits: Splits, *, with_task4: bool = False,
             config: TrainConfig | None = None) -> tuple[DualEncoder, dict[str, Any]]:
    """Train a head on the training sessions' pairs (negatives: their Task 1 memories), early-stopped on the
    validation sessions' Task 3 pairs. Returns the dual encoder and the training history (with pair counts)."""
    groups, keys = _Ids(), _Ids()
    pairs = training_pairs(splits.train, with_task4)
    train = pair_features(encoder, spec, pairs, groups, keys)
    bank = bank_features(encoder, spec, memory_bank(splits.train), groups, keys)
    val = pair_features(encoder, spec, training_pairs(splits.val), groups, keys) if splits.val else None
    head, hist = train_head(train, bank, val=val, config=config)
    hist.update(n_pairs=len(pairs), n_bank=len(bank.memories), n_val=0 if val is None else len(val.queries))
    return DualEncoder(encoder, head, spec), hist


def frozen_baseline(encoder: FrozenEncoder, spec: FeatureSpec, splits: Splits) -> DualEncoder:
    """The untrained scorer (cosine of standardised frozen features; statistics from the training sessions)."""
    pairs = training_pairs(splits.train)
    queries = _features(encoder, spec, [p.query for p in pairs], "query")
    memories = _features(encoder, spec, [str(m.get("value") or "") for _, m in memory_bank(splits.train)], "memory")
    return frozen_dual(encoder, spec, queries, memories)


def _values(pool: list[dict]) -> list[str]:
    return [str(c.get("value") or "") for c in pool]


def dense_ranker(dual: DualEncoder) -> Ranker:
    """``(query, candidates) -> chosen index`` by the dual encoder (hybrid when its ``bm25_weight`` > 0)."""
    return lambda query, pool: DenseRetriever(_values(pool), dual).rank(query, 1)[0]


def compare_rankers(items: Sequence[Packet], pools: dict[int, list[list[dict]]], rankers: dict[str, Ranker],
                    progress: Callable | None = None) -> dict[int, dict[str, dict[str, list[float]]]]:
    """Per level and ranker, the per-item ``accuracy`` / ``harness`` / ``paper_overlap`` outcomes on the same
    pools (``pools[n][i]`` is item i's pool at n distractors)."""
    out: dict[int, dict[str, dict[str, list[float]]]] = {}
    for n, level_pools in pools.items():
        res = {name: {"accuracy": [], "harness": [], "paper_overlap": []} for name in rankers}
        pairs = list(zip(items, level_pools, strict=True))
        for p, pool in progress(pairs, desc=f"d{n}") if progress else pairs:
            for name, rank in rankers.items():
                for k, v in selection_scores(p.task3, pool[rank(p.task3.query, pool)]).items():
                    res[name][k].append(v)
        out[n] = res
    return out


def summarize(outcomes: dict[int, dict[str, dict[str, list[float]]]], baseline: str = "bm25") -> dict[str, Any]:
    """Means with bootstrap 95% CIs per level and ranker, and each ranker's paired accuracy difference to
    ``baseline`` (mean and CI of the per-session differences)."""
    levels, paired = {}, {}
    for n, res in outcomes.items():
        levels[str(n)] = {name: {k: mean_ci(v) for k, v in m.items()} for name, m in res.items()}
        base = np.asarray(res[baseline]["accuracy"]) if baseline in res else None
        paired[str(n)] = {name: mean_ci(np.asarray(m["accuracy"]) - base) for name, m in res.items()
                          if base is not None and name != baseline}
    return {"levels": levels, "paired_vs_" + baseline: paired}


def tune_bm25_weight(dual: DualEncoder, items: Sequence[Packet], pools: Sequence[list[dict]],
                     grid: Sequence[float] = HYBRID_WEIGHTS) -> tuple[float, dict[str, float]]:
    """The hybrid weight with the best accuracy on (validation) ``items`` / ``pools`` (ties: the smaller weight);
    dense and BM25 scores are computed once per item."""
    hits = {w: [] for w in grid}
    for p, pool in zip(items, pools, strict=True):
        texts = _values(pool)
        dense = DenseRetriever(texts, dual.with_bm25_weight(0.0)).scores(p.task3.query)
        lexical = BM25Retriever(texts).scores(p.task3.query).astype(np.float64)
        for w in grid:
            s = dense if w == 0 else zscore(dense) + w * zscore(lexical)
            hits[w].append(selection_scores(p.task3, pool[int(np.argmax(s))])["accuracy"])
    acc = {str(w): float(np.mean(h)) if h else float("nan") for w, h in hits.items()}
    best = max(grid, key=lambda w: (acc[str(w)], -w))
    return float(best), acc


__all__ = ["HYBRID_WEIGHTS", "VAL_SHARE", "Pair", "Splits", "bank_features", "compare_rankers", "dense_ranker",
           "embed_texts", "fit_head", "frozen_baseline", "is_validation", "pair_features", "pools_by_level",
           "split_sessions", "summarize", "training_pairs", "tune_bm25_weight"]
