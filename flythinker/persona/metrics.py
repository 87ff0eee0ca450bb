"""Metrics for the ``persona-empathy`` benchmark: rule-based strategy checks, ROUGE-L (``rouge-score``), held-out NLL.

The strategy checks read a response the way the data generator wrote it:

- *strategy*: does the first sentence validate feelings or announce a plan? Cue words are the words that occur
  only in validation sentences (resp. only in plan openers and steps) of the generator's phrase banks.
- *length*: ``short`` when the response has at most :data:`SHORT_MAX_WORDS` words.
- *register*: more formal-only than casual-only words -> ``formal`` (and vice versa; a tie is ``unknown``).

``unknown`` never matches a trait, so garbage output scores 0 on that dimension.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence

import torch

from flythinker.configuration import IGNORE_INDEX

from .empathy_dataset import CLOSERS, OPENERS, SHORT_MAX_WORDS, TOPICS, TRAITS, VALIDATION_MORE

_WORD = re.compile(r"[a-z0-9']+")
_SENTENCE_END = re.compile(r"[.!?]")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation dropped); the unit of length and cues."""
    return _WORD.findall(text.lower())


def _vocab(phrases: Iterable[str]) -> set[str]:
    return {w for p in phrases for w in words(p)}


_VALIDATION = [p for reg in ("formal", "casual") for p in OPENERS[("validation", reg)] + VALIDATION_MORE[reg]]
_PLAN = [p for reg in ("formal", "casual") for p in OPENERS[("steps", reg)]
         + [s for _, steps in TOPICS.values() for s in steps[reg]]]
VALIDATION_CUES = frozenset(_vocab(_VALIDATION) - _vocab(_PLAN))
PLAN_CUES = frozenset(_vocab(_PLAN) - _vocab(_VALIDATION))


def _register_phrases(reg: str) -> list[str]:
    return ([p for (_, r), ps in OPENERS.items() if r == reg for p in ps] + VALIDATION_MORE[reg] + CLOSERS[reg]
            + [s for _, steps in TOPICS.values() for s in steps[reg]])


FORMAL_CUES = frozenset(_vocab(_register_phrases("formal")) - _vocab(_register_phrases("casual")))
CASUAL_CUES = frozenset(_vocab(_register_phrases("casual")) - _vocab(_register_phrases("formal")))


def first_sentence(text: str) -> str:
    """Text up to the first ``.``, ``!`` or ``?`` (the whole text if there is none)."""
    m = _SENTENCE_END.search(text)
    return text[: m.start()] if m else text


def opens_with_validation(text: str) -> bool:
    """True when the first sentence has more validation cues than plan cues."""
    w = words(first_sentence(text))
    return sum(x in VALIDATION_CUES for x in w) > sum(x in PLAN_CUES for x in w)


def _cue_sets(openers, validation_more, closers, topics) -> tuple[frozenset, ...]:
    """(validation, plan, formal, casual) cue words of one version's phrase banks (module docstring)."""
    val = [p for reg in ("formal", "casual") for p in openers[("validation", reg)] + validation_more[reg]]
    plan = [p for reg in ("formal", "casual") for p in openers[("steps", reg)]
            + [s for _, steps in topics.values() for s in steps[reg]]]

    def reg_phrases(reg: str) -> list[str]:
        return ([p for (_, r), ps in openers.items() if r == reg for p in ps] + validation_more[reg] + closers[reg]
                + [s for _, steps in topics.values() for s in steps[reg]])

    return (frozenset(_vocab(val) - _vocab(plan)), frozenset(_vocab(plan) - _vocab(val)),
            frozenset(_vocab(reg_phrases("formal")) - _vocab(reg_phrases("casual"))),
            frozenset(_vocab(reg_phrases("casual")) - _vocab(reg_phrases("formal"))))


_CUES: dict[int, tuple[frozenset, ...]] = {1: (VALIDATION_CUES, PLAN_CUES, FORMAL_CUES, CASUAL_CUES)}


def _cues(version: int) -> tuple[frozenset, ...]:
    if version not in _CUES:
        if version != 2:
            raise ValueError(f"persona-empathy version must be 1 or 2, got {version!r}")
        from . import empathy_v2_banks as b

        _CUES[2] = _cue_sets(b.OPENERS, b.VALIDATION_MORE, b.CLOSERS, b.TOPICS)
    return _CUES[version]


def classify_response(text: str, version: int = 1) -> dict[str, str]:
    """Predicted ``{"strategy", "length", "register"}`` of a response (values as in :data:`TRAITS` or
    ``"unknown"``), by the cue words of ``persona-empathy`` `version`'s (1 or 2) phrase banks."""
    val_cues, plan_cues, formal_cues, casual_cues = _cues(version)
    first = words(first_sentence(text))
    v, p = sum(x in val_cues for x in first), sum(x in plan_cues for x in first)
    strategy = "validation" if v > p else "steps" if p > v else "unknown"
    w = words(text)
    length = "unknown" if not w else "short" if len(w) <= SHORT_MAX_WORDS else "detailed"
    f, c = sum(x in formal_cues for x in w), sum(x in casual_cues for x in w)
    register = "formal" if f > c else "casual" if c > f else "unknown"
    return {"strategy": strategy, "length": length, "register": register}


def strategy_accuracy(responses: Sequence[str], traits: Sequence[dict[str, str]]) -> dict[str, float]:
    """Agreement of the responses' predicted strategy with the users' hidden traits.

    Returns per-dimension accuracies (``strategy``, ``length``, ``register``), their mean
    ``strategy_accuracy`` (0.5 is chance for a trait-blind model) and ``exact`` (all three right).
    """
    if len(responses) != len(traits):
        raise ValueError(f"{len(responses)} responses but {len(traits)} trait dicts")
    if not responses:
        raise ValueError("strategy_accuracy needs at least one response")
    hits = {k: 0 for k in TRAITS}
    exact = 0
    for text, t in zip(responses, traits, strict=True):
        pred = classify_response(text)
        ok = [pred[k] == t[k] for k in TRAITS]
        for k, good in zip(TRAITS, ok, strict=True):
            hits[k] += good
        exact += all(ok)
    n = len(responses)
    out = {k: hits[k] / n for k in TRAITS}
    out["strategy_accuracy"] = sum(out[k] for k in TRAITS) / len(TRAITS)
    out["exact"] = exact / n
    return out


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer  # lazy: it imports nltk's Porter stemmer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of `candidate` against `reference`, as the `rouge-score` package computes it (Google's
    reimplementation of ROUGE-1.5.5: lower-cased, every run of characters outside ``[a-z0-9]`` splits words, Porter
    stemming on, LCS precision/recall with beta = 1), so the scores compare with other work's. The one ROUGE-L of
    flythinker (:func:`flythinker.evaluation.rouge_l` is this function).

    Args:
        candidate: the generated text.
        reference: the reference text.

    Returns:
        The F1 in [0, 1]; 0.0 when either text has no word.
    """
    return _rouge_l_scorer().score(reference, candidate)["rougeL"].fmeasure


def mean_rouge_l(candidates: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over pairs."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"need equal, non-zero counts, got {len(candidates)} and {len(references)}")
    return sum(rouge_l(c, r) for c, r in zip(candidates, references, strict=True)) / len(candidates)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and token count over positions whose label is not ``IGNORE_INDEX``.

    logits: [B, T, V]; labels: [B, T] (unshifted, HF convention: position t predicts labels[t + 1]).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    lg = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    lb = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(lg, lb, ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss), int((lb != IGNORE_INDEX).sum())


@torch.no_grad()
def heldout_nll(forward: Callable[[dict], torch.Tensor], batches: Iterable[dict]) -> float:
    """Mean NLL per response token over ``batches``: ``forward(batch) -> logits [B, T, V]``, each batch holds
    ``labels`` [B, T] with ``IGNORE_INDEX`` outside the response."""
    total, count = 0.0, 0
    for batch in batches:
        s, n = token_nll(forward(batch), batch["labels"])
        total, count = total + s, count + n
    if count == 0:
        raise ValueError("no labelled tokens in the held-out batches")
    return total / count
