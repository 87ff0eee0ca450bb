"""Task 1 / Task 2 record matching: the AlpsBench paper's memory-to-memory score, implemented here.

Definition (AlpsBench ``docs/evaluation_metric.md`` and the paper's record matcher):

1. text is lower-cased, punctuation other than ``/ . -`` becomes a space, whitespace is collapsed;
2. a (gold, predicted) pair scores ``0.4 label + 0.4 value + 0.1 type + 0.1 confidence`` where ``label`` is
   ``2 * LCP / (len(a) + len(b))`` over ``/``-separated path segments, ``value`` is
   ``0.6 * token Jaccard + 0.4 * character similarity`` (``difflib.SequenceMatcher.ratio``), ``type`` is 1 when the
   types match, and ``confidence`` is 1 up to a 0.2 difference and falls linearly to 0 at a difference of 1
   (a missing confidence counts as 1.0);
3. pairs are matched one-to-one (greedy by score, or the optimal assignment), keeping pairs scoring >= 0.30;
4. ``F1`` counts matched pairs as true positives; ``quality`` is the mean score of the matched pairs;
5. ``algo = 100 * (0.6 quality + 0.4 F1)``.

The paper blends ``algo`` 50/50 with an LLM judge's penalty score (:func:`judge_penalty_score`, from structured
reviews of pairs, missing and extra items). :func:`rule_reviews` is a deterministic reviewer with the judge's
output schema; it is not the paper's LLM judge (see docs/alpsbench.md for what differs).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any

from flythinker.memory.schema import MemoryItem

_PUNCT = re.compile(r"[^\w\s/.\-]+")
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class MatchWeights:
    """Weights and threshold of the pair score and of the record score (the paper's defaults)."""

    label: float = 0.40
    value: float = 0.40
    type: float = 0.10
    confidence: float = 0.10
    token_weight: float = 0.6
    min_pair_score: float = 0.30
    quality_weight: float = 0.60
    coverage_weight: float = 0.40


@functools.lru_cache(maxsize=1 << 16)
def _normalize(s: str) -> str:
    return _WS.sub(" ", _PUNCT.sub(" ", s.lower().strip())).strip()


def normalize_text(s: Any) -> str:
    """Lower-case, punctuation (except ``/ . -``) to spaces, whitespace collapsed (non-strings: their JSON)."""
    if s is None:
        return ""
    if not isinstance(s, str):
        import json

        s = json.dumps(s, ensure_ascii=False)
    return _normalize(s)


def label_similarity(a: str | None, b: str | None) -> float:
    """``2 * LCP / (len(a) + len(b))`` over ``/`` path segments (0 when either is empty)."""
    pa = [p for p in (a or "").split("/") if p]
    pb = [p for p in (b or "").split("/") if p]
    if not pa or not pb:
        return 0.0
    lcp = 0
    for x, y in zip(pa, pb):
        if x != y:
            break
        lcp += 1
    return 2.0 * lcp / (len(pa) + len(pb))


def value_similarity(a: str | None, b: str | None, token_weight: float = 0.6) -> float:
    """``token_weight * Jaccard(tokens) + (1 - token_weight) * SequenceMatcher ratio`` on normalised text."""
    if not a or not b:
        return 0.0
    na, nb = normalize_text(a), normalize_text(b)
    ta, tb = set(na.split()), set(nb.split())
    jac = len(ta & tb) / len(ta | tb) if ta and tb else 0.0
    return token_weight * jac + (1.0 - token_weight) * SequenceMatcher(None, na, nb).ratio()


def confidence_similarity(a: float | None, b: float | None) -> float:
    """1 up to a difference of 0.2, then linear down to 0 at a difference of 1 (missing counts as 1.0)."""
    diff = abs((1.0 if a is None else a) - (1.0 if b is None else b))
    return max(0.0, 1.0 - max(0.0, diff - 0.2) / 0.8)


@dataclass
class Pair:
    """One accepted (gold, predicted) match with its score and parts."""

    gold: int
    pred: int
    score: float
    label: float
    value: float
    type_match: bool
    confidence: float


def pair_score(g: MemoryItem, p: MemoryItem, w: MatchWeights = MatchWeights()) -> Pair:
    """The weighted similarity of one gold and one predicted item (indices left at -1)."""
    ls = label_similarity(g.label, p.label)
    vs = value_similarity(g.value, p.value, w.token_weight)
    tm = g.type == p.type
    cs = confidence_similarity(g.confidence, p.confidence)
    s = w.label * ls + w.value * vs + w.type * float(tm) + w.confidence * cs
    return Pair(-1, -1, min(1.0, max(0.0, s)), ls, vs, tm, cs)


def pair_table(gold: Sequence[MemoryItem], pred: Sequence[MemoryItem], w: MatchWeights = MatchWeights()
               ) -> list[list[Pair]]:
    """``table[i][j]``: the :class:`Pair` of gold item ``i`` and predicted item ``j``."""
    table = [[pair_score(g, p, w) for p in pred] for g in gold]
    for i, row in enumerate(table):
        for j, pr in enumerate(row):
            pr.gold, pr.pred = i, j
    return table


def match_items(gold: Sequence[MemoryItem], pred: Sequence[MemoryItem], w: MatchWeights = MatchWeights(),
                matcher: str = "greedy", table: list[list[Pair]] | None = None) -> list[Pair]:
    """One-to-one matching of ``gold`` and ``pred`` (``greedy``: best pairs first, as the paper's default;
    ``optimal``: maximum total score, scipy's assignment), pairs below ``w.min_pair_score`` dropped.
    ``table``: a :func:`pair_table` already computed for these items (two matchers, one table)."""
    table = pair_table(gold, pred, w) if table is None else table
    if matcher == "optimal":
        return _optimal(table, w.min_pair_score)
    if matcher != "greedy":
        raise ValueError(f"matcher must be 'greedy' or 'optimal', got {matcher!r}")
    ranked = sorted((pr for row in table for pr in row), key=lambda pr: -pr.score)  # stable: ties keep order
    used_g: set[int] = set()
    used_p: set[int] = set()
    pairs = []
    for pr in ranked:
        if pr.score < w.min_pair_score:
            break
        if pr.gold in used_g or pr.pred in used_p:
            continue
        used_g.add(pr.gold)
        used_p.add(pr.pred)
        pairs.append(pr)
    return pairs


def _optimal(table: list[list[Pair]], threshold: float) -> list[Pair]:
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    if not table or not table[0]:
        return []
    scores = np.array([[pr.score for pr in row] for row in table])
    gain = np.where(scores >= threshold, scores, 0.0)
    rows, cols = linear_sum_assignment(gain, maximize=True)
    return [table[i][j] for i, j in zip(rows, cols) if scores[i, j] >= threshold]


@dataclass
class RecordScore:
    """One record's score: ``algo`` (0-100), its parts, and (when a reviewer ran) ``judge`` and ``final``."""

    algo: float
    precision: float
    recall: float
    f1: float
    quality: float
    pairs: list[Pair] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    extra: list[int] = field(default_factory=list)
    judge: float | None = None
    final: float = 0.0


def score_record(gold: Sequence[MemoryItem], pred: Sequence[MemoryItem], w: MatchWeights = MatchWeights(),
                 matcher: str = "greedy", reviewer: Callable[..., dict] | None = None,
                 judge_weight: float = 0.5, table: list[list[Pair]] | None = None) -> RecordScore:
    """Score one record. ``reviewer(gold, pred, pairs, missing, extra) -> reviews`` (the judge's schema:
    ``pair_reviews``, ``missing_reviews``, ``extra_reviews``); with it ``final = (1 - judge_weight) * algo +
    judge_weight * judge``, without it ``final = algo``. ``table``: a precomputed :func:`pair_table`."""
    pairs = match_items(gold, pred, w, matcher, table)
    tp = len(pairs)
    p = tp / len(pred) if pred else 0.0
    r = tp / len(gold) if gold else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    quality = sum(x.score for x in pairs) / max(tp, 1)
    total_w = w.quality_weight + w.coverage_weight
    algo = min(100.0, max(0.0, 100.0 * (w.quality_weight * quality + w.coverage_weight * f1) / total_w))
    used_g, used_p = {x.gold for x in pairs}, {x.pred for x in pairs}
    out = RecordScore(algo, p, r, f1, quality, pairs, [i for i in range(len(gold)) if i not in used_g],
                      [j for j in range(len(pred)) if j not in used_p], final=algo)
    if reviewer is not None:
        out.judge = judge_penalty_score(reviewer(gold, pred, pairs, out.missing, out.extra))
        out.final = (1.0 - judge_weight) * algo + judge_weight * out.judge
    return out


#: Points off per pair-level error type (the paper's judge schema).
PAIR_PENALTY = {"EQUIVALENT": 0.0, "VALUE_DRIFT": 12.0, "HALLUCINATION": 15.0, "LABEL_WRONG": 6.0,
                "TYPE_WRONG": 6.0, "OVERGENERAL": 3.0, "UNDERGENERAL": 3.0, "OTHER": 4.0}


def _severity(v: Any) -> float:
    try:
        s = min(3, max(0, int(v)))
    except (TypeError, ValueError):
        return 1.0
    return 0.5 + 0.5 * s


def judge_penalty_score(reviews: dict) -> float:
    """100 minus penalties: a pair error costs :data:`PAIR_PENALTY` x severity multiplier (0.5, 1, 1.5, 2 for
    severity 0-3), a gold item that should have been extracted 10 x, a hallucinated extra item 15 x; clipped."""
    score = 100.0
    for pr in reviews.get("pair_reviews") or []:
        score -= PAIR_PENALTY.get(str(pr.get("error_type", "OTHER")).upper(), 4.0) * _severity(pr.get("severity", 1))
    for mr in reviews.get("missing_reviews") or []:
        if mr.get("should_have_extracted") is True:
            score -= 10.0 * _severity(mr.get("severity", 1))
    for er in reviews.get("extra_reviews") or []:
        if er.get("hallucinated") is True:
            score -= 15.0 * _severity(er.get("severity", 1))
    return min(100.0, max(0.0, score))


def rule_reviews(gold: Sequence[MemoryItem], pred: Sequence[MemoryItem], pairs: Sequence[Pair],
                 missing: Sequence[int], extra: Sequence[int], equivalent_value: float = 0.65,
                 severity: int = 2) -> dict:
    """A deterministic reviewer in the judge's schema: a pair is ``EQUIVALENT`` when its value similarity is
    >= ``equivalent_value``, else ``VALUE_DRIFT``; every missing gold item should have been extracted and every
    extra item is counted hallucinated, all at ``severity``. A stand-in for the paper's LLM judge, not a copy of
    its judgements (an LLM forgives paraphrases and unannotated true facts that this rule punishes)."""
    return {
        "pair_reviews": [{"error_type": "EQUIVALENT" if p.value >= equivalent_value else "VALUE_DRIFT",
                          "severity": 0 if p.value >= equivalent_value else severity} for p in pairs],
        "missing_reviews": [{"should_have_extracted": True, "severity": severity} for _ in missing],
        "extra_reviews": [{"hallucinated": True, "severity": severity} for _ in extra],
    }


__all__ = ["PAIR_PENALTY", "MatchWeights", "Pair", "RecordScore", "confidence_similarity", "judge_penalty_score",
           "label_similarity", "match_items", "normalize_text", "pair_score", "pair_table", "rule_reviews",
           "score_record", "value_similarity"]
