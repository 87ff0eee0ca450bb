"""Persona records -> GRPO dataset rows, and held-out strategy accuracy of a policy.

A row holds ``prompt`` (the generator view as text: TRL's required column), ``prompt_ids`` (the same view as token
ids, used as is), in split context ``reasoner_prompt_ids`` (the long view), ``traits`` (JSON of the user's hidden
traits, for :class:`flythinker.rl.TraitReward`), and the judge columns ``query``, ``persona``, ``memories``,
``situation`` (for :class:`flythinker.rl.JudgeReward`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from flythinker.decode import left_pad
from flythinker.persona.metrics import classify_response
from flythinker.persona.records import PersonaRecord
from flythinker.persona.views import build_views


def grpo_rows(records: Sequence[PersonaRecord], tokenizer, mode: str = "split", max_reasoner_tokens: int | None = 512,
              max_generator_tokens: int | None = 256, view: str = "auto") -> list[dict[str, Any]]:
    """One dataset row per record (see the module docstring). ``mode``: ``"split"`` or ``"shared"``; ``view``:
    what the policy's long view holds (:func:`flythinker.persona.build_views`; ``"auto"`` keeps PersonaEmp's
    protocol: memories and query only). The judge columns always carry persona and situation."""
    rows = []
    for rec in records:
        v = build_views(rec, tokenizer, mode=mode, max_reasoner_tokens=max_reasoner_tokens,
                        max_generator_tokens=max_generator_tokens, warn=False, view=view)
        row: dict[str, Any] = {
            "record_id": rec.record_id,
            "prompt": tokenizer.decode(v.generator_prompt_ids),
            "prompt_ids": list(v.generator_prompt_ids),
            "traits": json.dumps(rec.persona.traits, sort_keys=True),
            "query": rec.query.text,
            "persona": rec.persona.profile or rec.persona.short or "",
            "memories": json.dumps([m.value for m in rec.memories]),
            "situation": rec.query.situation or "",
            "criteria": json.dumps(rec.meta.get("criteria") or {}),
        }
        if mode == "split":
            row["reasoner_prompt_ids"] = list(v.reasoner_prompt_ids)
        rows.append(row)
    return rows


@torch.no_grad()
def generate_responses(model, tokenizer, rows: Sequence[dict], max_new_tokens: int = 48, batch_size: int = 8,
                       do_sample: bool = False) -> list[str]:
    """Greedy (default) completions of ``rows`` (from :func:`grpo_rows`), decoded without special tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            ids, mask = left_pad([r["prompt_ids"] for r in chunk], pad)
            kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
            if "reasoner_prompt_ids" in chunk[0]:
                kw["reasoner_input_ids"], kw["reasoner_attention_mask"] = left_pad(
                    [r["reasoner_prompt_ids"] for r in chunk], pad)
            gen = model.generate(**kw, max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad)
            out += tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def trait_hits(responses: Sequence[str], rows: Sequence[dict]) -> dict[str, list[int]]:
    """Per-record 0/1 hits of each trait dimension (``strategy``, ``length``, ``register``) and their mean."""
    hits: dict[str, list[int]] = {}
    for text, row in zip(responses, rows, strict=True):
        t = json.loads(row["traits"])
        pred = classify_response(text)
        for k, v in t.items():
            hits.setdefault(k, []).append(int(pred[k] == v))
    return hits


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
                 ) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the (1 - alpha) percentile bootstrap interval of the mean of ``values``
    (:func:`flythinker.evaluation.user_bootstrap`, ``n_boot`` resamples, seeded); one value gives ``(v, v, v)``."""
    from flythinker.evaluation.report import user_bootstrap

    if not len(values):
        raise ValueError("bootstrap_ci needs at least one value")
    out = user_bootstrap(values, n_resamples=n_boot, seed=seed, confidence=1 - alpha)
    return out["mean"], out["ci95"][0], out["ci95"][1]


def paired_bootstrap_diff(before: Sequence[float], after: Sequence[float], n_boot: int = 2000, seed: int = 0
                          ) -> tuple[float, float, float]:
    """``(mean diff, lo, hi)`` of ``after - before`` over the same items, paired percentile bootstrap 95%."""
    if len(before) != len(after):
        raise ValueError("paired bootstrap needs equal lengths")
    return bootstrap_ci([a - b for a, b in zip(after, before)], n_boot=n_boot, seed=seed)


def strategy_report(responses: Sequence[str], rows: Sequence[dict]) -> dict[str, Any]:
    """Mean trait accuracy per dimension and overall (``strategy_accuracy``, as in
    :func:`flythinker.persona.strategy_accuracy`) with bootstrap 95% CIs, plus the per-record overall scores."""
    hits = trait_hits(responses, rows)
    per_record = [sum(h[i] for h in hits.values()) / len(hits) for i in range(len(rows))]
    rep: dict[str, Any] = {}
    for k, h in hits.items():
        m, lo, hi = bootstrap_ci(h)
        rep[k] = {"mean": m, "ci95": [lo, hi]}
    m, lo, hi = bootstrap_ci(per_record)
    rep["strategy_accuracy"] = {"mean": m, "ci95": [lo, hi]}
    rep["per_record"] = per_record
    return rep


__all__ = ["bootstrap_ci", "generate_responses", "grpo_rows", "paired_bootstrap_diff",
           "strategy_report", "trait_hits"]
