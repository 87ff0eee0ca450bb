"""Whitened projection training (flythinker.training.whitened_projection) and latent capture: the matrix whitens,
`projection_inputs` is exactly what the fusion multiplies, the reparametrised pair starts at its generator, trains
through train_loop's fusion group, folds to the weight it computed, and bad uses are refused."""

import pytest
import torch
from model_helpers import random_ids, single_thread, tiny_lm  # noqa: F401

from flythinker import FlyThinkerForCausalLM
from flythinker.latent_norm import calibrate_latent_norm, capture_latents
from flythinker.training import FlyThinkerCollator, train_loop
from flythinker.training.loop import param_groups
from flythinker.training.toy import char_tokenizer, secret_task
from flythinker.training.whitened_projection import (
    fold_projection,
    projection_inputs,
    whiten_projection,
    whitening_matrix,
)

TOK = char_tokenizer()
COLLATE = FlyThinkerCollator(tokenizer=TOK)


def pair(**fusion):
    g = tiny_lm(hidden_size=32, vocab_size=256, seed=1)
    r = tiny_lm(hidden_size=32, vocab_size=256, seed=2)
    fusion = {"fusion_lambda": 1.0, "projection": "zero", "latent_norm": "standardize", **fusion}
    return FlyThinkerForCausalLM.from_pair(g, r, **fusion)


def test_whitening_matrix_whitens_and_refuses_bad_input():
    torch.manual_seed(0)
    x = torch.randn(400, 8) @ torch.randn(8, 8)
    m = whitening_matrix(x, shrink=1e-6)
    c = x.T @ x / 400
    scale = torch.linalg.eigvalsh(c).mean()  # relative to the mean eigenvalue: an average direction keeps its scale
    torch.testing.assert_close((x @ m).T @ (x @ m) / 400, scale * torch.eye(8), atol=1e-3 * scale, rtol=0)
    torch.testing.assert_close(whitening_matrix(x * 10, 1e-6), m, rtol=1e-3, atol=1e-3)  # scale-free
    torch.testing.assert_close(m, m.T)
    ridge = whitening_matrix(x, shrink=1.0)  # a ridge shrinks the amplification of the weakest direction
    assert torch.linalg.matrix_norm(ridge, 2) < torch.linalg.matrix_norm(m, 2)
    with pytest.raises(ValueError, match="rows"):
        whitening_matrix(torch.randn(1, 8))
    with pytest.raises(ValueError, match="shrink"):
        whitening_matrix(x, shrink=0.0)


@torch.no_grad()
def test_projection_inputs_are_what_the_fusion_multiplies():
    model = pair().eval()
    batches = [COLLATE(secret_task(4, seed=s)) for s in range(2)]
    calibrate_latent_norm(model, batches, positions="fused")
    h = torch.randn(3, 5, 32) * 4 + 1
    ids = random_ids(3, 5, vocab_size=256)
    model.latent_proj.weight.copy_(torch.eye(32))  # identity: the fused term is the projection's input itself
    fused = model.fuse(ids, h, None, None) - model.embed(ids)  # [3, 5, 32]: slot t lands at position t + 1
    torch.testing.assert_close(fused[:, 1:], projection_inputs(model, h[:, :-1].reshape(-1, 32)).reshape(3, 4, 32),
                               rtol=1e-5, atol=1e-5)


def test_capture_returns_the_latents_calibration_sees():
    model = pair()
    batches = [COLLATE(secret_task(4, seed=s)) for s in (3, 4)]
    rows = capture_latents(model, batches, positions="boundary")
    assert rows.shape == (8, 32)  # one boundary latent per row of a split batch
    calibrate_latent_norm(model, batches, positions="boundary")
    torch.testing.assert_close(model.latent_mean, rows.mean(0), rtol=1e-5, atol=1e-5)
    assert capture_latents(model, batches, positions="fused").shape[0] > 8  # every fused position
    with pytest.raises(ValueError, match="positions"):
        capture_latents(model, batches, positions="all")


def test_whitened_training_starts_at_the_generator_and_folds_exactly(single_thread):  # noqa: F811
    model = pair()
    batches = [COLLATE(secret_task(8, seed=s)) for s in range(3)]
    calibrate_latent_norm(model, batches, positions="boundary")
    inputs = projection_inputs(model, capture_latents(model, batches, positions="fused"))
    m = whiten_projection(model, inputs, shrink=0.1)
    probe = COLLATE(secret_task(4, seed=9))
    model.eval()
    with torch.no_grad():
        alone = model.generator(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        start = model(**{k: v for k, v in probe.items() if k != "labels"}, use_cache=False).logits
    torch.testing.assert_close(start, alone)  # P' = 0: exactly the generator
    groups = {g["part"]: g for g in param_groups(model, 1e-3, fusion_lr=5e-2)}
    original = model.latent_proj.parametrizations.weight.original
    assert [id(p) for p in groups["projection"]["params"]] == [id(original)] and groups["projection"]["lr"] == 5e-2
    train_loop(model, secret_task(32), COLLATE, steps=6, batch_size=8, lr=1e-3, fusion_lr=5e-2)
    assert original.abs().max() > 0
    with torch.no_grad():
        want = original @ m
        before = model(**{k: v for k, v in probe.items() if k != "labels"}, use_cache=False).logits
    fold_projection(model)
    assert isinstance(model.latent_proj.weight, torch.nn.Parameter) and "model.latent_proj.weight" in model.state_dict()
    torch.testing.assert_close(model.latent_proj.weight, want)
    with torch.no_grad():
        after = model(**{k: v for k, v in probe.items() if k != "labels"}, use_cache=False).logits
    torch.testing.assert_close(after, before)
    fold_projection(model)  # nothing to fold: a no-op


def test_bad_uses_are_refused():
    model = pair()
    x = torch.randn(20, 32)
    with pytest.raises(ValueError, match="channels"):
        whiten_projection(model, torch.randn(20, 16))
    whiten_projection(model, x)
    with pytest.raises(ValueError, match="already reparametrised"):
        whiten_projection(model, x)
    trained = pair()
    with torch.no_grad():
        trained.latent_proj.weight.fill_(0.1)
    with pytest.raises(ValueError, match="zero projection"):
        whiten_projection(trained, x)
    with pytest.raises(ValueError, match="learned projection"):
        whiten_projection(pair(projection="pad", latent_norm="none"), x)
