"""Whitened gradient steps for a pair's learned projection: train `P'` in `P = P' @ M`, then fold.

Why: the gradient of a linear projection is a sum of outer products with its inputs, so its first steps learn the
direction in which the *class means* of the inputs differ (the nearest-centroid rule), and only slowly the
directions along which the inputs vary little. On SmolLM2 the reasoner's standardised boundary latent carries the
persona-empathy strategy along such a direction: an L2 logistic probe reads it at 97.5% on held-out users, the
nearest-centroid rule much lower (benchmarks/results/latent_probe_smollm2.json). Standardising each channel
(`latent_norm="standardize"`) equalises the channels' scales, not their correlations; Adam's per-weight steps do
not either. Training `P'` with a fixed `M = (C + s I)^(-1/2)`, C the second moment of the projection's inputs,
makes the same gradient steps see whitened inputs (the rule becomes linear discriminant analysis).

    P = P' @ M          P' [H_g, H_r] trained (zero-initialised: the pair still starts at its generator),
                        M  [H_r, H_r] fixed, from `projection_inputs` of calibration latents

It is a training-time reparametrisation only (torch.nn.utils.parametrize): :func:`fold_projection` leaves a plain
`latent_proj.weight = P' @ M`, so inference, saving, serving and shipped pairs see an ordinary projection.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from flythinker.kernels.latent_fuse_naive import vocab_mean_norm
from flythinker.latent_norm import standardize_latent


def projection_inputs(model: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """What the pair's projection multiplies for raw reasoner latents `[N, H_r]` (e.g. from
    :func:`flythinker.latent_norm.capture_latents`): standardised (with `latent_norm="standardize"`), then rescaled
    to the norm target, as the fusion computes them (kernels/latent_fuse_naive.py). Returns `[N, H_r]` fp32."""
    cfg = model.config
    h = latents.float()
    if cfg.latent_norm == "standardize":
        h = standardize_latent(h, model.latent_mean.float().cpu(), model.latent_inv_std.float().cpu())
    if cfg.norm_target == "vocab_mean":
        c = vocab_mean_norm(model.generator.get_input_embeddings().weight).cpu()
    elif isinstance(cfg.norm_target, (int, float)):
        c = torch.tensor(float(cfg.norm_target))
    else:
        raise ValueError(f"projection_inputs supports norm_target 'vocab_mean' or a number, got {cfg.norm_target!r}")
    return h * (c / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(float(cfg.latent_eps)))


def whitening_matrix(x: torch.Tensor, shrink: float = 0.1) -> torch.Tensor:
    """`(C / mean_eig(C) + shrink * I)^(-1/2)` for the second moment `C = x^T x / N` of rows x `[N, H]`: `[H, H]`,
    symmetric, fp32. Relative to the mean eigenvalue, so that an average direction keeps its scale (the learning
    rate means what it meant without whitening; unnormalised, a fusion-only run on SmolLM2 diverged:
    docs/results.md, "Measurements behind design choices"). The ridge keeps M
    finite when N < H and bounds the amplification of a rare direction by `shrink ** -0.5`."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"whitening_matrix needs rows [N >= 2, H], got {tuple(x.shape)}")
    if not shrink > 0:
        raise ValueError(f"shrink must be > 0, got {shrink}")
    evals, evecs = torch.linalg.eigh((x.T @ x / x.shape[0]).double())
    evals = evals.clamp_min(0)
    evals = evals / evals.mean().clamp_min(torch.finfo(torch.float64).tiny)
    return (evecs @ torch.diag((evals + shrink).rsqrt()) @ evecs.T).float()


class _RightMultiply(nn.Module):
    """The parametrisation `P = P' @ M` (M a fixed buffer)."""

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("m", m)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w @ self.m.to(w)


def whiten_projection(model: nn.Module, inputs: torch.Tensor, shrink: float = 0.1) -> torch.Tensor:
    """Reparametrise `model.latent_proj.weight` as `P' @ M`, M = `whitening_matrix(inputs, shrink)` (inputs: the
    projection's inputs `[N, H_r]`, see :func:`projection_inputs`). The projection must be all zero (an untrained
    `projection="zero"` pair); `P'` starts at zero, so the pair still computes what its generator computes. Train
    as usual (`P'` is `latent_proj.parametrizations.weight.original`, a fusion parameter), then call
    :func:`fold_projection`. Returns M."""
    proj = getattr(model, "latent_proj", None)
    if proj is None:
        raise ValueError("whiten_projection needs a pair with a learned projection (projection='zero' or 'linear')")
    if parametrize.is_parametrized(proj, "weight"):
        raise ValueError("latent_proj.weight is already reparametrised: fold_projection first")
    if bool(proj.weight.detach().ne(0).any()):
        raise ValueError("whiten_projection starts from a zero projection (P' = 0); this one is trained already")
    if inputs.shape[-1] != proj.weight.shape[1]:
        raise ValueError(f"inputs have {inputs.shape[-1]} channels, the projection takes {proj.weight.shape[1]}")
    m = whitening_matrix(inputs, shrink).to(proj.weight)
    parametrize.register_parametrization(proj, "weight", _RightMultiply(m), unsafe=True)
    return m


def fold_projection(model: nn.Module) -> None:
    """Replace the `P' @ M` reparametrisation by the plain weight it computes (no-op when there is none)."""
    proj = getattr(model, "latent_proj", None)
    if proj is not None and parametrize.is_parametrized(proj, "weight"):
        parametrize.remove_parametrizations(proj, "weight", leave_parametrized=True)


__all__ = ["fold_projection", "projection_inputs", "whiten_projection", "whitening_matrix"]
