"""Training the dense retriever's projection head on cached features (see :mod:`flythinker.memory.dense_retriever`).

The frozen model's features of every text are computed once; only the :class:`ProjectionHead` trains, on
(query, gold memory) pairs: InfoNCE of each query against its gold memory, the other golds of the batch
(in-batch negatives) and ``n_negatives`` memories sampled from a bank of other users' memories. A candidate of
the query's own user (group) or with the same text as its gold (key) is masked, never a negative: at retrieval
time the other candidates are other users' memories. With validation pairs the epoch of best
:func:`rank_accuracy` (gold above up to 1000 bank memories) is kept. Seconds to minutes on a CPU.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .dense_retriever import DenseRetrieverError, ProjectionHead


@dataclass
class PairFeatures:
    """Cached features of (query, gold memory) pairs: ``queries`` `[N, D]`, ``memories`` `[N, D]`, ``groups``
    `[N]` (the user / session, int), ``keys`` `[N]` (the gold memory's text id, int)."""

    queries: torch.Tensor
    memories: torch.Tensor
    groups: torch.Tensor
    keys: torch.Tensor


@dataclass
class BankFeatures:
    """Memories usable as negatives: ``memories`` `[M, D]`, ``groups`` `[M]`, ``keys`` `[M]` (text ids)."""

    memories: torch.Tensor
    groups: torch.Tensor
    keys: torch.Tensor


@dataclass
class TrainConfig:
    """Head training: embedding size, shared projection or not, AdamW, batch of pairs plus ``n_negatives`` sampled
    bank memories per step, early stopping after ``patience`` epochs without a better validation accuracy
    (against up to ``val_distractors`` bank memories)."""

    out_dim: int = 256
    tied: bool = False
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    n_negatives: int = 512
    temperature: float = 0.05
    patience: int = 6
    val_distractors: int = 1000
    seed: int = 0


def _check_pairs(pairs: PairFeatures, bank: BankFeatures | None) -> int:
    n, d = pairs.queries.shape[0], pairs.queries.shape[-1]
    if pairs.queries.dim() != 2 or pairs.memories.shape != pairs.queries.shape:
        raise DenseRetrieverError(f"query features {tuple(pairs.queries.shape)} and memory features "
                                  f"{tuple(pairs.memories.shape)} must both be [N, D]")
    if len(pairs.groups) != n or len(pairs.keys) != n:
        raise DenseRetrieverError(f"{n} pairs need {n} groups and keys, got {len(pairs.groups)} / {len(pairs.keys)}")
    if bank is not None and (bank.memories.dim() != 2 or bank.memories.shape[1] != d
                             or len(bank.groups) != len(bank.memories) or len(bank.keys) != len(bank.memories)):
        raise DenseRetrieverError(f"bank features {tuple(bank.memories.shape)} do not match the pairs' D={d} "
                                  "(or its groups / keys have another length)")
    return n


def contrastive_loss(head: ProjectionHead, q: torch.Tensor, m: torch.Tensor, groups: torch.Tensor,
                     keys: torch.Tensor, neg: BankFeatures | None = None) -> torch.Tensor:
    """InfoNCE of `[B, D]` queries against their `[B, D]` gold memories, the other golds of the batch and the
    ``neg`` memories `[K, D]`; a candidate of the query's own group or with its gold's key is masked."""
    cand, cg, ck = m, groups, keys
    if neg is not None and len(neg.memories):
        cand = torch.cat([m, neg.memories])
        cg, ck = torch.cat([groups, neg.groups]), torch.cat([keys, neg.keys])
    logits = head.scale() * head.embed_query(q) @ head.embed_memory(cand).T
    blocked = (groups[:, None] == cg[None]) | (keys[:, None] == ck[None])
    diag = torch.arange(len(q))
    blocked[diag, diag] = False
    return F.cross_entropy(logits.masked_fill(blocked, float("-inf")), diag)


@torch.no_grad()
def rank_accuracy(head: ProjectionHead, pairs: PairFeatures, bank: BankFeatures, max_distractors: int = 1000,
                  seed: int = 0) -> float:
    """Share of queries whose gold memory scores strictly above every bank memory (at most ``max_distractors``,
    one seeded sample for all) not of the query's group or gold key. O(N * M * d)."""
    _check_pairs(pairs, bank)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(bank.memories), generator=g)[:max_distractors]
    qv, gv = head.embed_query(pairs.queries), head.embed_memory(pairs.memories)
    bv = head.embed_memory(bank.memories[pick])
    gold = (qv * gv).sum(-1)
    s = qv @ bv.T
    blocked = (pairs.groups[:, None] == bank.groups[pick][None]) | (pairs.keys[:, None] == bank.keys[pick][None])
    best = s.masked_fill(blocked, float("-inf")).max(1).values if len(pick) else torch.full_like(gold, -math.inf)
    return float((gold > best).float().mean()) if len(gold) else float("nan")


def _negatives(bank: BankFeatures | None, k: int, g: torch.Generator) -> BankFeatures | None:
    if bank is None or k <= 0 or not len(bank.memories):
        return None
    idx = torch.randint(len(bank.memories), (min(k, len(bank.memories)),), generator=g)
    return BankFeatures(bank.memories[idx], bank.groups[idx], bank.keys[idx])


def _epoch(head: ProjectionHead, opt: torch.optim.Optimizer, train: PairFeatures, bank: BankFeatures | None,
           cfg: TrainConfig, g: torch.Generator) -> float:
    head.train()
    perm, total = torch.randperm(len(train.queries), generator=g), 0.0
    for s in range(0, len(perm), cfg.batch_size):
        b = perm[s:s + cfg.batch_size]
        if len(b) < 2:
            continue
        loss = contrastive_loss(head, train.queries[b], train.memories[b], train.groups[b], train.keys[b],
                                _negatives(bank, cfg.n_negatives, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(b)
    head.eval()
    return total / len(perm)


def train_head(train: PairFeatures, bank: BankFeatures | None = None, *, val: PairFeatures | None = None,
               val_bank: BankFeatures | None = None, config: TrainConfig | None = None) -> tuple[ProjectionHead, dict]:
    """Train a :class:`ProjectionHead` on cached pair features (see :func:`contrastive_loss`); with ``val`` (and
    ``val_bank``, default ``bank``) keep the epoch of best :func:`rank_accuracy`, else the last.

    Returns ``(head, history)``; history: ``loss`` and ``val_accuracy`` per epoch, ``best_epoch``, ``seconds``.
    Cost per epoch O(N * (B + K) * D * d)."""
    cfg = config or TrainConfig()
    n = _check_pairs(train, bank)
    if n < 2:
        raise DenseRetrieverError(f"training the head needs at least 2 pairs, got {n}")
    val_bank = val_bank if val_bank is not None else bank
    val = val if val is not None and len(val.queries) else None
    if val is not None and val_bank is None:
        raise DenseRetrieverError("validation needs a bank of distractor memories (val_bank or bank)")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    head = ProjectionHead(train.queries.shape[1], cfg.out_dim, tied=cfg.tied, temperature=cfg.temperature)
    mems = train.memories if bank is None else torch.cat([train.memories, bank.memories])
    head.fit_standardizer(train.queries, mems)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hist: dict[str, Any] = {"loss": [], "val_accuracy": [], "best_epoch": None}
    best, best_state, t0 = -1.0, None, time.perf_counter()
    for epoch in range(cfg.epochs):
        hist["loss"].append(_epoch(head, opt, train, bank, cfg, g))
        if val is None:
            continue
        acc = rank_accuracy(head, val, val_bank, cfg.val_distractors, cfg.seed)
        hist["val_accuracy"].append(acc)
        if acc > best:
            best, best_state, hist["best_epoch"] = acc, copy.deepcopy(head.state_dict()), epoch
        elif epoch - hist["best_epoch"] >= cfg.patience:
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    hist["seconds"] = time.perf_counter() - t0
    return head.eval(), hist


__all__ = ["BankFeatures", "PairFeatures", "TrainConfig", "contrastive_loss", "rank_accuracy", "train_head"]
