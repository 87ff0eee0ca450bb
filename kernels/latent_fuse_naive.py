"""Plain-PyTorch twin of the fused latent-fusion op: short, obvious, the oracle for tests and the fallback.

    e_t = E[x_t] + lam * m_{t-1} * (c / max(||h_{t-1}||, eps)) * P(h_{t-1})     (docs/design.md, Fusion rule)

`h_{-1}` is `prev_latent` (fused with multiplier 1; zero a row to disable it) or absent (no fusion at t=0).
`mask[b, t]` belongs to the SOURCE latent h_t: it gates whether h_t is fused into position t + 1.
Computes in fp32 (fp64 when any input is fp64, so torch.autograd.gradcheck can run on it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vocab_mean_norm(weight: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm of the rows of `weight` [V, H]: a 0-dim fp32 (fp64 for fp64 tables) constant, no gradient."""
    with torch.no_grad():
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        # dtype= reduces in `acc` without materialising an fp32 copy of a half-precision table
        return torch.linalg.vector_norm(weight.detach(), dim=-1, dtype=acc).mean()


def latent_fuse_naive(
    input_ids: torch.Tensor,  # [B, T] int
    weight: torch.Tensor,  # [V, H_g]
    latent: torch.Tensor,  # [B, T, H_r]: h_t, fused into position t + 1
    mask: torch.Tensor | None = None,  # [B, T]: mask[b, t] = 0 -> latent[b, t] is never fused
    *,
    lam: float,
    norm_target: str | float = "vocab_mean",
    projection: torch.Tensor | None = None,  # [H_g, H_r] for "linear", None for "pad"
    prev_latent: torch.Tensor | None = None,  # [B, H_r]: h_{-1}, fused into position 0
    eps: float = 1e-6,
    detach_norm: bool = True,
) -> torch.Tensor:  # [B, T, H_g] in weight.dtype
    B, T = input_ids.shape
    H_g, H_r = weight.shape[1], latent.shape[-1]
    acc = torch.float64 if torch.float64 in (weight.dtype, latent.dtype) else torch.float32
    emb = weight[input_ids].to(acc)  # [B, T, H_g]
    h = latent.to(acc)
    prev = prev_latent.to(acc)[:, None] if prev_latent is not None else h.new_zeros(B, 1, H_r)
    src = torch.cat([prev, h[:, :-1]], dim=1)  # [B, T, H_r]: h_{t-1} sits at slot t

    m = torch.ones(B, T, device=h.device, dtype=acc) if mask is None else mask.to(acc)
    m_src = torch.cat([m.new_full((B, 1), float(prev_latent is not None)), m[:, :-1]], dim=1)  # [B, T]

    norm = torch.linalg.vector_norm(src, dim=-1, keepdim=True)
    if detach_norm:
        norm = norm.detach()
    if norm_target == "vocab_mean":
        c = vocab_mean_norm(weight)
    elif norm_target == "token":
        c = torch.linalg.vector_norm(emb, dim=-1, keepdim=True)
        if detach_norm:
            c = c.detach()
    else:  # a fixed target (float, or a 0-dim tensor such as a cached vocab mean): a constant
        c = torch.as_tensor(norm_target, dtype=acc, device=h.device).detach()
    scaled = src * (c / norm.clamp_min(eps))  # [B, T, H_r]
    proj = F.pad(scaled, (0, H_g - H_r)) if projection is None else scaled @ projection.to(acc).T
    return (emb + lam * m_src[..., None] * proj).to(weight.dtype)
