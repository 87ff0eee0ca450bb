"""Shared-base pairs: one base + two LoRA adapters, the base held once, the batched decode step gives the
two-copy pair's tokens, save/load stores the base once, peft interop, training holds one copy."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import left_pad, random_ids, randomise_adapters, single_thread, split_inputs, tiny_lm  # noqa: F401
from safetensors import safe_open

import flythinker
from flythinker import FlyThinkerForCausalLM
from flythinker.decode import generate_path
from flythinker.shared_base import (
    SharedBaseSpec,
    SharedLoRALinear,
    adapters,
    is_shared_base,
    load_peft_adapter,
    parameter_bytes,
    to_peft,
)

R = 4
SPEC = SharedBaseSpec(r=R, lora_alpha=8)


@pytest.fixture(scope="module")
def pairs():
    """(shared-base pair, two-copy pair with the same adapters as peft LoRA on two independent base copies)."""
    base = tiny_lm(hidden_size=48)
    clean = copy.deepcopy(base)
    shared = FlyThinkerForCausalLM.from_shared_base(base, r=R, lora_alpha=8, fusion_lambda=0.5, parallel="off",
                                                    projection="pad").eval()
    randomise_adapters(shared)
    g = to_peft(shared.generator, copy.deepcopy(clean), SPEC).base_model.model
    r = to_peft(shared.reasoner, clean, SPEC).base_model.model
    two = FlyThinkerForCausalLM.from_pair(g, r, fusion_lambda=0.5, parallel="off", projection="pad").eval()
    return shared, two


def test_base_held_once(pairs):
    shared, two = pairs
    for (gn, gm), (rn, rm) in zip(adapters(shared.generator).items(), adapters(shared.reasoner).items(), strict=True):
        assert gn == rn and gm.base.weight is rm.base.weight and gm.lora_A is not rm.lora_A
    assert shared.reasoner.get_input_embeddings().weight is shared.generator.get_input_embeddings().weight
    keys = set(shared.state_dict())
    assert all("lora_" in k for k in keys if k.startswith("reasoner."))  # the base appears once, under generator.
    base = parameter_bytes(shared.generator) - sum(a.lora_A.numel() + a.lora_B.numel()
                                                   for a in adapters(shared.generator).values()) * 4
    lora = sum(a.lora_A.numel() + a.lora_B.numel() for h in (shared.generator, shared.reasoner)
               for a in adapters(h).values()) * 4
    assert parameter_bytes(shared) == base + lora
    assert parameter_bytes(shared) == sum(p.numel() * 4 for p in shared.parameters())
    assert parameter_bytes(two) == 2 * base + lora  # the two-copy pair: the same adapters, the base twice


@pytest.mark.parametrize("split", [False, True], ids=["shared_ctx", "split_ctx"])
@pytest.mark.parametrize("batch", [1, 3])
def test_batched_step_matches_two_copy(pairs, split, batch):
    shared, two = pairs
    ids, mask, kw = split_inputs(batch, split)
    seen = []
    lora = next(iter(adapters(shared.generator).values()))
    hook = lora.register_forward_pre_hook(lambda m, a: seen.append(m._ctx.split))
    try:
        out = shared.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **kw)
    finally:
        hook.remove()
    assert generate_path(shared, ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **kw) == (
        "fast static-cache loop, shared-base batched step")
    assert seen.count(batch) == 9  # 9 batched steps after the prefill, rows [:B] = the generator
    ref = two.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, fast_path=False, **kw)
    hf = shared.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, fast_path=False, **kw)
    assert torch.equal(out, ref) and torch.equal(hf, ref)
    # the adapters matter: the shared base alone (both adapters off) decodes something else
    assert not torch.equal(ref, _generate_base_only(shared, ids, mask, kw))


def _generate_base_only(shared, ids, mask, kw):
    saved = {}
    with torch.no_grad():
        for h in (shared.generator, shared.reasoner):
            for n, a in adapters(h).items():
                saved[(id(h), n)] = a.lora_B.clone()
                a.lora_B.zero_()
        out = shared.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **kw)
        for h in (shared.generator, shared.reasoner):
            for n, a in adapters(h).items():
                a.lora_B.copy_(saved[(id(h), n)])
    return out


def test_batched_step_logits_match(pairs):
    """The batched step's logits and latents equal the two-copy pair's to float tolerance, step by step."""
    from flythinker import decode

    shared, two = pairs
    ids, mask, kw = split_inputs(3, True)
    n = 6
    outs = []
    for m in (shared, two):
        gm, rm = decode._loop_masks(ids, mask, kw["reasoner_input_ids"], kw["reasoner_attention_mask"], n)
        logits, st = decode.prefill(m, ids, gm, kw["reasoner_input_ids"], rm)
        assert (st.shared is not None) == (m is shared)
        step = decode.generator_step(m, st.cache)
        seq = [logits]
        with torch.inference_mode():
            for s in range(n - 1):
                seq.append(decode.decode_one_token(m, st, seq[-1].argmax(-1), s, step))
                seq.append(st.pending)
        outs.append(seq)
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_save_load_stores_base_once(pairs, tmp_path):
    shared, _ = pairs
    shared.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    rsn = [k for k in keys if k.startswith("reasoner.")]
    assert rsn and all("lora_" in k for k in rsn)
    assert sum(k.startswith("generator.") and "lora_" not in k for k in keys) > 0
    loaded = FlyThinkerForCausalLM.from_pretrained(tmp_path).eval()
    assert is_shared_base(loaded) and loaded.config.shared_base == SPEC.to_dict()
    assert parameter_bytes(loaded) == parameter_bytes(shared)
    for gm, rm in zip(adapters(loaded.generator).values(), adapters(loaded.reasoner).values(), strict=True):
        assert gm.base.weight is rm.base.weight
    ids, mask, kw = split_inputs(3, True)
    a = shared.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **kw)
    loaded.config.parallel = "off"
    b = loaded.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **kw)
    assert torch.equal(a, b)


def test_peft_adapters_in_and_out(pairs, tmp_path):
    """Adapters go out as peft LoRA (a PeftModel, saved as a peft folder) and come back in, both halves."""
    shared, _ = pairs
    fresh = FlyThinkerForCausalLM.from_shared_base(tiny_lm(hidden_size=48), r=R, lora_alpha=8, parallel="off",
                                                   projection="pad")
    to_peft(shared.generator, tiny_lm(hidden_size=48), SPEC).save_pretrained(tmp_path / "gen_adapter")
    assert load_peft_adapter(fresh.generator, tmp_path / "gen_adapter") == len(adapters(fresh.generator))
    assert load_peft_adapter(fresh.reasoner, to_peft(shared.reasoner, tiny_lm(hidden_size=48), SPEC)) > 0
    for h_new, h_old in ((fresh.generator, shared.generator), (fresh.reasoner, shared.reasoner)):
        for a, b in zip(adapters(h_new).values(), adapters(h_old).values(), strict=True):
            assert torch.equal(a.lora_B, b.lora_B) and torch.equal(a.lora_A, b.lora_A)
    from peft import LoraConfig, get_peft_model

    other_rank = get_peft_model(tiny_lm(hidden_size=48), LoraConfig(r=R + 1, target_modules=list(SPEC.target_modules)))
    with pytest.raises(ValueError, match="rank differs"):
        load_peft_adapter(fresh.generator, other_rank)
    # an adapter on a subset of the modules: the rest get a zero adapter (exactly the base there)
    attention_only = get_peft_model(tiny_lm(hidden_size=48), LoraConfig(r=R, target_modules=["q_proj", "v_proj"]))
    n_layers = fresh.config.generator.num_hidden_layers
    assert load_peft_adapter(fresh.generator, attention_only) == 2 * n_layers
    assert all(not a.lora_B.any() for n, a in adapters(fresh.generator).items() if n.endswith(("o_proj", "up_proj")))
    on_head = get_peft_model(tiny_lm(hidden_size=48), LoraConfig(r=R, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="no adapter for"):
        load_peft_adapter(fresh.generator, on_head)


def test_rank_zero_is_the_base_paired_with_itself():
    """r = 0: no adapters; one copy of the weights; the batched step gives the two-copy pair's tokens."""
    base = tiny_lm(hidden_size=48)
    two = FlyThinkerForCausalLM.from_pair(copy.deepcopy(base), copy.deepcopy(base), parallel="off",
                                          projection="pad").eval()
    shared = FlyThinkerForCausalLM.from_shared_base(base, r=0, parallel="off", projection="pad").eval()
    assert not adapters(shared.generator) and 2 * parameter_bytes(shared) == parameter_bytes(two)
    for split in (False, True):
        ids, mask, kw = split_inputs(3, split)
        a = shared.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **kw)
        assert generate_path(shared, ids, attention_mask=mask, **kw).endswith("shared-base batched step")
        assert torch.equal(a, two.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                           fast_path=False, **kw))
    unshared = shared.to_two_copies().eval()  # and back: the base twice, nothing merged
    assert parameter_bytes(unshared) == parameter_bytes(two)
    for (k, v), (k2, v2) in zip(unshared.state_dict().items(), two.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def test_training_holds_one_copy_and_trains_both_adapters(pairs):
    shared, two = pairs
    ids = random_ids(2, 12, seed=3)
    labels = ids.clone()
    labels[:, :4] = -100
    losses = []
    for m in (shared, two):
        m.train()
        m.zero_grad()
        loss = m(ids, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        m.eval()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    trainable = [n for n, p in shared.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for half in (shared.generator, shared.reasoner):  # the reasoner's adapter learns through the latents
        assert any(a.lora_A.grad is not None and a.lora_A.grad.abs().sum() > 0 for a in adapters(half).values())
    assert all(p.grad is None for n, p in shared.named_parameters() if "lora_" not in n)
    shared.zero_grad()
    two.zero_grad()


def test_bad_input():
    with pytest.raises(ValueError, match="no LoRA target"):
        FlyThinkerForCausalLM.from_shared_base(tiny_lm(), target_modules=["nope"], projection="pad")
    with pytest.raises(ValueError, match="reasoner_device"):
        FlyThinkerForCausalLM.from_shared_base(tiny_lm(), reasoner_device="cpu", projection="pad")
    with pytest.raises(ValueError, match="rank"):
        SharedLoRALinear(torch.nn.Linear(4, 4), 0, 1.0, 0.0, None)


def test_fast_generate_uses_shared_step(pairs):
    shared, two = pairs
    ids, mask, kw = split_inputs(3, True)
    a = flythinker.fast_generate(shared, ids, attention_mask=mask, max_new_tokens=7, **kw)
    b = flythinker.fast_generate(two, ids, attention_mask=mask, max_new_tokens=7, **kw)
    assert torch.equal(a, b)


def _two_copy(base, **fusion):
    fusion.setdefault("projection", "pad")
    return FlyThinkerForCausalLM.from_pair(copy.deepcopy(base), copy.deepcopy(base), parallel="off", **fusion).eval()


def test_share_pair_detects_one_base_with_peft_adapters():
    """A two-copy pair of one base with peft LoRA on both halves (different layers, as the demo does) becomes a
    shared-base pair with both adapters: the same tokens, half the base memory."""
    from flythinker.shared_base import share_pair
    from flythinker.training.trainable import apply_lora

    two = _two_copy(tiny_lm(hidden_size=48), fusion_lambda=0.7)
    apply_lora(two, "generator", r=R, alpha=8)
    apply_lora(two, "reasoner", r=R, alpha=8, layers=[1], target_modules=["q_proj", "v_proj", "up_proj"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in two.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids, mask, kw = split_inputs(3, True)
    ref = two.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, fast_path=False, **kw)
    before = parameter_bytes(two)
    shared = share_pair(two)
    assert shared is not None and is_shared_base(shared) and shared.config.fusion_lambda == 0.7
    assert parameter_bytes(shared) < 0.6 * before
    out = shared.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **kw)
    assert generate_path(shared, ids, attention_mask=mask, **kw).endswith("shared-base batched step")
    assert torch.equal(out, ref)


def test_share_pair_refuses_different_bases():
    from flythinker.shared_base import share_pair

    pair = FlyThinkerForCausalLM.from_pair(tiny_lm(hidden_size=48, seed=0), tiny_lm(hidden_size=48, seed=1),
                                           projection="pad")
    assert share_pair(pair) is None
    plain = share_pair(_two_copy(tiny_lm(hidden_size=48)))
    assert plain is not None and not adapters(plain.generator)  # no adapters: r = 0


def test_a_zero_adapter_is_skipped_exactly_and_rechecked_when_it_changes():
    """An adapter whose B is zero adds nothing outside autograd (its matmuls are skipped); writing B in place, or
    asking for gradients, brings it back."""
    lin = torch.nn.Linear(6, 5)
    from flythinker.shared_base.lora_layer import StepContext

    a = SharedLoRALinear(lin, r=2, alpha=4, dropout=0.0, ctx=StepContext())
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert a.adds_nothing() and torch.equal(a(x), lin(x))
        a.lora_B.fill_(0.5)  # in place: the version counter moves
        assert not a.adds_nothing()
        want = lin(x) + (x @ a.lora_A.t()) @ a.lora_B.t() * 2.0
        assert torch.allclose(a(x), want, atol=1e-6)
        a.lora_B.zero_()
        assert a.adds_nothing()
    assert not a.adds_nothing()  # grad mode, B trainable: the zero B still gets its gradient
    a(x).sum().backward()
    assert a.lora_B.grad is not None and a.lora_B.grad.abs().sum() > 0


def test_to_two_copies_computes_the_same_and_saves_a_plain_pair(tmp_path):
    """A trained shared-base pair (both adapters, a learned projection, latent statistics) unshared: two plain
    models with the adapters merged, the same logits and greedy tokens as the shared-base pair, the base twice in
    memory, saved as a checkpoint with no shared_base (what `flythinker serve` takes); the source is untouched."""
    from torch import nn

    shared = FlyThinkerForCausalLM.from_shared_base(tiny_lm(hidden_size=48), r=R, lora_alpha=8, fusion_lambda=0.8,
                                                    projection="zero", latent_norm="standardize",
                                                    parallel="off").eval()
    randomise_adapters(shared, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        shared.latent_proj.weight.copy_(torch.randn(shared.latent_proj.weight.shape, generator=g) * 0.2)
        shared.latent_mean.copy_(torch.randn(shared.latent_mean.shape, generator=g) * 0.3)
        shared.latent_inv_std.copy_(torch.rand(shared.latent_inv_std.shape, generator=g) + 0.5)
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    two = shared.to_two_copies().eval()
    assert not is_shared_base(two) and not adapters(two.generator) and not adapters(two.reasoner)
    assert isinstance(two.generator.get_decoder().layers[0].self_attn.q_proj, nn.Linear)
    assert two.config.fusion_lambda == 0.8 and two.config.projection == "zero"
    for k, v in shared.fusion_state_dict().items():
        assert torch.equal(two.fusion_state_dict()[k], v)
    assert all(torch.equal(v, before[k]) for k, v in shared.state_dict().items())  # the source is not modified
    n_adapter = sum(a.lora_A.numel() + a.lora_B.numel() for h in (shared.generator, shared.reasoner)
                    for a in adapters(h).values()) * 4
    base = parameter_bytes(shared) - n_adapter - sum(v.numel() * 4 for k, v in shared.fusion_state_dict().items()
                                                     if k == "latent_proj.weight")
    assert parameter_bytes(two.generator) == parameter_bytes(two.reasoner) == base
    assert two.generator.get_input_embeddings().weight is not two.reasoner.get_input_embeddings().weight
    ids, mask, kw = split_inputs(3, True)
    with torch.no_grad():
        torch.testing.assert_close(two(ids, attention_mask=mask, **kw).logits,
                                   shared(ids, attention_mask=mask, **kw).logits, rtol=1e-5, atol=1e-5)
    ref = shared.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **kw)
    assert torch.equal(two.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **kw), ref)
    two.save_pretrained(tmp_path)
    loaded = FlyThinkerForCausalLM.from_pretrained(tmp_path).eval()
    assert "shared_base" not in (tmp_path / "config.json").read_text()
    loaded.config.parallel = "off"
    assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **kw), ref)
    with pytest.raises(ValueError, match="already holds two models"):
        two.to_two_copies()
