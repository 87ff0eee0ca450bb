"""The bundled persona-empathy benchmark (determinism, split by user, hidden traits) and its metrics."""

import random

import pytest
import torch

from flythinker.configuration import IGNORE_INDEX
from flythinker.persona import (
    TRAITS,
    classify_response,
    compose_response,
    heldout_nll,
    load_dataset,
    make_persona_empathy,
    mean_rouge_l,
    opens_with_validation,
    rouge_l,
    strategy_accuracy,
)
from flythinker.persona.empathy_dataset import CLOSERS, OPENERS, QUERY_ENDINGS, SHORT_MAX_WORDS, TOPICS
from flythinker.persona.metrics import token_nll, words


@pytest.fixture(scope="module")
def data():
    return make_persona_empathy()


def test_deterministic_and_seeded(data):
    again = make_persona_empathy()
    assert all(again[s] == data[s] for s in data)
    other = make_persona_empathy(seed=1)
    assert other["train"] != data["train"]


def test_sizes_and_split_by_user(data):
    n = {s: len(v) for s, v in data.items()}
    assert sum(n.values()) == 4000 and n["train"] == 2800 and n["validation"] == n["test"] == 600
    users = {s: {r.user_id for r in v} for s, v in data.items()}
    assert not users["train"] & users["test"] and not users["train"] & users["validation"]
    assert not users["validation"] & users["test"]
    assert len(users["test"]) == 120
    # each user's traits are fixed across their records; all 8 trait combinations occur in every split
    for split, recs in data.items():
        by_user = {}
        for r in recs:
            assert by_user.setdefault(r.user_id, r.persona.traits) == r.persona.traits
        assert len({tuple(t.values()) for t in by_user.values()}) == 8, split


def test_traits_not_in_query(data):
    recs = [r for v in data.values() for r in v]
    situations = {s for sits, _ in TOPICS.values() for s in sits}
    queries_by_traits = {}
    for r in recs:
        sit, ending = r.query.text.split(" . ", 1)
        # the query is a situation + ending from pools shared by all users: no trait can be stated in it
        assert sit in situations and ending in QUERY_ENDINGS
        assert r.query.situation is None and not r.persona.profile and r.persona.short is None
        queries_by_traits.setdefault(tuple(r.persona.traits.values()), set()).add(r.query.text)
    # and every trait combination draws from the same query pool (all 16 x 4 = 64 queries for each)
    assert all(len(q) == 64 for q in queries_by_traits.values())


def test_history_reveals_traits(data):
    for r in data["test"][:200]:
        past_replies = [t.text for t in r.history if t.role == "assistant"]
        assert len(past_replies) >= 2
        for reply in past_replies:
            assert classify_response(reply) == r.persona.traits


def test_targets_follow_traits(data):
    recs = [r for v in data.values() for r in v]
    acc = strategy_accuracy([r.response for r in recs], [r.persona.traits for r in recs])
    assert acc == {"strategy": 1.0, "length": 1.0, "register": 1.0, "strategy_accuracy": 1.0, "exact": 1.0}
    short = [len(words(r.response)) for r in recs if r.persona.traits["length"] == "short"]
    long_ = [len(words(r.response)) for r in recs if r.persona.traits["length"] == "detailed"]
    assert max(short) < SHORT_MAX_WORDS < min(long_)


def test_trait_blind_responses_score_near_chance(data):
    recs = data["test"]
    rng = random.Random(0)
    fixed = {"strategy": "steps", "length": "short", "register": "formal"}
    blind = [compose_response(fixed, r.meta["topic"], rng) for r in recs]
    acc = strategy_accuracy(blind, [r.persona.traits for r in recs])
    assert 0.4 < acc["strategy_accuracy"] < 0.6 and acc["exact"] < 0.25


def test_load_dataset_and_cache(tmp_path):
    recs = load_dataset("persona-empathy", "test", n_users=12, queries_per_user=2)
    cached = load_dataset("persona-empathy", "test", n_users=12, queries_per_user=2, cache_dir=tmp_path)
    assert cached == recs and len(list(tmp_path.rglob("*.jsonl"))) == 3
    assert load_dataset("persona-empathy", "test", n_users=12, queries_per_user=2, cache_dir=tmp_path) == recs
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("lamp", "test")
    with pytest.raises(ValueError, match="split must be"):
        load_dataset("persona-empathy", "dev")
    with pytest.raises(ValueError, match="history_sessions"):
        make_persona_empathy(history_sessions=(3, 9))


def _cache_folder(tmp_path):
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    return folder


def test_truncated_cache_is_rebuilt_not_used(tmp_path):
    """A run killed while writing the cache used to leave a truncated train.jsonl that still parses: the next run
    trained on its first records only. The folder is now written atomically with a manifest (record count +
    sha256) that every read checks, so a partial split is detected and rebuilt."""
    kw = dict(n_users=20, queries_per_user=2)
    full = load_dataset("persona-empathy", "train", cache_dir=tmp_path, **kw)
    folder = _cache_folder(tmp_path)
    train = folder / "train.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    train.write_text("".join(lines[:5]))  # what an interrupted in-place write leaves: valid JSON lines, too few
    with pytest.warns(UserWarning, match="not valid.*sha256.*rebuilding"):
        again = load_dataset("persona-empathy", "train", cache_dir=tmp_path, **kw)
    assert again == full and len(again) == len(lines) > 5
    assert train.read_text().splitlines(keepends=True) == lines
    # the other splits are checked too, and a rebuilt folder is used without a warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_dataset("persona-empathy", "test", cache_dir=tmp_path, **kw) == make_persona_empathy(**kw)["test"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporaries left behind


@pytest.mark.parametrize("damage", ["no_manifest", "bad_manifest", "missing_split", "count"])
def test_cache_without_a_matching_manifest_is_rebuilt(tmp_path, damage):
    import hashlib
    import json

    kw = dict(n_users=20, queries_per_user=2)
    full = load_dataset("persona-empathy", "validation", cache_dir=tmp_path, **kw)
    folder = _cache_folder(tmp_path)
    manifest = folder / "manifest.json"
    if damage == "no_manifest":  # the older layout, without a manifest
        manifest.unlink()
    elif damage == "bad_manifest":
        manifest.write_text('{"splits": {"validation": ')
    elif damage == "missing_split":
        (folder / "validation.jsonl").unlink()
    else:  # a file that matches its checksum but not its count (a hand-edited manifest)
        m = json.loads(manifest.read_text())
        path = folder / "validation.jsonl"
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:1]))
        m["splits"]["validation"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        manifest.write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="rebuilding"):
        assert load_dataset("persona-empathy", "validation", cache_dir=tmp_path, **kw) == full
    assert json.loads(manifest.read_text())["splits"]["validation"]["records"] == len(full)


def test_classify_known_strings():
    assert classify_response("oh no , that really sucks . maybe mute them for a while .") == {
        "strategy": "validation", "length": "short", "register": "casual"}
    long_formal = ("Here is a practical plan . " + " ".join(TOPICS["work"][1]["formal"]) + " "
                   + CLOSERS["formal"][0])
    assert classify_response(long_formal) == {"strategy": "steps", "length": "detailed", "register": "formal"}
    assert opens_with_validation(OPENERS[("validation", "formal")][1])
    assert not opens_with_validation("ok , here's the plan . oh no , that really sucks .")
    assert classify_response("") == {"strategy": "unknown", "length": "unknown", "register": "unknown"}
    assert classify_response("blah blah")["register"] == "unknown"


def test_strategy_accuracy_counts():
    traits = [dict(strategy="validation", length="short", register="casual"),
              dict(strategy="steps", length="short", register="formal")]
    responses = ["oh no , that really sucks . maybe mute them for a while .",  # all right
                 "oh no , that really sucks . maybe mute them for a while ."]  # only length right
    acc = strategy_accuracy(responses, traits)
    assert acc["strategy"] == 0.5 and acc["length"] == 1.0 and acc["register"] == 0.5
    assert acc["strategy_accuracy"] == pytest.approx(2 / 3) and acc["exact"] == 0.5
    with pytest.raises(ValueError):
        strategy_accuracy(responses, traits[:1])
    assert set(TRAITS) <= set(acc)


def test_rouge_l_known_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("abc", "xyz") == 0.0 and rouge_l("", "x") == 0.0 and rouge_l("x", "") == 0.0
    assert rouge_l("", "") == 0.0 and rouge_l("...", "!") == 0.0  # no word on either side: defined as 0
    # LCS("a b c d", "a c e") = "a c": P = 2/4, R = 2/3, F1 = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("The CAT, sat.", "the cat sat") == 1.0  # case and punctuation ignored
    assert rouge_l("the dogs were running", "the dog was run") == pytest.approx(3 / 4)  # Porter stemming on
    assert mean_rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)


@pytest.mark.parametrize("candidate, reference", [
    ("I hear you, that sounds exhausting.", "That sounds really exhausting; I hear you."),
    ("Let's make a plan: first, list the tasks.", "First, make a list of the tasks and plan the week."),
    ("don't worry", "do not worry"),
    ("Running late again?", "You were running late."),
])
def test_rouge_l_is_rouge_scores(candidate, reference):
    """The score rouge-score's own RougeScorer gives (stemming on), so it compares with other work's; one home for
    it: the evaluation package's rouge_l is the same function."""
    from rouge_score import rouge_scorer

    from flythinker.evaluation import rouge_l as evaluation_rouge_l

    want = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, candidate)["rougeL"].fmeasure
    assert rouge_l(candidate, reference) == want and 0 < want < 1
    assert evaluation_rouge_l is rouge_l


def test_nll_helpers():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    X = IGNORE_INDEX
    labels = torch.tensor([[X, X, 3, 4, 1], [X, 2, 2, X, X]])
    total, n = token_nll(logits, labels)
    logp = logits.log_softmax(-1)
    want = -(logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 1] + logp[1, 0, 2] + logp[1, 1, 2])
    assert n == 5 and total == pytest.approx(float(want), rel=1e-5)
    batches = [{"logits": logits, "labels": labels}, {"logits": logits[:1], "labels": labels[:1]}]
    mean = heldout_nll(lambda b: b["logits"], batches)
    t1, n1 = token_nll(logits[:1], labels[:1])
    assert mean == pytest.approx((total + t1) / (n + n1), rel=1e-6)
    with pytest.raises(ValueError, match="no labelled tokens"):
        heldout_nll(lambda b: b["logits"], [{"logits": logits, "labels": torch.full_like(labels, IGNORE_INDEX)}])
    with pytest.raises(ValueError, match="disagree"):
        token_nll(logits, labels[:, :3])
