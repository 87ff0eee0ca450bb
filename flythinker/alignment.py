"""Which generator position receives which reasoner latent (docs/design.md), with padding on both sides.

Conventions shared with `flythinker.kernels.latent_fuse`: a latent tensor `latent [B, T, H_r]` holds at slot t the
latent fused into generator position t + 1, `mask [B, T]` says whether slot t is fused at all, and `prev [B, H_r]`
is the latent fused into position 0 (a zero row disables it).

Shared context: generator position s receives the reasoner latent of position s - 1 (same tokens, same mask).
Split context: the two prompts are aligned at the response boundary: with the generator's prompt of length P and the
reasoner's of length Q, generator position P-1+k receives reasoner position Q-2+k (k >= 0). We locate the boundary
from the end of each row (the last real token, from the attention masks) and a per-row count `n_fused` of fused
generator positions: generator position e_g - j receives reasoner position e_r - 1 - j for 0 <= j < n_fused, where
e_g, e_r are the last real positions. That is exactly the rule above when both rows end at the same response token
(left padding at prefill: n_fused = 1; training: n_fused = response length + 1, from the labels).
"""

from __future__ import annotations

import torch

from flythinker.configuration import IGNORE_INDEX


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids `[B, L]` from a 2-D attention mask `[B, L]` (pads get 0), as HF generate builds them."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Index `[B]` of the last non-pad position of each row of `mask [B, L]` (-1 for an all-pad row)."""
    L = mask.shape[1]
    idx = torch.arange(L, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.full_like(idx, -1)).amax(dim=1)


def response_start(labels: torch.Tensor) -> torch.Tensor:
    """Index `[B]` of the first labelled position (label != IGNORE_INDEX) of each row; T for a row without labels."""
    T = labels.shape[1]
    idx = torch.arange(T, device=labels.device).expand_as(labels)
    return torch.where(labels != IGNORE_INDEX, idx, torch.full_like(idx, T)).amin(dim=1)


def response_targets(labels: torch.Tensor) -> torch.Tensor:
    """Generator positions `[B, T]` (bool) on the response side: the position predicting the first labelled token
    and every later one (fuse_prompt=False in shared context)."""
    T = labels.shape[1]
    start = (response_start(labels) - 1).clamp_min(0)  # [B]
    return torch.arange(T, device=labels.device)[None, :] >= start[:, None]


def shared_source_mask(mask: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Shared context: slot t (latent h_t) is fused into t + 1 iff token t is real and position t + 1 is a target.

    mask: `[B, T]` attention mask of the chunk; targets: `[B, T]` bool (None: every position). Returns `[B, T]`.
    The last slot keeps `mask[:, -1]`: it is the pending latent for the next chunk.
    """
    m = mask.bool()
    if targets is None:
        return m
    nxt = torch.cat([targets[:, 1:], torch.ones_like(targets[:, :1])], dim=1)
    return m & nxt


def split_alignment(gen_mask: torch.Tensor, rsn_mask: torch.Tensor, n_fused: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each generator position, the reasoner position whose latent it receives.

    gen_mask: `[B, T_g]`, rsn_mask: `[B, T_r]` (1 = real token), n_fused: `[B]` fused generator positions per row,
    counted back from the last real one. Returns `(index [B, T_g] long, valid [B, T_g] bool)`; index is 0 where not
    valid. A position is valid if it is one of the n_fused last real generator positions and its reasoner source is a
    real reasoner token.
    """
    B, T_g = gen_mask.shape
    dev = gen_mask.device
    e_g = last_real_index(gen_mask)[:, None]  # [B, 1]
    e_r = last_real_index(rsn_mask.to(dev))[:, None]
    s = torch.arange(T_g, device=dev)[None, :]  # [1, T_g]
    j = e_g - s  # distance back from the last real generator position
    r = e_r - 1 - j  # reasoner source position
    valid = (j >= 0) & (j < n_fused.to(dev)[:, None]) & (r >= 0) & gen_mask.bool()
    r = r.clamp(0, rsn_mask.shape[1] - 1)
    valid &= torch.gather(rsn_mask.to(dev).bool(), 1, r)
    return torch.where(valid, r, torch.zeros_like(r)), valid


def split_latents(h: torch.Tensor, index: torch.Tensor, valid: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather reasoner latents into latent_fuse's layout.

    h: `[B, T_r, H_r]` reasoner hidden states; index/valid: `[B, T_g]` from `split_alignment`.
    Returns `(latent [B, T_g, H_r], mask [B, T_g], prev [B, H_r])`: slot t carries what position t + 1 receives.
    """
    B, T_g = index.shape
    g = torch.gather(h, 1, index[..., None].expand(B, T_g, h.shape[-1]))  # [B, T_g, H_r]: received by position s
    latent = torch.cat([g[:, 1:], g.new_zeros(B, 1, h.shape[-1])], dim=1)
    mask = torch.cat([valid[:, 1:], valid.new_zeros(B, 1)], dim=1)
    prev = g[:, 0] * valid[:, :1].to(g.dtype)
    return latent, mask, prev


__all__ = ["positions_from_mask", "last_real_index", "response_start", "response_targets", "shared_source_mask",
           "split_alignment", "split_latents"]
