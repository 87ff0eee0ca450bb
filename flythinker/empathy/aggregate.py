"""Aggregation of per-dimension judge scores into a reward (formulas from the PERM and PereGRM code; see
``../shared/research/papers.md`` sections 2.2 and 3).

With ``s_d = score_d / hi_d`` in (0, 1] for the empathy dimensions d = 1..n and ``B`` the bystander's 0-100 score:

- mean:      ``sum_d s_d / n``
- harmonic:  ``n / sum_d (1 / s_d)``  (0 if any ``s_d`` is 0: PereGRM's convention)
- geometric: ``(prod_d s_d) ** (1/n)``
- bystander term: ``coef * (B / 100 - 1)``, in ``[-coef, 0]``
- length penalty (PERM): ``-coef * max(0, n_tokens - limit)``
- reward = aggregate + bystander term (+ length penalty)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def aggregate(normalised: Sequence[float], how: str = "harmonic") -> float:
    """Combine per-dimension scores already divided by their maximum (each in [0, 1])."""
    if not normalised:
        raise ValueError("aggregate needs at least one score")
    bad = [s for s in normalised if not (0.0 <= s <= 1.0) or math.isnan(s)]
    if bad:
        raise ValueError(f"normalised scores must lie in [0, 1], got {bad}")
    n = len(normalised)
    if how == "mean":
        return sum(normalised) / n
    if how == "harmonic":
        return 0.0 if any(s == 0 for s in normalised) else n / sum(1.0 / s for s in normalised)
    if how == "geometric":
        return math.prod(normalised) ** (1.0 / n)
    raise ValueError(f"unknown aggregation {how!r}; choose mean, harmonic or geometric")


def bystander_term(score_0_100: float, coef: float) -> float:
    """``coef * (B/100 - 1)``: 0 for a perfect bystander score, ``-coef`` for 0."""
    if not 0.0 <= score_0_100 <= 100.0:
        raise ValueError(f"bystander score must be in [0, 100], got {score_0_100}")
    return coef * (score_0_100 / 100.0 - 1.0)


def length_penalty(n_tokens: int, limit: int = 768, coef: float = 0.001) -> float:
    """PERM's ``-coef * max(0, n_tokens - limit)``."""
    return -coef * max(0, int(n_tokens) - int(limit))


def combine(scores: Mapping[str, float], his: Mapping[str, int], how: str, bystander: float | None = None,
            bystander_coef: float = 0.0, penalty: float = 0.0) -> float:
    """The reward from raw dimension ``scores`` (divided by ``his[d]``), an optional bystander score and a
    length penalty (already signed)."""
    agg = aggregate([scores[d] / his[d] for d in scores], how)
    term = bystander_term(bystander, bystander_coef) if bystander is not None and bystander_coef else 0.0
    return agg + term + penalty


__all__ = ["aggregate", "bystander_term", "combine", "length_penalty"]
