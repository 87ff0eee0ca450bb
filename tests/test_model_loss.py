"""FlyThinkerForCausalLM loss: loss_impl="fused" (linear_cross_entropy) equals "naive" (logits + cross_entropy)
in loss and in the gradients of every parameter of both models."""

from __future__ import annotations

import pytest
import torch
from model_helpers import PAD, VOCAB, random_ids, tiny_lm, tiny_pair
from transformers import AutoConfig, AutoModelForCausalLM

from flythinker import FlyThinkerForCausalLM
from flythinker.configuration import IGNORE_INDEX


def assert_rel(actual, expected, tol, what=""):
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite"
    err = (a - e).abs().max() / e.abs().max().clamp(min=1e-12)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def loss_and_grads(model, impl, **batch):
    model.config.loss_impl = impl
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    return out, grads


def check_fused_equals_naive(model, tol=1e-5, **batch):
    fused, g_fused = loss_and_grads(model, "fused", **batch)
    naive, g_naive = loss_and_grads(model, "naive", **batch)
    assert fused.logits is None  # the fused path never builds the [B, T, V] logits
    assert naive.logits is not None
    assert_rel(fused.loss, naive.loss, tol, "loss")
    n_checked = 0
    for name, g in g_naive.items():
        if g is None:
            assert g_fused[name] is None, f"{name}: fused has a gradient, naive does not"
            continue
        assert g_fused[name] is not None, f"{name}: no gradient on the fused path"
        assert_rel(g_fused[name], g, tol, name)
        n_checked += 1
    return fused.loss, n_checked


def batch_with_prompt(B=2, T=11, prompt=4, seed=0):
    ids = random_ids(B, T, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in row 1
    ids[1, :2] = PAD
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("fuse_prompt", [False, True])
def test_shared_context_all_gradients_match(fuse_prompt):
    model = tiny_pair(seed=0, fuse_prompt=fuse_prompt).train()
    loss, n = check_fused_equals_naive(model, **batch_with_prompt())
    n_params = sum(1 for _ in model.parameters())
    assert n == n_params  # both models (and the shared tied head) get gradients on both paths
    assert loss.item() > 0


def test_num_items_in_batch_tensor_and_int():
    model = tiny_pair(seed=1).train()
    batch = batch_with_prompt(seed=3)
    n_valid = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    for n_items in (n_valid * 3, torch.tensor(n_valid * 3)):
        loss, _ = check_fused_equals_naive(model, num_items_in_batch=n_items, **batch)
        mean_loss = loss_and_grads(model, "fused", **batch)[0].loss
        assert_rel(loss * 3, mean_loss, 1e-5, "sum / num_items")


def test_split_context_gradients_match():
    model = tiny_pair(seed=2).train()
    batch = batch_with_prompt(T=9, prompt=3, seed=5)
    r_ids = random_ids(2, 14, seed=6)
    check_fused_equals_naive(model, reasoner_input_ids=r_ids, reasoner_attention_mask=torch.ones_like(r_ids),
                             **batch)


def test_untied_head_frozen_parts_and_all_ignored():
    gen = tiny_lm("qwen2", seed=0, hidden_size=48, tie_word_embeddings=False)
    rsn = tiny_lm("llama", seed=1, hidden_size=32)
    model = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.5, parallel="off", projection="pad").train()
    assert model.generator.get_output_embeddings().weight is not model.generator.get_input_embeddings().weight
    batch = batch_with_prompt(seed=7)
    check_fused_equals_naive(model, **batch)
    model.generator.get_output_embeddings().weight.requires_grad_(False)  # frozen LM head
    check_fused_equals_naive(model, **batch)
    batch["labels"][:] = IGNORE_INDEX
    model.config.loss_impl = "fused"
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_softcapping_generator_gradients_match():
    cfg = AutoConfig.for_model("gemma2", hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=12, intermediate_size=96, vocab_size=VOCAB,
                               final_logit_softcapping=2.0, bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
                               sliding_window=4)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    gen = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        gen.get_output_embeddings().weight.mul_(20)  # logits well into the cap's non-linear range
    rsn = tiny_lm("mistral", seed=1, hidden_size=32)
    model = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.5, parallel="off", projection="pad").train()
    check_fused_equals_naive(model, **batch_with_prompt(seed=9))
