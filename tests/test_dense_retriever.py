"""The dense retriever: a frozen tiny random LM as the encoder (memoised, cached to safetensors), a projection
head trained on cached features, save/load through safetensors, clear errors, and the AlpsBench Task 3 helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_helpers import tiny_lm

from flythinker.memory import MemoryItem
from flythinker.memory.dense_retriever import (
    DenseRetriever,
    DenseRetrieverError,
    DualEncoder,
    EncoderSpec,
    FeatureSpec,
    FrozenEncoder,
    ProjectionHead,
    default_layers,
    frozen_dual,
)
from flythinker.memory.dense_training import BankFeatures, PairFeatures, TrainConfig, rank_accuracy, train_head
from flythinker.training.toy import char_tokenizer

PACKETS = Path(__file__).parent / "data" / "alpsbench"
MEMORIES = ["Has a cat named Bull", "Prefers vegetarian food", "Self-identified time traveler",
            "Boyfriend is Egyptian", "Struggles with prioritizing books", "Prefers Indian cuisine",
            "Plays chess on Sundays", "Lives in Lyon", "Allergic to peanuts", "Learning Rust",
            "Runs marathons", "Works night shifts"]
QUERIES = [f"request number {i}: what should I pick given what you know?" for i in range(len(MEMORIES))]


@pytest.fixture(scope="module")
def encoder() -> FrozenEncoder:
    return FrozenEncoder(tiny_lm("llama", hidden_size=32), char_tokenizer(), EncoderSpec(model="tiny", max_length=96),
                         batch_size=4)


def _pairs(enc: FrozenEncoder, spec: FeatureSpec) -> PairFeatures:
    n = len(MEMORIES)
    return PairFeatures(spec.select(enc.encode(QUERIES, "query"), enc.layers),
                        spec.select(enc.encode(MEMORIES, "memory"), enc.layers), torch.arange(n), torch.arange(n))


@pytest.fixture(scope="module")
def trained(encoder) -> DualEncoder:
    spec = FeatureSpec(encoder.layers)
    head, hist = train_head(_pairs(encoder, spec), config=TrainConfig(out_dim=16, epochs=150, batch_size=12, lr=1e-2,
                                                                       weight_decay=0.0))
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    return DualEncoder(encoder, head, spec)


def test_default_layers():
    assert default_layers(30) == (10, 20, 30) and default_layers(2) == (1, 2)


def test_features_shape_memo_and_batch_independence(encoder):
    feats = encoder.encode(MEMORIES[:5], "memory")
    assert feats.shape == (5, *encoder.feature_shape) == (5, 2, 2, 32)
    n = encoder.texts_encoded
    again = encoder.encode(MEMORIES[:5] + MEMORIES[:2], "memory")
    assert encoder.texts_encoded == n  # cached: no forward pass
    assert torch.equal(again[:5], feats) and torch.equal(again[5:], feats[:2])
    alone = FrozenEncoder(encoder.model, encoder.tokenizer, encoder.spec, batch_size=1).encode(MEMORIES[:5], "memory")
    torch.testing.assert_close(alone, feats, atol=1e-5, rtol=1e-5)  # right padding leaves each row unchanged
    assert not torch.equal(encoder.encode(MEMORIES[:1], "query"), feats[:1])  # the query template differs
    assert encoder.encode([], "memory").shape == (0, 2, 2, 32)


def test_feature_cache_roundtrip_and_spec_check(encoder, tmp_path):
    encoder.encode(MEMORIES, "memory")
    encoder.encode(QUERIES, "query")
    path = encoder.save_cache(tmp_path / "feats.safetensors")
    fresh = FrozenEncoder(encoder.model, encoder.tokenizer, encoder.spec)
    assert fresh.load_cache(path) == len(encoder)
    assert torch.equal(fresh.encode(MEMORIES, "memory"), encoder.encode(MEMORIES, "memory"))
    assert fresh.texts_encoded == 0  # every text came from the cache
    other = FrozenEncoder(encoder.model, encoder.tokenizer, EncoderSpec(model="tiny", layers=(1,)))
    with pytest.raises(DenseRetrieverError, match="another encoder spec"):
        other.load_cache(path)


def test_head_ranks_planted_pairs_first(trained):
    ret = trained(MEMORIES)
    assert isinstance(ret, DenseRetriever) and ret.scores(QUERIES[0]).shape == (len(MEMORIES),)
    hits = [ret.rank(q, 1)[0] == i for i, q in enumerate(QUERIES)]
    assert all(hits)
    assert sorted(ret.rank(QUERIES[3])) == list(range(len(MEMORIES)))


def test_training_generalises_a_linear_relation():
    g = torch.Generator().manual_seed(0)
    D, n = 24, 400
    mem = torch.randn(n, D, generator=g)
    q = mem @ torch.randn(D, D, generator=g) + 0.05 * torch.randn(n, D, generator=g)  # queries: a hidden linear map
    ids = torch.arange(n)
    train = PairFeatures(q[:300], mem[:300], ids[:300], ids[:300])
    val = PairFeatures(q[300:], mem[300:], ids[300:], ids[300:])
    bank = BankFeatures(mem[:300], ids[:300], ids[:300])
    untrained = ProjectionHead(D, 16)
    untrained.fit_standardizer(q[:300], mem[:300])
    before = rank_accuracy(untrained, val, bank)
    head, hist = train_head(train, bank, val=val, config=TrainConfig(out_dim=16, epochs=60, batch_size=64, lr=1e-2,
                                                                     n_negatives=64, patience=10))
    assert hist["best_epoch"] is not None and max(hist["val_accuracy"]) == rank_accuracy(head, val, bank)
    assert rank_accuracy(head, val, bank) > max(0.8, before + 0.3)


def test_negatives_of_the_same_user_are_masked():
    head = ProjectionHead(4, 4, identity=True)
    q = torch.eye(4)[:2]
    pairs = PairFeatures(q, q.clone(), torch.tensor([0, 1]), torch.tensor([0, 1]))
    # the same user's other memory equals the query exactly, yet is not a distractor
    bank = BankFeatures(torch.stack([q[0], torch.eye(4)[3]]), torch.tensor([0, 5]), torch.tensor([7, 8]))
    assert rank_accuracy(head, pairs, bank) == 1.0


def test_save_load_roundtrip_safetensors_only(trained, tmp_path):
    folder = trained.with_bm25_weight(0.5).save(tmp_path / "ret")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "head.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["bm25_weight"] == 0.5 and cfg["encoder"]["model"] == "tiny"
    loaded = DualEncoder.load(folder, encoder=trained.encoder)
    assert loaded.bm25_weight == 0.5
    for q in QUERIES[:3]:
        torch.testing.assert_close(torch.from_numpy(loaded.with_bm25_weight(0.0)(MEMORIES).scores(q)),
                                   torch.from_numpy(trained(MEMORIES).scores(q)))
    again = DualEncoder.load(folder, trained.encoder.model, trained.encoder.tokenizer)  # builds its own encoder
    assert again(MEMORIES).rank(QUERIES[2], 1) == [2]
    trained.save(folder)  # replacing an existing folder is atomic too
    assert DualEncoder.load(folder, encoder=trained.encoder).bm25_weight == 0.0


def test_hybrid_scores_mix_bm25(trained):
    hyb = trained.with_bm25_weight(1.0)(MEMORIES)
    assert hyb.scores("vegetarian food").shape == (len(MEMORIES),)
    assert trained.with_bm25_weight(50.0)(MEMORIES).rank("vegetarian food", 1) == [1]


def test_bad_input_errors(encoder, trained, tmp_path):
    with pytest.raises(DenseRetrieverError, match="at least one document"):
        trained([])
    with pytest.raises(DenseRetrieverError, match="the head takes 5 features"):
        DualEncoder(encoder, ProjectionHead(5, 4))
    with pytest.raises(DenseRetrieverError, match=r"\[N, 128\]"):
        trained.head.embed_query(torch.zeros(2, 7))
    with pytest.raises(DenseRetrieverError, match="must both be"):
        train_head(PairFeatures(torch.zeros(4, 8), torch.zeros(4, 6), torch.arange(4), torch.arange(4)))
    with pytest.raises(DenseRetrieverError, match="do not match the pairs"):
        train_head(PairFeatures(torch.zeros(4, 8), torch.zeros(4, 8), torch.arange(4), torch.arange(4)),
                   BankFeatures(torch.zeros(3, 6), torch.arange(3), torch.arange(3)))
    with pytest.raises(DenseRetrieverError, match="at least 2 pairs"):
        train_head(PairFeatures(torch.zeros(1, 8), torch.zeros(1, 8), torch.arange(1), torch.arange(1)))
    with pytest.raises(DenseRetrieverError, match="hidden-state indices"):
        FrozenEncoder(encoder.model, encoder.tokenizer, EncoderSpec(model="tiny", layers=(3,)))
    with pytest.raises(DenseRetrieverError, match="does not fit encoder layers"):
        FeatureSpec((7,)).select(torch.zeros(1, *encoder.feature_shape), encoder.layers)
    with pytest.raises(DenseRetrieverError, match="kind"):
        encoder.encode(["x"], "document")
    with pytest.raises(DenseRetrieverError, match="not a saved dense retriever"):
        DualEncoder.load(tmp_path, encoder=encoder)
    folder = trained.save(tmp_path / "bad")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["head"]["out_dim"] = 3  # the weights on disk are 16 wide
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DenseRetrieverError, match="does not fit the head"):
        DualEncoder.load(folder, encoder=encoder)


def test_memory_operations_take_the_retriever(trained):
    from flythinker.memory import retrieve
    from flythinker.memory.reasoner import rank_memories

    mems = [MemoryItem(f"m{i}", v) for i, v in enumerate(MEMORIES)]
    assert retrieve(QUERIES[4], mems, k=3, retriever=trained) == trained(MEMORIES).rank(QUERIES[4], 3)
    assert retrieve(QUERIES[4], mems, k=1, retriever=trained) == [4]
    assert rank_memories(mems, QUERIES[6], retriever=trained)[0].memory_id == "m6"


def test_frozen_baseline_is_standardised_cosine(encoder):
    spec = FeatureSpec(encoder.layers, ("mean",))
    p = _pairs(encoder, spec)
    dual = frozen_dual(encoder, spec, p.queries, p.memories)
    s = dual(MEMORIES).scores(QUERIES[0])
    x = (p.queries[0] - p.queries.mean(0)) / p.queries.std(0, unbiased=False)
    y = (p.memories - p.memories.mean(0)) / p.memories.std(0, unbiased=False)
    torch.testing.assert_close(torch.from_numpy(s).float(), torch.nn.functional.cosine_similarity(x[None], y),
                               atol=1e-4, rtol=1e-4)


def test_alpsbench_task3_helpers(trained):
    from flythinker.alpsbench import iter_packets
    from flythinker.alpsbench.dense import (
        compare_rankers,
        dense_ranker,
        is_validation,
        pools_by_level,
        split_sessions,
        summarize,
        training_pairs,
        tune_bm25_weight,
    )
    from flythinker.alpsbench.evaluate import bm25_ranker

    packets = list(iter_packets(PACKETS))
    splits = split_sessions(packets)
    assert sorted(p.session_id for p in splits.train + splits.val + splits.test) == sorted(
        p.session_id for p in packets)
    assert all(is_validation(p.session_id) for p in splits.val)
    t3, t34 = training_pairs(packets), training_pairs(packets, with_task4=True)
    assert len(t3) == 3 and len(t34) > 3 and {p.source for p in t34} == {"task3", "task4"}
    pools = pools_by_level(packets, [], [10, 100])
    assert [len(p) for p in pools[10]] == [11, 11, 11]
    rankers = {"bm25": bm25_ranker, "dense": dense_ranker(trained)}
    out = compare_rankers(packets, pools, rankers)
    assert set(out) == {10, 100} and len(out[100]["dense"]["accuracy"]) == 3
    summary = summarize(out)
    assert set(summary["paired_vs_bm25"]["100"]) == {"dense"}
    diff = [a - b for a, b in zip(out[100]["dense"]["accuracy"], out[100]["bm25"]["accuracy"])]
    assert summary["paired_vs_bm25"]["100"]["dense"]["mean"] == pytest.approx(sum(diff) / 3)
    w, grid = tune_bm25_weight(trained, packets, pools[100], (0.0, 1.0))
    assert w in (0.0, 1.0) and set(grid) == {"0.0", "1.0"}
