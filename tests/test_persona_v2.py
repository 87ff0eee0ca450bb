"""persona-empathy v2: split by user and by phrasing family, normal text, its metric; the hand-written users."""

from __future__ import annotations

import collections

import pytest

from flythinker.evaluation.scoring import spaced_punctuation
from flythinker.persona import classify_response, load_dataset, load_handwritten_users
from flythinker.persona.empathy_v2 import make_persona_empathy_v2
from flythinker.persona.empathy_v2_families import TEST_FAMILIES
from flythinker.persona.preference import trait_candidates


@pytest.fixture(scope="module")
def data():
    return make_persona_empathy_v2(n_users=120, queries_per_user=2)


def test_deterministic_and_split_by_user(data):
    again = make_persona_empathy_v2(n_users=120, queries_per_user=2)
    assert [r.to_dict() for r in data["test"]] == [r.to_dict() for r in again["test"]]
    users = {s: {r.user_id for r in rs} for s, rs in data.items()}
    assert not (users["train"] & users["test"]) and not (users["validation"] & users["test"])
    assert load_dataset("persona-empathy", "test", version=2, n_users=120, queries_per_user=2)[0].meta["version"] == 2


def test_test_users_use_only_held_out_families(data):
    def held_out(r):
        return [f in TEST_FAMILIES[t][r.persona.traits[t]] for t, f in r.meta["families"].items()]

    assert all(all(held_out(r)) for r in data["test"])
    assert not any(any(held_out(r)) for s in ("train", "validation") for r in data[s])
    kinds = collections.Counter(f for r in data["train"] for f in r.meta["families"].values())
    assert len(kinds) >= 20  # many families in training


def test_normal_text_and_metric_recovers_traits(data):
    for r in data["train"] + data["test"]:
        assert classify_response(r.response, version=2) == r.persona.traits
        assert not spaced_punctuation(r.response) and r.response[0].isupper()
        assert not any(spaced_punctuation(t.text) for t in r.history)
    ref, *flips = trait_candidates(data["test"][0], ("strategy", "register"))
    assert ref == data["test"][0].response or classify_response(ref, version=2) == data["test"][0].persona.traits
    for t, text in zip(("strategy", "register"), flips, strict=True):
        assert classify_response(text, version=2)[t] != data["test"][0].persona.traits[t]


def test_handwritten_users_are_balanced_per_query():
    users = load_handwritten_users()
    assert len(users) == 48 and len({r.user_id for r in users}) == 48
    by_query = collections.defaultdict(list)
    for r in users:
        (trait, value), = r.persona.traits.items()
        by_query[r.meta["candidate_key"]].append((trait, value))
    assert len(by_query) == 24
    for pairs in by_query.values():  # each query once per value of its trait
        assert len(pairs) == 2 and pairs[0][0] == pairs[1][0] and pairs[0][1] != pairs[1][1]
    a, b = [r for r in users if r.meta["candidate_key"] == "handwritten:s1"]
    ca, cb = trait_candidates(a, ("strategy",)), trait_candidates(b, ("strategy",))
    assert ca == [cb[1], cb[0]]  # the same two candidates, the user's own first
