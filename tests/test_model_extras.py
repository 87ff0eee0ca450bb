"""FlyThinker with the rest of the HF toolbox: assisted decoding (cache crop), no-cache and chunked-prefill
generate, peft LoRA, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from model_helpers import (
    PAD,
    random_ids,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_lm,
    tiny_pair,
)

from flythinker import FlyThinkerCache

KW = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=None)


@pytest.fixture(scope="module")
def model():
    return tiny_pair(fusion_lambda=0.8)


@torch.no_grad()
def test_assisted_decoding_equals_greedy(model, monkeypatch):
    """The assistant proposes several tokens, FlyThinker verifies them in one multi-token forward and crops the
    rejected ones: exact only if crop rolls back both KV caches and the pending latent."""
    ids = random_ids(1, 5, seed=60)
    greedy = model.generate(ids, **KW)
    assistant = tiny_lm(seed=7, hidden_size=32)
    crops = []
    monkeypatch.setattr(FlyThinkerCache, "crop", lambda self, n, _f=FlyThinkerCache.crop: (crops.append(n),
                                                                                            _f(self, n))[1])
    out = model.generate(ids, assistant_model=assistant, **KW)
    assert torch.equal(out, greedy)
    assert any(n < 0 for n in crops)  # rejected candidates were rolled back


@torch.no_grad()
def test_generate_without_cache_and_with_chunked_prefill(model):
    ids = random_ids(2, 9, seed=61)
    greedy = model.generate(ids, **KW)
    assert torch.equal(model.generate(ids, use_cache=False, **KW), greedy)
    assert torch.equal(model.generate(ids, prefill_chunk_size=4, **KW), greedy)
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        model.generate(ids, reasoner_input_ids=ids, prefill_chunk_size=4, **KW)


def test_peft_lora_on_both_models(tmp_path):
    peft = pytest.importorskip("peft")
    m = tiny_pair(fusion_lambda=0.5, loss_impl="naive")
    ids = random_ids(2, 6, seed=62)
    lora = peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert any(".generator." in n for n in names) and any(".reasoner." in n for n in names)
    loss = lora(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".reasoner." in n)  # the latent path trains R
    lora.save_pretrained(tmp_path)
    out = lora.generate(input_ids=ids, **KW)
    assert out.shape == (2, 14)


def test_gradient_checkpointing_same_loss_and_grads():
    m = tiny_pair(fusion_lambda=0.5, loss_impl="naive").train()
    ids = random_ids(2, 7, seed=63)

    def step():
        m.zero_grad()
        loss = m(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), m.reasoner.model.layers[0].self_attn.q_proj.weight.grad.clone()

    ref_loss, ref_grad = step()
    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert m.generator.model.gradient_checkpointing and m.reasoner.model.gradient_checkpointing
    loss, grad = step()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
