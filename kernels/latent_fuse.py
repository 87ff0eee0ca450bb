"""Fused embedding gather + latent fusion (placeholder dispatcher: the Triton and C++ paths land next)."""

from __future__ import annotations

import torch

from .latent_fuse_naive import latent_fuse_naive


def latent_fuse(input_ids, weight, latent, mask=None, *, lam, norm_target="vocab_mean", projection=None,
                prev_latent=None, eps=1e-6, detach_norm=True) -> torch.Tensor:
    return latent_fuse_naive(input_ids, weight, latent, mask, lam=lam, norm_target=norm_target,
                             projection=projection, prev_latent=prev_latent, eps=eps, detach_norm=detach_norm)
