"""Likelihood preference on ``persona-empathy``: does a model prefer the reply a user wants over the same reply with
one hidden trait flipped?

For a record, :func:`trait_candidates` composes the reply for the user's traits and, with the *same* random draws,
the reply with one trait flipped (so only that trait differs). A model "prefers" the reply whose opening (its first
``opening`` tokens) has the lower summed NLL. One forward per candidate, no decoding: fast enough to score dozens of
held-out users in seconds to minutes on a CPU, and it tells whether a pair's reasoner carries the trait at all
(a trait-blind model scores the share of users its fixed preference happens to suit, ~50%).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence

import torch

from .empathy_dataset import TRAITS, compose_response
from .views import build_views

DEFAULT_TRAITS = {"strategy": "validation", "length": "short", "register": "formal"}  # for a trait a record lacks
OPENING = 13  # reply tokens scored by default: the opening sentence, which carries strategy and register


def trait_candidates(record, traits: Sequence[str] = ("strategy",)) -> list[str]:
    """``[reply for the user's traits] + [the same reply with trait t flipped for t in traits]``."""
    unknown = [t for t in traits if t not in TRAITS]
    if unknown:
        raise ValueError(f"unknown traits {unknown}; known: {list(TRAITS)}")
    if record.persona is None or any(t not in record.persona.traits for t in traits) or "topic" not in record.meta:
        raise ValueError(f"record {record.record_id!r} is not a persona-empathy record (needs traits and a topic)")
    compose = compose_response
    if record.meta.get("version", 1) == 2:  # persona-empathy v2 (and the hand-written users): v2's banks
        from .empathy_v2 import compose_response as compose
    # hand-written users share a query across trait values: the seed follows the query there, so both users of a
    # query get the very same candidates (a trait-blind model then scores exactly 50%)
    key = record.meta.get("candidate_key", record.record_id)
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") if "candidate_key" in record.meta \
        else int.from_bytes(record.record_id.encode()[-8:], "little")
    base = {**DEFAULT_TRAITS, **record.persona.traits}
    topic = record.meta["topic"]
    out = [compose(base, topic, random.Random(seed))]
    for t in traits:
        a, b = TRAITS[t]
        out.append(compose({**base, t: b if base[t] == a else a}, topic, random.Random(seed)))
    return out


@torch.no_grad()
def _row_nll(model, tok, feats: list[dict], pair: bool) -> torch.Tensor:
    from flythinker.training.collator import FlyThinkerCollator

    batch = FlyThinkerCollator(tokenizer=tok, add_eos=False)(feats)
    if pair:
        logits = model(**batch, use_cache=False, loss_impl="naive").logits  # per-row logits are needed
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lg, lb = logits[:, :-1].float(), batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(lg.transpose(1, 2), lb.clamp_min(0), reduction="none")
    return (nll * (lb != -100)).sum(1)  # [rows]


def preference(model, tok, records, traits: Sequence[str] = ("strategy",), *, opening: int = OPENING,
               max_reasoner_tokens: int | None = None, view: str = "query") -> list[dict[str, bool]]:
    """Per record, ``{trait: True if the model prefers the reply for the user's traits}``.

    ``model``: a FlyThinker pair or a plain causal LM. ``view``: what the generator reads, ``"query"`` (its short
    view; a pair's reasoner then reads history + query: split context) or ``"full"`` (history + query; a pair's
    reasoner reads the same: shared context).
    """
    from flythinker.modeling import FlyThinkerForCausalLM

    if view not in ("query", "full"):
        raise ValueError(f"view must be 'query' or 'full', got {view!r}")
    pair = isinstance(model, FlyThinkerForCausalLM)
    rows = []
    for r in records:
        feats = []
        for text in trait_candidates(r, traits):
            v = build_views(dataclasses.replace(r, response=text), tok, mode="split",
                            max_reasoner_tokens=max_reasoner_tokens, warn=False)
            resp = v.response_ids[:opening]
            if pair and view == "query":
                feats.append(dict(generator_prompt=v.generator_prompt_ids, reasoner_prompt=v.reasoner_prompt_ids,
                                  response=resp))
            else:
                feats.append(dict(prompt=v.generator_prompt_ids if view == "query" else v.reasoner_prompt_ids,
                                  response=resp))
        nll = _row_nll(model, tok, feats, pair)
        rows.append({t: bool(nll[0] < nll[1 + i]) for i, t in enumerate(traits)})
    return rows


def accuracy(rows: list[dict[str, bool]]) -> dict[str, float]:
    """Share of records where each trait's preferred reply is the user's."""
    if not rows:
        raise ValueError("no rows")
    return {t: sum(r[t] for r in rows) / len(rows) for t in rows[0]}


__all__ = ["OPENING", "accuracy", "preference", "trait_candidates"]
