"""projection="zero": a learned projection initialised at zero, so an untrained pair is exactly its generator
(docs/fusion.md). Tiny random pairs; the real-model version is in tests/test_shipped_pair.py."""

from __future__ import annotations

import pytest
import torch
from model_helpers import PAD, left_pad, random_ids, tiny_pair

from flythinker import FlyThinkerConfig, FlyThinkerForCausalLM


@torch.no_grad()
@pytest.mark.parametrize("lam", [0.5, 1.0, 7.0])
def test_untrained_zero_pair_is_the_generator_token_for_token(lam):
    model = tiny_pair(fusion_lambda=lam, projection="zero")
    assert torch.count_nonzero(model.latent_proj.weight) == 0
    ids = random_ids(2, 7, seed=3)
    assert torch.equal(model(ids).logits, model.generator(ids).logits)  # bit-identical, not just close
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, **kw), model.generator.generate(ids, **kw))
    # the paper's pad fusion at the same lambda does change the greedy reply of the same pair
    pad = tiny_pair(fusion_lambda=lam, projection="pad")
    assert not torch.equal(pad.generate(ids, **kw), model.generator.generate(ids, **kw))


@torch.no_grad()
def test_untrained_zero_pair_split_context_is_the_generator():
    model = tiny_pair(fusion_lambda=1.0, projection="zero")
    g_ids, g_mask = left_pad([random_ids(1, 5, seed=1)[0], random_ids(1, 3, seed=2)[0]])
    r_ids, r_mask = left_pad([random_ids(1, 11, seed=4)[0], random_ids(1, 9, seed=5)[0]])
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    out = model.generate(g_ids, attention_mask=g_mask, reasoner_input_ids=r_ids, reasoner_attention_mask=r_mask,
                         **kw)
    assert torch.equal(out, model.generator.generate(g_ids, attention_mask=g_mask, **kw))


def test_zero_projection_learns_and_then_uses_the_reasoner():
    """At init the projection's gradient is non-zero (it can learn); one step later the latent reaches the
    generator, and what it adds depends on what the reasoner read."""
    model = tiny_pair(fusion_lambda=1.0, projection="zero").train()
    ids = random_ids(2, 8, seed=6)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grad = model.latent_proj.weight.grad
    assert grad is not None and grad.abs().max() > 0
    with torch.no_grad():
        model.latent_proj.weight -= 0.5 * grad / grad.abs().max()
    model.eval()
    with torch.no_grad():
        g_ids = random_ids(1, 4, seed=7)
        a = model(g_ids, reasoner_input_ids=random_ids(1, 9, seed=8)).logits[:, -1]
        b = model(g_ids, reasoner_input_ids=random_ids(1, 9, seed=9)).logits[:, -1]
        plain = model.generator(g_ids).logits[:, -1]
    assert (a - b).abs().max() > 1e-3 and (a - plain).abs().max() > 1e-3


@torch.no_grad()
def test_zero_projection_save_load_round_trip(tmp_path):
    model = tiny_pair(fusion_lambda=0.8, projection="zero")
    torch.nn.init.normal_(model.latent_proj.weight, std=0.2)  # a "trained" projection must survive the trip
    model.save_pretrained(tmp_path)
    loaded = FlyThinkerForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.projection == "zero" and loaded.config.fusion_lambda == 0.8
    assert torch.equal(loaded.latent_proj.weight, model.latent_proj.weight)  # not re-initialised to zero
    ids = random_ids(2, 6, seed=10)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(loaded.generate(ids, **kw), model.generate(ids, **kw))


def test_zero_is_a_valid_projection_and_typos_are_not():
    assert FlyThinkerConfig(projection="zero").projection == "zero"
    with pytest.raises(ValueError, match="projection"):
        FlyThinkerConfig(projection="zeros")
