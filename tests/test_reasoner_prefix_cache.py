"""Reasoner prefix caching for returning users: token-identical to no cache, exact-prefix reuse only, bounded."""

from __future__ import annotations

import pytest
import torch
from model_helpers import random_ids, randomise_adapters, single_thread, tiny_lm, tiny_pair  # noqa: F401

from flythinker import FlyThinkerForCausalLM
from flythinker.reasoner_prefix_cache import ReasonerPrefixCache, common_prefix

N_NEW = 6


def _turn(model, view: torch.Tensor, query: torch.Tensor, **kw) -> torch.Tensor:
    """One reply `[n]` to `query [1, P]` with the reasoner reading `view [1, Q]` (greedy, eos off)."""
    out = model.generate(query, reasoner_input_ids=view, max_new_tokens=N_NEW, do_sample=False, eos_token_id=[],
                         **kw)
    return out[0, query.shape[1]:]


def _conversation(model, turns: int = 3, seed: int = 0, **kw) -> list[torch.Tensor]:
    """A returning user: each turn's reasoner view is the last view + the reply + a new message."""
    view = random_ids(1, 20, seed=seed)
    replies = []
    for t in range(turns):
        reply = _turn(model, view, random_ids(1, 5 + t, seed=seed + 100 + t), **kw)
        replies.append(reply)
        view = torch.cat([view, reply[None], random_ids(1, 4 + t, seed=seed + 200 + t)], dim=1)
    return replies


@pytest.mark.parametrize("fast_path", [True, False], ids=["lean loop", "transformers loop"])
@pytest.mark.parametrize("parallel", ["off", "threads"])
def test_returning_user_same_tokens_as_no_cache(fast_path, parallel):
    model = tiny_pair(parallel=parallel)
    plain = _conversation(model, fast_path=fast_path)
    cache = model.enable_reasoner_prefix_cache()
    cached = _conversation(model, fast_path=fast_path)
    assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))
    assert cache.stats.hits == 2 and cache.stats.misses == 1
    # turn 2 reuses view 1 (20 tokens) and, in the lean loop, the reply it read (all but the last token);
    # turn 3 reuses view 2 (20 + 6 + 4 tokens) and the same
    reply_read = N_NEW - 1 if fast_path else 0
    assert cache.stats.reused_tokens == (20 + reply_read) + (30 + reply_read)
    assert len(cache) == 1  # each new entry covered the previous one


def test_shared_base_pair_lean_loop():
    base = tiny_lm(hidden_size=48)
    model = FlyThinkerForCausalLM.from_shared_base(base, r=4, lora_alpha=8, fusion_lambda=0.5, parallel="off",
                                                   projection="pad").eval()
    randomise_adapters(model, 3)
    plain = _conversation(model)
    cache = model.enable_reasoner_prefix_cache()
    cached = _conversation(model)
    from flythinker.decode import generate_path

    view, query = random_ids(1, 20), random_ids(1, 5)
    assert generate_path(model, query, reasoner_input_ids=view, max_new_tokens=N_NEW, do_sample=False,
                         eos_token_id=[]).endswith("shared-base batched step")
    assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))
    assert cache.stats.reused_tokens == (20 + N_NEW - 1) + (30 + N_NEW - 1)


@pytest.mark.parametrize("where", [0, 7, 19])
def test_prefix_differing_by_one_token_is_reused_only_before_it(where):
    model = tiny_pair()
    view = random_ids(1, 20, seed=4)
    query = random_ids(1, 6, seed=5)
    cache = model.enable_reasoner_prefix_cache()
    _turn(model, view, query)
    other = view.clone()
    other[0, where] = 3 + (int(other[0, where]) - 2) % 120  # another ordinary token
    other = torch.cat([other, random_ids(1, 5, seed=6)], dim=1)
    before = cache.stats.reused_tokens
    got = _turn(model, other, query)
    assert cache.stats.reused_tokens - before == where  # not one token past the difference
    model.disable_reasoner_prefix_cache()
    assert torch.equal(got, _turn(model, other, query))


def test_lru_byte_budget():
    kv = [torch.zeros(2, 10, 4)]
    probe = ReasonerPrefixCache(max_bytes=10**9)  # the size of one 10-token entry
    probe.store(torch.arange(10), kv, kv, torch.zeros(10, 8))
    size = probe.nbytes
    cache = ReasonerPrefixCache(max_bytes=3 * size)
    views = [torch.arange(10) + 100 * i for i in range(4)]
    for v in views[:3]:
        assert cache.store(v, kv, kv, torch.zeros(10, 8))
    assert cache.lookup(torch.cat([views[0], torch.tensor([7])]))[1] == 10  # touch the oldest: now most recent
    cache.store(views[3], kv, kv, torch.zeros(10, 8))  # over budget: the least recently used (views[1]) goes
    assert cache.nbytes <= cache.max_bytes and len(cache) == 3 and cache.stats.evictions == 1
    assert cache.lookup(torch.cat([views[1], torch.tensor([7])])) == (None, 0)
    assert cache.lookup(torch.cat([views[0], torch.tensor([7])]))[1] == 10
    big = [torch.zeros(2, 40, 4)]
    assert not cache.store(torch.arange(40), big, big, torch.zeros(40, 8))  # larger than the whole budget
    assert cache.stats.too_big == 1 and cache.nbytes <= cache.max_bytes


def test_budget_bounds_a_real_conversation():
    model = tiny_pair()
    cache = model.enable_reasoner_prefix_cache(max_bytes=40_000)
    for user in range(4):  # four users, two turns each: the budget holds a little over one view
        _conversation(model, turns=2, seed=10 * user)
        assert 0 < cache.nbytes <= 40_000
    assert cache.stats.evictions > 0


def test_bypassed_for_batches_and_padded_views():
    model = tiny_pair()
    cache = model.enable_reasoner_prefix_cache()
    views = random_ids(2, 12, seed=1)
    model.generate(random_ids(2, 5), reasoner_input_ids=views, max_new_tokens=3, do_sample=False)
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[0, -2:] = 0  # a right-padded reasoner view
    model.generate(random_ids(1, 5), reasoner_input_ids=views[:1], reasoner_attention_mask=mask, max_new_tokens=3,
                   do_sample=False)
    assert cache.stats.hits == cache.stats.misses == 0 and len(cache) == 0


def test_bad_arguments_and_common_prefix():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_bytes"):
            ReasonerPrefixCache(max_bytes=bad)
    with pytest.raises(ValueError, match="min_reuse"):
        ReasonerPrefixCache(min_reuse=0)
    assert common_prefix(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])) == 2
    assert common_prefix(torch.tensor([1, 2]), torch.tensor([1, 2, 4])) == 2
    assert common_prefix(torch.tensor([], dtype=torch.long), torch.tensor([1])) == 0
