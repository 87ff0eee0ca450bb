"""latent_norm="standardize": per-channel standardised latents with calibrated, saved statistics
(flythinker/latent_norm.py). Tiny random pairs."""

from __future__ import annotations

import pytest
import torch
from flythinker.kernels import latent_fuse
from model_helpers import PAD, left_pad, random_ids, tiny_pair

from flythinker import FlyThinkerConfig, FlyThinkerForCausalLM
from flythinker.latent_norm import LatentStats, calibrate_latent_norm, standardize_latent
from flythinker.pretrained.loading import from_shipped


def _split_batches(n: int = 3, seed: int = 0):
    out = []
    for i in range(n):
        g_ids, g_mask = left_pad([random_ids(1, 6, seed=seed + 10 * i)[0], random_ids(1, 4, seed=seed + 10 * i + 1)[0]])
        r_ids, r_mask = left_pad([random_ids(1, 12, seed=seed + 10 * i + 2)[0],
                                  random_ids(1, 9, seed=seed + 10 * i + 3)[0]])
        labels = g_ids.clone()
        labels[:, :3] = -100
        labels[g_mask == 0] = -100
        out.append(dict(input_ids=g_ids, attention_mask=g_mask, labels=labels, reasoner_input_ids=r_ids,
                        reasoner_attention_mask=r_mask))
    return out


def test_standardize_latent_keeps_zero_rows_zero():
    h = torch.randn(2, 3, 5)
    h[1, 2] = 0
    mean, inv = torch.randn(5), torch.rand(5) + 0.5
    out = standardize_latent(h, mean, inv)
    assert torch.equal(out[1, 2], torch.zeros(5))
    torch.testing.assert_close(out[0], (h[0] - mean) * inv)


def test_latent_stats_match_torch():
    x = torch.randn(50, 7) * 3 + 1
    s = LatentStats(7)
    s.add(x[:20])
    s.add(x[20:])
    mean, inv = s.result(1e-3)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(1 / inv, x.std(0), rtol=1e-5, atol=1e-5)


def _observed_fused(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(every latent the forward fuses, each row's first fused one) over `batches`, read from `fuse`'s arguments
    independently of flythinker.latent_norm's capture."""
    every, firsts = [], []
    real_fuse = model.model.fuse  # the fused pair's own fuse (what its forward calls)

    def spy(input_ids, latent, mask, prev, check_inputs=True, lam=None):
        live = mask.bool().clone()
        live[:, -1] = False  # slot T-1 feeds no position
        every.append(latent[live])
        for b in range(latent.shape[0]):
            has_prev = prev is not None and bool(prev[b].ne(0).any())
            if has_prev:
                every.append(prev[b:b + 1])
            firsts.append(prev[b] if has_prev else latent[b, int(live[b].int().argmax())])
        return real_fuse(input_ids, latent, mask, prev, check_inputs=check_inputs, lam=lam)

    model.model.fuse = spy
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch, use_cache=False)
    finally:
        del model.model.fuse
    return torch.cat(every), torch.stack(firsts)


def test_calibration_uses_exactly_the_fused_latents():
    """The statistics equal those of the latents the split forward fuses (captured independently here)."""
    model = tiny_pair(fusion_lambda=1.0, projection="zero", latent_norm="standardize")
    batches = _split_batches()
    rows, _ = _observed_fused(model, batches)
    info = calibrate_latent_norm(model, batches)
    assert info["latents"] == rows.shape[0] > 2
    torch.testing.assert_close(model.latent_mean, rows.mean(0))
    torch.testing.assert_close(1 / model.latent_inv_std, rows.std(0).clamp_min(1e-3), rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_calibrated_untrained_pair_is_still_the_generator():
    model = tiny_pair(fusion_lambda=1.0, projection="zero", latent_norm="standardize")
    calibrate_latent_norm(model, _split_batches())
    assert not torch.equal(model.latent_mean, torch.zeros_like(model.latent_mean))
    g_ids, g_mask = left_pad([random_ids(1, 5, seed=1)[0], random_ids(1, 3, seed=2)[0]])
    r_ids, r_mask = left_pad([random_ids(1, 11, seed=4)[0], random_ids(1, 9, seed=5)[0]])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    out = model.generate(g_ids, attention_mask=g_mask, reasoner_input_ids=r_ids, reasoner_attention_mask=r_mask,
                         **kw)
    assert torch.equal(out, model.generator.generate(g_ids, attention_mask=g_mask, **kw))


@torch.no_grad()
def test_fuse_standardises_before_the_rescale_and_projection():
    model = tiny_pair(fusion_lambda=0.7, projection="linear", latent_norm="standardize")
    model.latent_mean.copy_(torch.randn(32))
    model.latent_inv_std.copy_(torch.rand(32) + 0.5)
    ids, h = random_ids(2, 5, seed=3), torch.randn(2, 5, 32)
    mask, prev = torch.ones(2, 5, dtype=torch.long), torch.randn(2, 32)
    want = latent_fuse(ids, model.generator.get_input_embeddings().weight,
                       standardize_latent(h, model.latent_mean, model.latent_inv_std), mask, lam=0.7,
                       norm_target=model._norm_target(), projection=model.latent_proj.weight,
                       prev_latent=standardize_latent(prev, model.latent_mean, model.latent_inv_std))
    torch.testing.assert_close(model.fuse(ids, h, mask, prev), want)
    # the statistics change the fused embeddings (a pair without them differs)
    plain = tiny_pair(fusion_lambda=0.7, projection="linear")
    plain.latent_proj.weight.copy_(model.latent_proj.weight)
    assert not torch.allclose(plain.fuse(ids, h, mask, prev), want)


def _trained(model):
    with torch.no_grad():
        model.latent_proj.weight.copy_(torch.randn_like(model.latent_proj.weight) * 0.3)
    calibrate_latent_norm(model, _split_batches())
    return model


@torch.no_grad()
def test_statistics_are_saved_and_loaded(tmp_path):
    model = _trained(tiny_pair(fusion_lambda=1.0, projection="zero", latent_norm="standardize"))
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin"))
    back = FlyThinkerForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.latent_norm == "standardize"
    torch.testing.assert_close(back.latent_mean, model.latent_mean)
    torch.testing.assert_close(back.latent_inv_std, model.latent_inv_std)
    b = _split_batches(1, seed=7)[0]
    b.pop("labels")
    keep = b["attention_mask"].bool()  # padded positions' logits depend on the attention implementation
    torch.testing.assert_close(back(**b).logits[keep], model(**b).logits[keep])


@torch.no_grad()
def test_fusion_state_round_trip_and_refusals():
    model = _trained(tiny_pair(fusion_lambda=1.0, projection="zero", latent_norm="standardize"))
    state = model.fusion_state_dict()
    assert set(state) == {"latent_proj.weight", "latent_mean", "latent_inv_std"}
    other = tiny_pair(fusion_lambda=1.0, projection="zero", latent_norm="standardize")
    other.load_fusion_state_dict(state)
    torch.testing.assert_close(other.latent_mean, model.latent_mean)
    plain = tiny_pair(fusion_lambda=1.0, projection="zero")
    with pytest.raises(ValueError, match="latent_mean"):
        plain.load_fusion_state_dict(state)


def test_bad_latent_norm_and_uncalibratable_pairs_are_refused():
    with pytest.raises(ValueError, match="latent_norm must be one of"):
        tiny_pair(latent_norm="whiten")
    with pytest.raises(ValueError, match="latent_norm='standardize'"):
        calibrate_latent_norm(tiny_pair(projection="zero"), _split_batches(1))
    with pytest.raises(ValueError, match="needs at least 2"):
        LatentStats(4).result(1e-3)
    assert "latent_norm" in FlyThinkerConfig().to_dict()


def _shipped_folder(tmp_path, base, tensors: dict, lora: dict | None, **extra):
    import json

    from safetensors.torch import save_file

    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    folder = tmp_path / "pair"
    folder.mkdir()
    info = {"base": str(base_dir), "max_reasoner_tokens": 16,
            "fusion": {"fusion_lambda": 1.0, "projection": "zero", "latent_norm": "standardize"}}
    if lora is not None:
        info["lora"] = lora
    info.update(extra)
    (folder / "pair.json").write_text(json.dumps(info))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "deltas.safetensors")
    return folder


@torch.no_grad()
def test_shipped_loader_applies_lora_factors_and_loads_the_fusion(tmp_path):
    """A shipped pair's deltas, in both layouts: by default one shared base with the factors as the generator's
    adapter (the reasoner's adapter zero), with `shared_base=False` two copies with the factors merged
    (W + s * B @ A); the fusion tensors copied either way."""
    from model_helpers import tiny_lm

    from flythinker.shared_base import is_shared_base

    base = tiny_lm(hidden_size=32)
    A, B = torch.randn(4, 32), torch.randn(32, 4)
    key = "generator.model.layers.0.self_attn.q_proj"
    stats = {"latent_proj.weight": torch.randn(32, 32), "latent_mean": torch.randn(32),
             "latent_inv_std": torch.rand(32) + 0.5}
    folder = _shipped_folder(tmp_path, base, {f"{key}.lora_A": A, f"{key}.lora_B": B, **stats}, {"scaling": 2.0})
    q0 = base.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    shared = from_shipped("smollm2-135m-persona-empathy", folder=folder)
    two = from_shipped("smollm2-135m-persona-empathy", folder=folder, shared_base=False)
    assert is_shared_base(shared) and not is_shared_base(two)
    torch.testing.assert_close(two.generator.model.layers[0].self_attn.q_proj.weight, q0.weight + 2.0 * B @ A)
    torch.testing.assert_close(two.reasoner.model.layers[0].self_attn.q_proj.weight, q0.weight)  # as is
    for model in (shared, two):
        torch.testing.assert_close(model.generator.model.layers[0].self_attn.q_proj(x),
                                   q0(x) + 2.0 * x @ A.t() @ B.t(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.reasoner.model.layers[0].self_attn.q_proj(x), q0(x))
        for k, v in stats.items():
            torch.testing.assert_close(model.fusion_state_dict()[k], v)
    # factors without a scaling, or that fit no weight, are refused
    bad = _shipped_folder(tmp_path / "x", base, {f"{key}.lora_A": A, f"{key}.lora_B": B}, None)
    with pytest.raises(ValueError, match="no lora.scaling"):
        from_shipped("smollm2-135m-persona-empathy", folder=bad)
    bad = _shipped_folder(tmp_path / "y", base, {f"{key}.lora_A": torch.randn(4, 7), f"{key}.lora_B": B},
                          {"scaling": 1.0})
    for layout in (True, False):
        with pytest.raises(ValueError, match="do not fit"):
            from_shipped("smollm2-135m-persona-empathy", folder=bad, shared_base=layout)


@torch.no_grad()
def test_shipped_pair_with_a_truncated_reasoner(tmp_path):
    """pair.json's `reasoner_layers: k`: the reasoner is the base's first k layers + final norm (its latents are
    layer k's output through the norm), untouched by the generator's merged LoRA."""
    from model_helpers import random_ids, tiny_lm

    base = tiny_lm(hidden_size=32, num_hidden_layers=3)
    A, B = torch.randn(4, 32), torch.randn(32, 4)
    key = "generator.model.layers.0.self_attn.q_proj"
    stats = {"latent_proj.weight": torch.randn(32, 32), "latent_mean": torch.randn(32),
             "latent_inv_std": torch.rand(32) + 0.5}  # a complete pair: the loader refuses one without them
    folder = _shipped_folder(tmp_path, base, {f"{key}.lora_A": A, f"{key}.lora_B": B, **stats}, {"scaling": 2.0},
                             reasoner_layers=1)
    model = from_shipped("smollm2-135m-persona-empathy", folder=folder)
    assert len(model.reasoner.model.layers) == 1 and len(model.generator.model.layers) == 3
    assert model.config.reasoner.num_hidden_layers == 1
    w0 = base.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(model.generator.model.layers[0].self_attn.q_proj.weight, w0 + 2.0 * B @ A)
    torch.testing.assert_close(model.reasoner.model.layers[0].self_attn.q_proj.weight, w0)
    ids = random_ids(2, 6)
    hs = base.model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(model.reasoner_forward(ids, None, None, None, False), base.model.norm(hs[1]))


def test_boundary_calibration_uses_each_rows_first_fused_latent():
    """positions="boundary": the latent each row's generator receives first (split context: at its last prompt
    position), not the later response positions."""
    model = tiny_pair(fusion_lambda=1.0, projection="zero", latent_norm="standardize")
    batches = _split_batches()
    _, rows = _observed_fused(model, batches)
    info = calibrate_latent_norm(model, batches, positions="boundary")
    assert info["latents"] == rows.shape[0] == 2 * len(batches)
    torch.testing.assert_close(model.latent_mean, rows.mean(0))
    everything = tiny_pair(fusion_lambda=1.0, projection="zero", latent_norm="standardize")
    assert calibrate_latent_norm(everything, batches)["latents"] > info["latents"]
    with pytest.raises(ValueError, match="positions must be"):
        calibrate_latent_norm(model, batches, positions="last")
