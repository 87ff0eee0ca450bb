"""flythinker.training.reasoner_cache: with a frozen reasoner, training through the cache gives exactly the losses
and weights of training without it while the reasoner runs once per distinct batch; what would make a stored
latent wrong (a training reasoner parameter, dropout in training mode) is refused; decoding is not cached; the
model is restored on exit."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from flythinker.modeling import FlyThinkerForCausalLM
from flythinker.training import FlyThinkerCollator, apply_lora, set_trainable, train_loop
from flythinker.training.reasoner_cache import cached_reasoner_latents
from flythinker.training.toy import char_tokenizer, secret_task, tiny_config

TOK = char_tokenizer()
COLLATE = FlyThinkerCollator(tokenizer=TOK)


def pair(seed=0):
    torch.manual_seed(seed)
    g = AutoModelForCausalLM.from_config(tiny_config(hidden_size=64))
    r = AutoModelForCausalLM.from_config(tiny_config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1))
    model = FlyThinkerForCausalLM.from_pair(g, r, fusion_lambda=1.0, projection="linear", parallel="off")
    apply_lora(model, "generator", r=4, alpha=8)
    set_trainable(model, ("generator", "projection"))  # the reasoner frozen
    return model


def train(model, steps=6):
    # 12 examples in batches of 4: a 3-batch permutation, cycled, so steps 4-6 repeat batches 1-3
    return train_loop(model, secret_task(12, seed=1), COLLATE, steps=steps, batch_size=4, lr=1e-2, seed=0)


def test_cached_training_equals_uncached_and_runs_each_batch_once():
    plain, cached = pair(), pair()
    res = train(plain)
    with cached_reasoner_latents(cached) as store:
        res_c = train(cached)
    assert res_c.losses == res.losses
    for (n, p), (_, q) in zip(plain.named_parameters(), cached.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert (store.misses, store.hits) == (3, 3)
    assert len(store.entries) == 3 and store.nbytes > 0
    assert "reasoner_forward" not in vars(cached)  # the method is back


def test_a_hit_returns_a_copy():
    model = pair().eval()
    batch = COLLATE(secret_task(4))
    with cached_reasoner_latents(model) as store:
        first = model(**batch, use_cache=False).loss
        stored = next(iter(store.entries.values())).clone()
        model.reasoner_forward(batch["reasoner_input_ids"], batch["reasoner_attention_mask"], None, None,
                               False).add_(1.0)  # a caller writing into what it got back
        again = model(**batch, use_cache=False).loss
    assert torch.equal(next(iter(store.entries.values())), stored)
    assert torch.equal(first, again) and store.hits == 1


def test_decoding_is_not_cached():
    model = pair().eval()
    ids = torch.tensor([TOK("say:")["input_ids"]])
    r = torch.tensor([TOK("key=2:")["input_ids"]])
    want = model.generate(ids, reasoner_input_ids=r, max_new_tokens=4, do_sample=False)
    with cached_reasoner_latents(model) as store:
        got = model.generate(ids, reasoner_input_ids=r, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    assert store.entries == {} and store.hits == store.misses == 0


def test_a_reasoner_that_trains_or_drops_out_is_refused():
    model = pair()
    set_trainable(model, "both")
    with pytest.raises(ValueError, match="frozen reasoner"), cached_reasoner_latents(model):
        pass
    model = pair()
    model.reasoner.config.attention_dropout = 0.1
    model.train()
    with pytest.raises(ValueError, match="dropout"), cached_reasoner_latents(model):
        pass
    model = pair()
    with cached_reasoner_latents(model):  # unfrozen inside: refused at the next miss
        next(model.reasoner.parameters()).requires_grad_(True)
        with pytest.raises(ValueError, match="frozen reasoner"):
            model(**COLLATE(secret_task(4)), use_cache=False)


def test_a_store_is_shared_only_between_equal_reasoners():
    first, second, other = pair(), pair(), pair(seed=1)
    with cached_reasoner_latents(first) as store:
        train(first, steps=3)
    with cached_reasoner_latents(second, store):  # the same reasoner weights: every batch is a hit
        train(second, steps=3)
    assert (store.misses, store.hits) == (3, 3)
    with pytest.raises(ValueError, match="another reasoner"), cached_reasoner_latents(other, store):
        pass
