"""FlyThinker over several HF decoder families (tiny random configs) and a cross-family pair sharing one vocab."""

from __future__ import annotations

import pytest
import torch
from model_helpers import (
    EOS,
    PAD,
    VOCAB,
    random_ids,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_lm,
)
from transformers import AutoConfig, AutoModelForCausalLM

from flythinker import FlyThinkerForCausalLM


def check_pair(model: FlyThinkerForCausalLM, steps: int = 5) -> None:
    ids = random_ids(2, 5, seed=50)
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=PAD, eos_token_id=None,
                         return_dict_in_generate=True, output_logits=True)
    for t, step_logits in enumerate(out.logits):  # cached decode == full uncached recompute
        full = model(out.sequences[:, : 5 + t], use_cache=False).logits[:, -1]
        torch.testing.assert_close(step_logits, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
@torch.no_grad()
def test_family(family):
    gen, rsn = tiny_lm(family, seed=0, hidden_size=48), tiny_lm(family, seed=1, hidden_size=32)
    m0 = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.0, projection="pad").eval()
    ids = random_ids(2, 6, seed=51)
    torch.testing.assert_close(m0(ids).logits, gen(ids).logits, atol=1e-5, rtol=0)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(m0.generate(ids, **kw), gen.generate(ids, **kw))
    m = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.7, projection="pad").eval()
    assert (m(ids).logits - gen(ids).logits).abs().max() > 1e-3
    check_pair(m)


@torch.no_grad()
def test_cross_family_pair_linear_projection_wider_reasoner():
    """Qwen2 reasoner (H=64) for a Llama generator (H=48): "pad" is impossible, "linear" works."""
    gen, rsn = tiny_lm("llama", seed=0, hidden_size=48), tiny_lm("qwen2", seed=1, hidden_size=64)
    with pytest.raises(ValueError, match="pad"):
        FlyThinkerForCausalLM.from_pair(gen, rsn, projection="pad")
    m = FlyThinkerForCausalLM.from_pair(gen, rsn, projection="linear", fusion_lambda=0.6).eval()
    assert m.latent_proj.weight.shape == (48, 64)
    check_pair(m)


@torch.no_grad()
def test_cross_family_pad_and_softcapping_generator():
    """Gemma2 generator (final_logit_softcapping) + Mistral reasoner."""
    cfg = AutoConfig.for_model("gemma2", hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=12, intermediate_size=96, vocab_size=VOCAB,
                               final_logit_softcapping=5.0, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
                               sliding_window=4)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    gen = AutoModelForCausalLM.from_config(cfg).eval()
    rsn = tiny_lm("mistral", seed=1, hidden_size=32)
    m0 = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.0, projection="pad").eval()
    ids = random_ids(2, 7, seed=52)
    logits = m0(ids).logits
    assert logits.abs().max() <= 5.0
    torch.testing.assert_close(logits, gen(ids).logits, atol=1e-5, rtol=0)
    check_pair(FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.5, projection="pad").eval())
