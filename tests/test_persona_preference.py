"""flythinker.persona.preference: trait-flipped reply candidates and the likelihood-preference scorer (tiny models)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from flythinker import FlyThinkerForCausalLM
from flythinker.persona import classify_response, make_persona_empathy
from flythinker.persona.preference import accuracy, preference, trait_candidates
from flythinker.persona.wordlevel import word_tokenizer
from flythinker.training.toy import tiny_config


@pytest.fixture(scope="module")
def data():
    return make_persona_empathy(n_users=20)


def test_candidates_differ_in_exactly_the_flipped_trait(data):
    for r in data["test"][:10]:
        ref, *flips = trait_candidates(r, ("strategy", "length", "register"))
        assert classify_response(ref) == r.persona.traits
        for t, text in zip(("strategy", "length", "register"), flips, strict=True):
            got = classify_response(text)
            assert got[t] != r.persona.traits[t]
            assert {k: v for k, v in got.items() if k != t} == {k: v for k, v in r.persona.traits.items() if k != t}
    assert trait_candidates(data["test"][0]) == trait_candidates(data["test"][0])  # deterministic per record


def test_candidates_reject_unknown_traits_and_foreign_records(data):
    with pytest.raises(ValueError, match="unknown traits"):
        trait_candidates(data["test"][0], ("tone",))
    with pytest.raises(ValueError, match="not a persona-empathy record"):
        trait_candidates(dataclasses.replace(data["test"][0], meta={}))


@torch.no_grad()
def test_preference_untrained_zero_pair_scores_like_its_generator(data):
    recs = data["test"][:4]
    texts = [t.text for r in data["test"] for t in r.history] + [r.query.text for r in data["test"]]
    texts += [c for r in recs for c in trait_candidates(r, ("strategy", "register"))]
    tok = word_tokenizer(texts)
    torch.manual_seed(0)
    gen = AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(tok), num_hidden_layers=2)).eval()
    rsn = AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(tok), num_hidden_layers=2)).eval()
    pair = FlyThinkerForCausalLM.from_pair(gen, rsn, projection="zero", fusion_lambda=1.0, parallel="off").eval()
    rows = preference(pair, tok, recs, ("strategy", "register"), max_reasoner_tokens=400)
    assert rows == preference(gen, tok, recs, ("strategy", "register"), max_reasoner_tokens=400)
    assert set(accuracy(rows)) == {"strategy", "register"} and len(rows) == 4
    # view="full": the pair in shared context (both models read history + query), as its generator on that view
    full = preference(pair, tok, recs, ("strategy", "register"), max_reasoner_tokens=400, view="full")
    assert full == preference(gen, tok, recs, ("strategy", "register"), max_reasoner_tokens=400, view="full")
    with pytest.raises(ValueError, match="view"):
        preference(gen, tok, recs, view="history")
