"""Core of FlyThinkerForCausalLM: config, cache, fused forward, greedy generate, save/load (tiny CPU models)."""

from __future__ import annotations

import os

import pytest
import torch
from flythinker.kernels import latent_fuse_naive
from model_helpers import (
    EOS,
    PAD,
    random_ids,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_lm,
    tiny_pair,
)
from transformers import AutoModelForCausalLM

from flythinker import FlyThinkerCache, FlyThinkerConfig, FlyThinkerForCausalLM
from flythinker.configuration import IGNORE_INDEX


def reference_logits(model: FlyThinkerForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None = None):
    """The fused forward written out from docs/design.md ("Fusion rule"), independent of the model's own plumbing."""
    cfg = model.config
    mask = torch.ones_like(ids) if mask is None else mask
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    h = model.reasoner.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    W = model.generator.get_input_embeddings().weight
    proj = model.latent_proj.weight if model.latent_proj is not None else None
    emb = latent_fuse_naive(ids, W, h, mask, lam=cfg.fusion_lambda, norm_target=cfg.norm_target, projection=proj)
    return model.generator(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits


@torch.no_grad()
def test_lambda_zero_matches_generator_logits_and_greedy():
    model = tiny_pair(fusion_lambda=0.0)
    ids = random_ids(2, 7)
    ours = model(ids).logits
    theirs = model.generator(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    ref = model.generator.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    assert torch.equal(out, ref)


@torch.no_grad()
@pytest.mark.parametrize("projection,norm_target", [("pad", "vocab_mean"), ("linear", "token"), ("pad", 3.0)])
def test_forward_matches_reference(projection, norm_target):
    model = tiny_pair(fusion_lambda=0.5, projection=projection, norm_target=norm_target)
    if model.latent_proj is not None:
        torch.nn.init.normal_(model.latent_proj.weight, std=0.3)
    ids = random_ids(2, 9, seed=1)
    torch.testing.assert_close(model(ids).logits, reference_logits(model, ids), atol=1e-5, rtol=1e-5)
    # lambda actually matters
    assert (model(ids).logits - model.generator(ids).logits).abs().max() > 1e-2


@torch.no_grad()
def test_cached_decoding_equals_uncached_recompute_each_step():
    model = tiny_pair(fusion_lambda=0.7)
    ids = random_ids(2, 5, seed=2)
    out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True,
                         output_logits=True)
    seq = out.sequences
    for step, step_logits in enumerate(out.logits):
        prefix = seq[:, : ids.shape[1] + step]
        full = model(prefix, use_cache=False).logits[:, -1]
        torch.testing.assert_close(step_logits, full, atol=1e-4, rtol=1e-4)
        assert torch.equal(full.argmax(-1), seq[:, ids.shape[1] + step])
        torch.testing.assert_close(full, reference_logits(model, prefix)[:, -1], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_manual_incremental_forward_with_cache():
    """forward(cache=...) in chunks of 3 tokens then 1 equals one full forward."""
    model = tiny_pair(fusion_lambda=0.5)
    ids = random_ids(1, 8, seed=3)
    full = model(ids, use_cache=False).logits
    cache = FlyThinkerCache(generator_config=model.config.generator, reasoner_config=model.config.reasoner)
    parts = [model(ids[:, :3], cache=cache).logits, model(ids[:, 3:6], cache=cache).logits]
    parts += [model(ids[:, t: t + 1], past_key_values=cache).logits for t in (6, 7)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 8 and cache.reasoner.get_seq_length() == 8
    assert cache.latents.shape == (1, 8, model.config.reasoner.hidden_size)


@torch.no_grad()
def test_cache_crop_restores_pending_latent():
    model = tiny_pair(fusion_lambda=0.5)
    ids = random_ids(2, 9, seed=4)
    cache = FlyThinkerCache(generator_config=model.config.generator, reasoner_config=model.config.reasoner)
    model(ids[:, :6], cache=cache)
    model(ids[:, 6:], cache=cache)  # 3 more tokens
    cache.crop(-3)
    assert cache.get_seq_length() == 6 and cache.reasoner.get_seq_length() == 6
    nxt = model(ids[:, 6:7], cache=cache).logits[:, -1]
    torch.testing.assert_close(nxt, model(ids[:, :7], use_cache=False).logits[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        cache.crop(2)


@torch.no_grad()
def test_cache_batch_ops_keep_everything_consistent():
    model = tiny_pair(fusion_lambda=0.5)
    ids = random_ids(3, 6, seed=5)
    cfgs = dict(generator_config=model.config.generator, reasoner_config=model.config.reasoner)
    cache = FlyThinkerCache(**cfgs)
    model(ids, cache=cache)
    nxt = random_ids(3, 1, seed=6)
    # reorder (beam search): rows [2, 0, 0]
    idx = torch.tensor([2, 0, 0])
    c2 = FlyThinkerCache(**cfgs)
    model(ids, cache=c2)
    c2.reorder_cache(idx)
    got = model(nxt[idx], cache=c2).logits
    ref = model(torch.cat([ids[idx], nxt[idx]], 1), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # select rows then repeat-interleave
    cache.batch_select_indices(torch.tensor([1, 2]))
    cache.batch_repeat_interleave(2)
    assert cache.latents.shape[0] == 4 and cache.reasoner.layers[0].keys.shape[0] == 4
    rows = ids[[1, 1, 2, 2]]
    got = model(nxt[[1, 1, 2, 2]], cache=cache).logits
    ref = model(torch.cat([rows, nxt[[1, 1, 2, 2]]], 1), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.pending is None and cache.reasoner_attention_mask is None


@torch.no_grad()
def test_left_padded_batch_equals_rows_alone():
    """pad id = EOS, whose embedding is not zero: a leaked pad latent would change the tokens."""
    model = tiny_pair(fusion_lambda=1.0)
    rows = [random_ids(1, n, seed=10 + n)[0] for n in (3, 7, 5)]
    L = 7
    ids = torch.full((3, L), EOS)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=EOS, eos_token_id=None)
    batch = model.generate(ids, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], **kw)
        assert torch.equal(batch[i, L:], alone[0, len(r):]), i
    # and the forward logits of the real positions match too
    for i, r in enumerate(rows):
        lb = model(ids[i: i + 1], attention_mask=mask[i: i + 1]).logits[0, L - len(r):]
        torch.testing.assert_close(lb, model(r[None]).logits[0], atol=1e-4, rtol=1e-4)


def test_labels_loss_matches_manual_cross_entropy():
    model = tiny_pair(fusion_lambda=0.5, loss_impl="naive")
    ids = random_ids(2, 8, seed=7)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    out = model(ids, labels=labels)
    logits = reference_logits(model, ids)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    n = (labels[:, 1:] != IGNORE_INDEX).sum()
    out2 = model(ids, labels=labels, num_items_in_batch=2 * n)
    torch.testing.assert_close(out2.loss, ref / 2, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert model.reasoner.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0  # gradient reaches R
    fused = tiny_pair(fusion_lambda=0.5, loss_impl="fused")(ids, labels=labels)
    assert fused.logits is None  # memory-lean training path: no [B, T, V] logits
    torch.testing.assert_close(fused.loss, ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("projection", ["pad", "linear"])
def test_save_load_round_trip(tmp_path, projection):
    model = tiny_pair(fusion_lambda=0.3, projection=projection, norm_target="token")
    if model.latent_proj is not None:
        torch.nn.init.normal_(model.latent_proj.weight, std=0.3)
    model.save_pretrained(tmp_path)
    files = os.listdir(tmp_path)
    assert any(f.endswith(".safetensors") for f in files) and not any(f.endswith(".bin") for f in files)
    loaded = FlyThinkerForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.fusion_lambda == 0.3 and loaded.config.norm_target == "token"
    assert loaded.config.projection == projection
    ids = random_ids(2, 6, seed=8)
    sd = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)  # sdpa vs eager
    g = loaded.generator
    assert g.lm_head.weight.data_ptr() == g.get_input_embeddings().weight.data_ptr()  # tied stays tied
    if projection == "linear":
        torch.testing.assert_close(loaded.latent_proj.weight, model.latent_proj.weight, atol=0, rtol=0)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(loaded.generate(ids, **kw), model.generate(ids, **kw))
    # the Auto classes know the model type once flythinker is imported
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(auto, FlyThinkerForCausalLM)


@torch.no_grad()
def test_attn_implementation_passthrough(tmp_path):
    model = tiny_pair(fusion_lambda=0.5)
    model.save_pretrained(tmp_path)
    m = FlyThinkerForCausalLM.from_pretrained(tmp_path, attn_implementation={"generator": "eager",
                                                                             "reasoner": "sdpa"})
    assert m.config.generator._attn_implementation == "eager"
    assert m.config.reasoner._attn_implementation == "sdpa"
    assert FlyThinkerForCausalLM.from_pretrained(tmp_path).config.generator._attn_implementation == "sdpa"
    ids = random_ids(1, 5)
    torch.testing.assert_close(m.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_from_pair_keeps_weights_and_config_defaults():
    gen, rsn = tiny_lm(seed=0, hidden_size=48), tiny_lm(seed=1)
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    model = FlyThinkerForCausalLM.from_pair(gen, rsn, projection="pad")
    assert model.generator is gen and model.reasoner is rsn
    for k, v in gen.state_dict().items():
        assert torch.equal(v, before[k]), k
    cfg = model.config
    assert (cfg.fusion_lambda, cfg.norm_target, cfg.projection) == (0.5, "vocab_mean", "pad")
    assert cfg.detach_norm and cfg.fuse_prompt and cfg.parallel == "auto"
    assert isinstance(cfg, FlyThinkerConfig) and cfg.get_text_config(decoder=True) is cfg.generator
    assert model.generation_config.eos_token_id == gen.generation_config.eos_token_id


def test_vocab_mean_cached_at_inference_and_refreshed_on_change():
    model = tiny_pair(fusion_lambda=0.5)
    W = model.generator.get_input_embeddings().weight
    c1 = model._norm_target()
    # a 0-dim tensor, not a float: no host sync; the same object while the table is unchanged
    assert isinstance(c1, torch.Tensor) and c1.dim() == 0 and model._norm_target() is c1
    with torch.no_grad():
        W.mul_(2.0)  # in-place change bumps the version counter
    assert float(model._norm_target()) == pytest.approx(2 * float(c1), rel=1e-5)
    model.train()
    assert model._norm_target() == "vocab_mean"  # training: always recomputed by the op


def test_from_pair_defaults_to_the_zero_projection_that_starts_at_the_generator():
    """Two pretrained models paired without a projection: a zero-initialised learned map, so the new pair's logits
    are the generator's at lambda 1; `projection="pad"` by name gives the paper's rule, which moves them."""
    gen, rsn = tiny_lm(seed=0, hidden_size=48), tiny_lm(seed=1, hidden_size=32)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    pair = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=1.0, parallel="off").eval()
    assert pair.config.projection == "zero" and not pair.latent_proj.weight.any()
    with torch.no_grad():
        want = gen(ids).logits
        assert torch.allclose(pair(ids).logits, want, atol=1e-6)
        pad = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=1.0, parallel="off", projection="pad").eval()
        assert pad.config.projection == "pad" and pad.latent_proj is None
        assert not torch.allclose(pad(ids).logits, want, atol=1e-3)
    assert FlyThinkerConfig(generator=gen.config, reasoner=rsn.config).projection == "pad"  # a saved config's default
