"""Every bad input to FlyThinkerConfig / FlyThinkerForCausalLM gets a clear error naming the problem."""

from __future__ import annotations

import pytest
import torch
from model_helpers import (
    random_ids,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_lm,
    tiny_pair,
)
from transformers import DynamicCache

from flythinker import FlyThinkerConfig, FlyThinkerForCausalLM


@pytest.fixture(scope="module")
def pair():
    return tiny_lm(seed=0, hidden_size=48), tiny_lm(seed=1, hidden_size=32)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"fusion_lambda": float("nan")}, ValueError, "fusion_lambda"),
    ({"fusion_lambda": float("inf")}, ValueError, "fusion_lambda"),
    ({"fusion_lambda": -0.1}, ValueError, "fusion_lambda"),
    ({"fusion_lambda": "0.5"}, TypeError, "fusion_lambda"),
    ({"norm_target": "mean"}, ValueError, "norm_target"),
    ({"norm_target": -1.0}, ValueError, "norm_target"),
    ({"projection": "mlp"}, ValueError, "projection"),
    ({"parallel": "processes"}, ValueError, "parallel"),
    ({"loss_impl": "liger"}, ValueError, "loss_impl"),
    ({"detach_norm": "yes"}, TypeError, "detach_norm"),
    ({"fuse_prompt": 1}, TypeError, "fuse_prompt"),
    ({"fusion_lamda": 0.5}, ValueError, "did you mean 'fusion_lambda'"),
])
def test_bad_fusion_options(pair, kwargs, exc, match):
    gen, rsn = pair
    with pytest.raises(exc, match=match):
        FlyThinkerForCausalLM.from_pair(gen, rsn, **kwargs)
    with pytest.raises(exc, match=match):
        FlyThinkerConfig(generator=gen.config, reasoner=rsn.config, **kwargs)


def test_unknown_from_pair_option(pair):
    with pytest.raises(ValueError, match="unknown FlyThinker option.*temperature"):
        FlyThinkerForCausalLM.from_pair(*pair, temperature=0.7, projection="pad")


def test_vocab_and_special_token_mismatch():
    gen = tiny_lm(seed=0)
    with pytest.raises(ValueError, match="vocab_size 128 .* 160"):
        FlyThinkerForCausalLM.from_pair(gen, tiny_lm(seed=1, vocab_size=160), projection="pad")
    with pytest.raises(ValueError, match="eos_token_id"):
        FlyThinkerForCausalLM.from_pair(gen, tiny_lm(seed=1, eos_token_id=5), projection="pad")


def test_pad_projection_needs_narrower_reasoner():
    gen, rsn = tiny_lm(seed=0, hidden_size=32), tiny_lm(seed=1, hidden_size=48)
    with pytest.raises(ValueError, match=r'projection="pad".*H_r=48 > H_g=32'):
        FlyThinkerForCausalLM.from_pair(gen, rsn, projection="pad")


def test_bad_model_arguments(pair):
    with pytest.raises(TypeError, match="generator must be"):
        FlyThinkerForCausalLM.from_pair(torch.nn.Linear(2, 2), pair[1], projection="pad")


@torch.no_grad()
def test_bad_forward_and_generate_inputs():
    m = tiny_pair()
    ids = random_ids(2, 4)
    # inputs_embeds alone cannot drive the reasoner (it reads ids); with ids it must match them
    with pytest.raises(ValueError, match="input_ids is required"):
        m(inputs_embeds=torch.zeros(2, 4, 48))
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        m(ids, inputs_embeds=torch.zeros(2, 3, 48))
    with pytest.raises(ValueError, match="input_ids is required"):
        m(attention_mask=torch.ones(2, 4))
    with pytest.raises(TypeError, match="FlyThinkerCache"):
        m(ids, cache=DynamicCache())
    with pytest.raises(TypeError, match="FlyThinkerCache"):
        m.generate(ids, cache=DynamicCache(), max_new_tokens=2)
    with pytest.raises(ValueError, match="reasoner_input_ids must be"):
        m(ids, reasoner_input_ids=random_ids(3, 5))
    with pytest.raises(ValueError, match="reasoner_attention_mask"):
        m(ids, reasoner_input_ids=random_ids(2, 5), reasoner_attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        m(ids, attention_mask=torch.ones(2, 1, 4, 4))
    with pytest.raises(ValueError, match="supports cache_implementation in"):  # static/offloaded work
        m.generate(ids, cache_implementation="quantized", max_new_tokens=2)
    with pytest.raises(ValueError, match="not used by the model"):
        m.generate(ids, reasoner_ids=ids, max_new_tokens=2)


def test_reasoner_device_keyword(pair):
    m = FlyThinkerForCausalLM.from_pair(*pair, reasoner_device="cpu", projection="pad")
    assert next(m.reasoner.parameters()).device.type == "cpu"


@torch.no_grad()
def test_cache_without_latent_and_use_cache_false():
    from flythinker import FlyThinkerCache

    m = tiny_pair()
    ids = random_ids(1, 4)
    cache = FlyThinkerCache(generator_config=m.config.generator, reasoner_config=m.config.reasoner)
    m.generator.model(ids, cache=cache.generator)  # generator states only, no reasoner latent
    with pytest.raises(ValueError, match="no pending reasoner latent"):
        m(ids[:, -1:], cache=cache)
    fresh = FlyThinkerCache(generator_config=m.config.generator, reasoner_config=m.config.reasoner)
    out = m(ids, cache=fresh, use_cache=False)
    assert out.cache is None and fresh.get_seq_length() == 0 and fresh.pending is None


def test_loading_never_unpickles(tmp_path):
    """A checkpoint folder holding only a pickled `pytorch_model.bin` is refused, by from_pretrained and from_pair."""
    model = tiny_pair()
    model.save_pretrained(tmp_path / "ok")
    assert FlyThinkerForCausalLM.from_pretrained(tmp_path / "ok").config.fusion_lambda == model.config.fusion_lambda
    for name, sub in (("pair", model), ("gen", model.generator)):
        folder = tmp_path / name
        sub.config.save_pretrained(folder)
        torch.save(sub.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises((OSError, ValueError)):
        FlyThinkerForCausalLM.from_pretrained(tmp_path / "pair")
    with pytest.raises(ValueError, match="safetensors"):
        FlyThinkerForCausalLM.from_pretrained(tmp_path / "ok", use_safetensors=False)
    with pytest.raises((OSError, ValueError)):
        FlyThinkerForCausalLM.from_pair(str(tmp_path / "gen"), str(tmp_path / "gen"), projection="pad")
