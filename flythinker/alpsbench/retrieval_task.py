"""Task 3 (retrieval): candidate pools at 100-1000 distractors, and the accuracy of a selection.

Each packet ships 101 candidates (the gold memory and 100 memories of other users; memory ids repeat across
users, so an id alone does not identify a candidate). :func:`candidate_pool` grows the pool to ``n`` distractors
the way the paper built its larger tracks -- more memories drawn at random from other users' human-verified
memories -- seeded per session, so every run sees the same pools.

:func:`selection_scores` scores one chosen candidate three ways:

- ``accuracy``: the chosen candidate's value is the gold memory's value (normalised text): the strict measure;
- ``harness``: the public harness's proxy, id match or value match (lenient: a distractor sharing the gold id
  counts as right);
- ``paper_overlap``: the paper's deterministic grader for retrieval baselines: the share of the gold memory's
  tokens found (as substrings) in the chosen memory's text, counted as used when >= 0.2.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from .data import Packet, Task3Item
from .matching import normalize_text

DISTRACTOR_LEVELS = (100, 300, 500, 700, 1000)


def _seed(session_id: str, n: int, seed: int) -> int:
    return int(hashlib.sha256(f"{session_id}:{n}:{seed}".encode()).hexdigest()[:12], 16)


def memory_bank(packets: Sequence[Packet]) -> list[tuple[str, dict[str, Any]]]:
    """``(session_id, {"memory_id", "value", "label"})`` for every Task 1 gold memory of ``packets``."""
    return [(p.session_id, {"memory_id": m.memory_id, "value": m.value, "label": m.label})
            for p in packets for m in (p.task1_gold or [])]


def candidate_pool(packet: Packet, bank: Sequence[tuple[str, dict[str, Any]]], n: int,
                   seed: int = 0) -> list[dict[str, Any]]:
    """The packet's Task 3 candidates with ``n`` distractors: its own 100 when ``n <= 100`` (the first ``n``),
    else its own plus ``n - 100`` drawn from ``bank`` memories of other sessions (no repeated values), then
    shuffled; ``ValueError`` when the bank cannot supply them. Deterministic per (session, n, seed)."""
    t = packet.task3
    if t is None:
        raise ValueError(f"{packet.session_id} has no Task 3 item")
    gold_norm = normalize_text(t.gold_value)
    own = list(t.candidates)
    gold = [c for c in own if normalize_text(c.get("value")) == gold_norm][:1]
    others = [c for c in own if c not in gold]
    if n <= len(others):
        distract = others[:n]
    else:
        rng = random.Random(_seed(packet.session_id, n, seed))
        seen = {normalize_text(c.get("value")) for c in own}
        pool = [m for sid, m in bank if sid != packet.session_id]
        extra = []
        for m in rng.sample(pool, min(len(pool), 4 * n)):
            v = normalize_text(m["value"])
            if v and v not in seen:
                seen.add(v)
                extra.append(m)
            if len(others) + len(extra) >= n:
                break
        distract = others + extra
        if len(distract) < n:
            raise ValueError(f"{packet.session_id}: only {len(distract)} distinct distractors for n={n}: the memory "
                             "bank is too small (load more sessions)")
    out = gold + distract
    random.Random(_seed(packet.session_id, -n, seed)).shuffle(out)
    return out


def paper_overlap(chosen_text: str, gold_text: str) -> float:
    """Share of the gold text's distinct tokens that occur (as substrings) in the chosen text."""
    chosen, tokens = normalize_text(chosen_text), set(normalize_text(gold_text).split())
    if not chosen or not tokens:
        return 0.0
    return min(1.0, sum(1 for tok in tokens if tok in chosen) / len(tokens))


def selection_scores(item: Task3Item, chosen: dict[str, Any] | None) -> dict[str, float]:
    """``accuracy`` / ``harness`` / ``paper_overlap`` (see module doc) of one chosen candidate (None: nothing
    chosen, all 0)."""
    if chosen is None:
        return {"accuracy": 0.0, "harness": 0.0, "paper_overlap": 0.0}
    value_ok = normalize_text(chosen.get("value")) == normalize_text(item.gold_value)
    id_ok = str(chosen.get("memory_id", "")).strip().lower() == item.gold_id.strip().lower()
    return {"accuracy": float(value_ok), "harness": float(value_ok or id_ok),
            "paper_overlap": float(paper_overlap(str(chosen.get("value") or ""), item.gold_value) >= 0.2)}


__all__ = ["DISTRACTOR_LEVELS", "candidate_pool", "memory_bank", "paper_overlap", "selection_scores"]
