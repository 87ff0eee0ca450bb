"""The layer-truncated reasoner helper: first k layers + final norm of the generator, LoRA-trainable."""

from __future__ import annotations

import pytest
import torch
from model_helpers import random_ids, single_thread, tiny_lm  # noqa: F401

from flythinker import FlyThinkerForCausalLM
from flythinker.truncate import truncated_reasoner


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [1, 2])
def test_first_k_layers_and_final_norm(family, k):
    full = tiny_lm(family, num_hidden_layers=3)
    small = truncated_reasoner(full, k)
    assert len(small.get_decoder().layers) == k and small.config.num_hidden_layers == k
    assert full.config.num_hidden_layers == 3 and len(full.get_decoder().layers) == 3  # the original is untouched
    ids = random_ids(2, 7)
    with torch.no_grad():
        hs = full.get_decoder()(input_ids=ids, output_hidden_states=True).hidden_states  # [emb, layer 1, ...]
        expected = full.get_decoder().norm(hs[k])  # the output of layer k, through the final norm
        got = small.get_decoder()(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    w_full = full.get_decoder().layers[0].self_attn.q_proj.weight
    w_small = small.get_decoder().layers[0].self_attn.q_proj.weight
    assert torch.equal(w_full, w_small) and w_full.data_ptr() != w_small.data_ptr()  # a copy by default
    shared = truncated_reasoner(full, k, share_weights=True)
    assert shared.get_decoder().layers[0].self_attn.q_proj.weight is w_full


def test_bad_k():
    m = tiny_lm(num_hidden_layers=2)
    for k in (0, 3, 1.5, True):
        with pytest.raises(ValueError, match="k must be an int"):
            truncated_reasoner(m, k)


def test_pair_generates_and_trains_with_lora():
    from flythinker.training.trainable import apply_lora, set_trainable

    gen = tiny_lm(num_hidden_layers=3, hidden_size=48)
    rsn = truncated_reasoner(gen, 1)
    pair = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.5, parallel="off", projection="pad")
    ids = random_ids(2, 6)
    out = pair.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 10)
    apply_lora(pair, ("generator", "reasoner"), r=2, alpha=4)
    set_trainable(pair, ("generator", "reasoner"))
    pair.train()
    loss = pair(ids, labels=ids).loss
    loss.backward()
    rsn_lora = [p for n, p in pair.reasoner.named_parameters() if "lora_" in n]
    assert rsn_lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in rsn_lora)
    assert all(not p.requires_grad for n, p in pair.reasoner.named_parameters() if "lora_" not in n)
