"""The shared-base pair's lean batched step ("decode at the cost of one model"): per adapted linear one
base linear + one baddbmm_, one bmm per group of linears reading one input (q/k/v, gate/up), the stacked adapter
weights cached and rebuilt when the adapters change. It gives the two-copy pair's logits and tokens, follows
in-place and replaced adapter weights (a stale cache fails these tests), leaves training on peft's formula, and
dispatches few ops."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import left_pad, random_ids, randomise_adapters, single_thread, split_inputs, tiny_lm  # noqa: F401

from benchmarks.opcount import pair_step_ops, total
from flythinker import FlyThinkerForCausalLM, decode
from flythinker.shared_base import SharedBaseSpec, SharedLoRALinear, adapters, to_peft

R = 4
SPEC = SharedBaseSpec(r=R, lora_alpha=8)


def _sync(shared, two):
    """The two-copy pair's peft LoRA layers take the shared pair's adapters (A, B, scaling)."""
    with torch.no_grad():
        for h in ("generator", "reasoner"):
            mine = adapters(getattr(shared, h))
            for n, m in getattr(two, h).named_modules():
                if n in mine:
                    m.lora_A["default"].weight.copy_(mine[n].lora_A)
                    m.lora_B["default"].weight.copy_(mine[n].lora_B)
                    m.scaling["default"] = mine[n].scaling


@pytest.fixture
def pairs():
    """A fresh (shared-base pair, two-copy pair with the same adapters as peft LoRA) per test: tests change them."""
    base = tiny_lm(hidden_size=48)
    clean = copy.deepcopy(base)
    shared = FlyThinkerForCausalLM.from_shared_base(base, r=R, lora_alpha=8, fusion_lambda=0.5, parallel="off",
                                                    projection="pad").eval()
    randomise_adapters(shared, 0)
    g = to_peft(shared.generator, copy.deepcopy(clean), SPEC).base_model.model
    r = to_peft(shared.reasoner, clean, SPEC).base_model.model
    return shared, FlyThinkerForCausalLM.from_pair(g, r, fusion_lambda=0.5, parallel="off", projection="pad").eval()


@pytest.fixture
def lean_calls(monkeypatch):
    """How many times the lean batched path ran (a list that grows by one per call)."""
    calls = []
    lean = SharedLoRALinear._batched

    def counted(self, x):
        calls.append(x.shape[0])
        return lean(self, x)

    monkeypatch.setattr(SharedLoRALinear, "_batched", counted)
    return calls


def _steps(model, ids, mask, kw, n=6):
    """The fast loop's logits and latents step by step (greedy): [logits0, logits1, latent1, ...]."""
    rids, rmask = kw.get("reasoner_input_ids"), kw.get("reasoner_attention_mask")
    with torch.inference_mode():
        gm, rm = decode._loop_masks(ids, mask, rids, rmask, n)
        logits, st = decode.prefill(model, ids, gm, rids, rm)
        step = decode.generator_step(model, st.cache)
        seq = [logits]
        for s in range(n - 1):
            seq.append(decode.decode_one_token(model, st, seq[-2 if s else -1].argmax(-1), s, step))
            seq.append(st.pending)
    return seq


def _assert_same(shared, two, ids, mask, kw):
    a, b = _steps(shared, ids, mask, kw), _steps(two, ids, mask, kw)
    for x, y in zip(a, b, strict=True):  # fp32 rounding: the committed cat formula also differs by up to 2e-5 here
        torch.testing.assert_close(x, y, rtol=1e-4, atol=5e-5)
    for x, y in zip(a[::2], b[::2], strict=True):  # the logits: the same greedy token at every step
        assert torch.equal(x.argmax(-1), y.argmax(-1))
    out = shared.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **kw)
    assert decode.generate_path(shared, ids, attention_mask=mask, **kw).endswith("shared-base batched step")
    ref = two.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, fast_path=False, **kw)
    assert torch.equal(out, ref)
    return out


@pytest.mark.parametrize("split", [False, True], ids=["shared_ctx", "split_ctx"])
@pytest.mark.parametrize("batch", [1, 3])
def test_lean_step_matches_two_copy(pairs, lean_calls, split, batch):
    shared, two = pairs
    _assert_same(shared, two, *split_inputs(batch, split))
    n_lin = len(adapters(shared.generator))
    assert lean_calls and len(lean_calls) % n_lin == 0 and set(lean_calls) == {2 * batch}


@pytest.mark.parametrize("change", ["in_place", "replaced", "scaling"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cache_follows_adapter_changes(pairs, lean_calls, change, batch):
    """Decode (the cache is built), change both halves' adapters, decode again: the two-copy pair's tokens with
    the new adapters, not the old ones (the change moves the tokens, so a stale cache would fail)."""
    shared, two = pairs
    ids, mask, kw = split_inputs(batch, True)
    before = _assert_same(shared, two, ids, mask, kw)
    if change == "in_place":
        randomise_adapters(shared, 7, scale=0.5, a_too=True)
    elif change == "replaced":  # new parameter objects (version counters start over)
        g = torch.Generator().manual_seed(3)
        for half in (shared.generator, shared.reasoner):
            for a in adapters(half).values():
                a.lora_B = torch.nn.Parameter(torch.randn(a.lora_B.shape, generator=g) * 0.5)
    else:
        for half in (shared.generator, shared.reasoner):
            for a in adapters(half).values():
                a.scaling *= -3.0
    _sync(shared, two)
    after = _assert_same(shared, two, ids, mask, kw)
    assert not torch.equal(before, after)
    assert lean_calls


def test_module_lean_equals_peft_formula(lean_calls):
    """Per adapted linear, with bias (qwen2's q/k/v) and T > 1: the lean path (no autograd) equals peft's formula
    (the autograd path), also after an in-place change, after a cache built under inference_mode is read under
    no_grad, and after `.double()` (same parameter objects and versions, new storage)."""
    shared = FlyThinkerForCausalLM.from_shared_base(tiny_lm("qwen2", hidden_size=48), r=R, lora_alpha=8,
                                                    parallel="off", projection="pad").eval()
    randomise_adapters(shared, 1, a_too=True)
    mods = list(adapters(shared.generator).values())
    assert any(m.base.bias is not None for m in mods)
    ctx, B = mods[0]._ctx, 2
    g = torch.Generator().manual_seed(0)

    def check(dtype=torch.float32, mode=torch.no_grad):
        for m in mods:
            x = torch.randn(2 * B, 3, m.lora_A.shape[1], generator=g).to(dtype)
            with ctx.batched(B):
                with mode():
                    lean = m(x)
                with torch.enable_grad():
                    ref = m(x)
            assert ref.requires_grad and not lean.requires_grad
            torch.testing.assert_close(lean, ref.detach(), rtol=1e-5, atol=1e-5)

    check(mode=torch.inference_mode)
    check()
    randomise_adapters(shared, 2, a_too=True)
    check()
    shared.double()
    check(torch.float64)
    assert len(lean_calls) == 4 * len(mods)


def test_training_keeps_peft_formula_and_gradients(lean_calls):
    """With autograd on (training), or dropout active, a batched forward takes peft's formula and both halves'
    adapters get gradients; the lean path never runs."""
    shared = FlyThinkerForCausalLM.from_shared_base(tiny_lm(hidden_size=48), r=R, lora_alpha=8, lora_dropout=0.1,
                                                    parallel="off", projection="pad").train()
    randomise_adapters(shared, 0)
    m = next(iter(adapters(shared.generator).values()))
    x = torch.randn(4, 1, m.lora_A.shape[1])
    with m._ctx.batched(2):
        m(x).square().sum().backward()
        with torch.no_grad():  # train mode, dropout 0.1: still the formula (dropout is random)
            m(x)
    assert m.lora_A.grad.abs().sum() > 0 and m._twin.lora_A.grad.abs().sum() > 0
    assert m.lora_B.grad.abs().sum() > 0 and m._twin.lora_B.grad.abs().sum() > 0
    assert not lean_calls


def test_op_count_per_token(pairs):
    """The adapters' share of one shared step's aten ops (the r = 4 pair minus the same base as an r = 0 pair):
    per adapted linear one baddbmm_ (+ one view of its output when B > 1), per same-input group one bmm (+ a view
    of its input when B > 1, + a split for q/k/v and gate/up): 1.86 per linear at B = 1, 3.43 at B > 1 on Llama
    (peft's formula through cat: 10), and no cat."""
    shared, _ = pairs
    plain = FlyThinkerForCausalLM.from_shared_base(tiny_lm(hidden_size=48), r=0, fusion_lambda=0.5,
                                                   parallel="off", projection="pad").eval()
    n_lin = len(adapters(shared.generator))
    for batch, most in ((1, 2.0), (3, 3.5)):
        ids, mask, _ = split_inputs(batch, False)
        ops, base = pair_step_ops(shared, ids, mask), pair_step_ops(plain, ids, mask)
        extra = total(ops) - total(base)
        assert 0 < extra <= most * n_lin, (extra, n_lin, ops - base)
        assert ops["cat"] == base["cat"] and ops["baddbmm_"] == n_lin


def test_decode_pairs_shared_section_runs_on_tiny(monkeypatch):
    """benchmarks/decode_pairs.py's shared section end to end on a tiny random Llama (a stand-in tokenizer, 6 new
    tokens, one round): the floor row (the generator alone at 2B rows) and the op counts are there."""
    from types import SimpleNamespace

    from benchmarks import decode_pairs as dp

    def load():
        tok = lambda text, return_tensors: SimpleNamespace(input_ids=random_ids(1, 200, seed=5))  # noqa: E731
        return dp._no_eos(tiny_lm(hidden_size=48)), tok

    monkeypatch.setattr(dp, "NEW", 6)
    monkeypatch.setattr(dp, "load", load)
    res = dp.section_shared(1)
    for B in (1, 4):
        row, ops = res[f"B{B}"], res["ops_per_token"][f"B{B}"]
        assert row["same_tokens_shared_twocopy"] and row["gen_merged_lean_2B"]["tokens"].shape == (2 * B, 6)
        assert row["floor_2B"]["token_ms"] > 0 and "gen_merged_lean_2B" in row["ratios"]
        assert 0 < ops["adapters_per_linear"] <= 3.5 and ops["shared_step"] > ops["generator_alone_2B"]
