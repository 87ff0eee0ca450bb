"""Per-record scores of a model on persona records: the reference reply's NLL, greedy replies, ROUGE-L, traits.

Contexts (what the model reads; :func:`flythinker.persona.build_views`):

- ``"split"``: a FlyThinker pair, the generator reads the query, the reasoner history + query;
- ``"query"``: a plain model (or a pair's generator alone) reads the query;
- ``"full"``: a plain model reads history + query in its prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from flythinker.persona.metrics import rouge_l  # the one ROUGE-L (rouge-score); scored here per record

CONTEXTS = ("split", "query", "full")


def _is_pair(model: nn.Module) -> bool:
    from flythinker.modeling import FlyThinkerForCausalLM

    return isinstance(model, FlyThinkerForCausalLM)


def check_context(model: nn.Module, context: str) -> None:
    """ValueError unless `context` is one of :data:`CONTEXTS` and fits `model` (split: a pair only)."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    if context == "split" and not _is_pair(model):
        raise ValueError("context 'split' needs a FlyThinker pair (a plain model reads 'query' or 'full')")


@contextmanager
def fusion_lambda(model: nn.Module, value: float):
    """Score a pair at lambda `value` for the calls inside (``0``: the same weights without the reasoner's latents).
    Prefer the per-call ``fusion_lambda=`` of :func:`reply_nll` / :func:`generate_replies`; this is for scorers
    that take no such argument. The config is restored on exit."""
    saved = model.config.fusion_lambda
    model.config.fusion_lambda = value
    try:
        yield model
    finally:
        model.config.fusion_lambda = saved


def _views(records, tok, max_reasoner_tokens):
    from flythinker.persona import build_views

    return [build_views(r, tok, mode="split", max_reasoner_tokens=max_reasoner_tokens, warn=False) for r in records]


def _features(views, context: str) -> list[dict]:
    return [v.example({"split": "split", "query": "generator", "full": "shared"}[context]) for v in views]


@torch.no_grad()
def reply_nll(model: nn.Module, tok, records: Sequence, *, context: str, max_reasoner_tokens: int | None = None,
              batch_size: int = 8, fusion_lambda: float | None = None) -> list[dict]:
    """Per record ``{"record", "user", "nll", "tokens"}``: the reference reply's summed NLL (nats) and its token
    count under `model` reading `context` (module docstring), a pair at `fusion_lambda` (None: its own).
    Records need a reference ``response``."""
    from flythinker.training.collator import FlyThinkerCollator

    check_context(model, context)
    if any(not r.response for r in records):
        raise ValueError("reply_nll needs records with a reference response")
    collate = FlyThinkerCollator(tokenizer=tok, add_eos=True)
    rows = []
    for i in range(0, len(records), batch_size):
        recs = records[i:i + batch_size]
        batch = collate(_features(_views(recs, tok, max_reasoner_tokens), context))
        if context == "split":  # per-row logits: the naive loss
            logits = model(**batch, use_cache=False, loss_impl="naive", fusion_lambda=fusion_lambda).logits
        else:
            inner = model.generator if _is_pair(model) else model
            logits = inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lg, lb = logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(lg.transpose(1, 2), lb.clamp_min(0), reduction="none")
        mask = lb != -100
        for r, s, n in zip(recs, (nll * mask).sum(1).tolist(), mask.sum(1).tolist(), strict=True):
            rows.append({"record": r.record_id, "user": r.user_id, "nll": s, "tokens": n})
    return rows


@torch.no_grad()
def generate_replies(model: nn.Module, tok, records: Sequence, *, context: str, max_new_tokens: int = 64,
                     max_reasoner_tokens: int | None = None, batch_size: int = 8,
                     fusion_lambda: float | None = None) -> list[str]:
    """Greedy replies (left-padded batches), one per record, decoded without special tokens; a pair in split
    context at `fusion_lambda` (None: its own)."""
    from flythinker.persona import generate_inputs

    check_context(model, context)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    mode = {"split": "split", "query": "generator", "full": "shared"}[context]
    runner = model.generator if (_is_pair(model) and context != "split") else model
    out = []
    for i in range(0, len(records), batch_size):
        views = _views(records[i:i + batch_size], tok, max_reasoner_tokens)
        inputs = generate_inputs(views, pad, mode)
        knobs = {"fusion_lambda": fusion_lambda} if (runner is model and _is_pair(model)) else {}
        seqs = runner.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, **knobs)
        out += [tok.decode(s, skip_special_tokens=True).strip() for s in seqs[:, inputs["input_ids"].shape[1]:]]
    return out


def trait_hits(text: str, record) -> dict[str, float]:
    """``{trait: 1.0 / 0.0}`` for each trait the record carries (persona-empathy metric of its version), else {}."""
    from flythinker.persona.metrics import classify_response

    traits = (record.persona.traits if record.persona is not None else {}) or {}
    known = {t: v for t, v in traits.items() if t in ("strategy", "length", "register")}
    if not known:
        return {}
    pred = classify_response(text, version=int(record.meta.get("version", 1)))
    return {t: float(pred[t] == v) for t, v in known.items()}


def spaced_punctuation(text: str) -> bool:
    """Whether `text` has a space before , . ! or ? (the v1 data's word-level style)."""
    import re

    return re.search(r"\w \s*[,.!?](\s|$)", text) is not None


def with_response(record, text: str):
    """A copy of `record` whose reference reply is `text`."""
    return dataclasses.replace(record, response=text)


__all__ = ["CONTEXTS", "check_context", "fusion_lambda", "generate_replies", "reply_nll", "rouge_l",
           "spaced_punctuation", "trait_hits", "with_response"]
