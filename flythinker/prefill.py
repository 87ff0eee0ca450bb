"""Overlapped prefill schedules of a FlyThinker pair: the reasoner and the generator on a prompt at the same time.

A prefill is compute-bound, and the generator's position t only needs the reasoner's latent of position t - 1, so
most of the two models' work is independent:

- shared context, every position fused (`fuse_prompt=True`): by chunks, the reasoner on chunk k + 1 while the
  generator consumes chunk k with the latents it already has;
- only the last prompt position fused (split context, or shared with `fuse_prompt=False`): the generator's prompt
  minus its last position runs alongside the reasoner's whole prefill, then the last position with its latent.

Both give the plain (sequential) prefill's logits, latents and caches (tests/test_concurrency.py). The model picks a
schedule in `FlyThinkerModel._prefill_worker`; here only the order of the calls lives, and `StepInputs`, the
normalised inputs of one forward call that the model's paths and these schedules share. A building block of the
model's forward: it imports nothing of the model (`model` below is a `flythinker.modeling.FlyThinkerModel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from flythinker.alignment import split_alignment, split_latents
from flythinker.cache import FlyThinkerCache
from flythinker.workers import ReasonerWorker

FlyThinkerModel = nn.Module  # annotation: a flythinker.modeling.FlyThinkerModel (this module sits below it)


@dataclass
class StepInputs:
    """One forward call's inputs, normalised by `FlyThinkerModel._normalise`."""

    input_ids: torch.Tensor  # [B, T] the new tokens
    attention_mask: torch.Tensor | None  # [B, past + T] (2-D) or None (no padding)
    local_mask: torch.Tensor  # [B, T] the new tokens' part of the mask
    position_ids: torch.Tensor  # [B, T]
    cache: FlyThinkerCache | None  # None: use_cache=False
    past: int  # tokens already in the cache
    gen_kwargs: dict[str, Any]  # output_attentions / output_hidden_states for the generator
    inputs_embeds: torch.Tensor | None = None  # [B, T, H_g] the generator's given embeddings (latents added)
    continues: torch.Tensor | None = None  # [B, T] bool: position t continues t-1's sequence (None: all do)
    fusion_lambda: float | None = None  # this call's lambda (None: config.fusion_lambda)
    parallel: str | None = None  # this call's overlap mode (None: config.parallel)

    @property
    def prefill(self) -> bool:
        return self.past == 0

    @property
    def use_cache(self) -> bool:
        return self.cache is not None


def chunk_bounds(T: int, n_chunks: int) -> list[tuple[int, int]]:
    """`n_chunks` near-equal [a, b) spans covering 0..T (fewer when T is small)."""
    n = max(1, min(n_chunks, T))
    edges = [round(i * T / n) for i in range(n + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def cat_outputs(outs: list[BaseModelOutputWithPast]) -> BaseModelOutputWithPast:
    """Concatenate chunk outputs of the generator's base model along time (last_hidden_state [B, T, H_g])."""
    if len(outs) == 1:
        return outs[0]
    hidden = torch.cat([o.last_hidden_state for o in outs], dim=1)
    return BaseModelOutputWithPast(last_hidden_state=hidden, cache=getattr(outs[-1], "cache", None))


def _generator_span(model: FlyThinkerModel, step: StepInputs, a: int, b: int,
                    embeds: torch.Tensor) -> BaseModelOutputWithPast:
    """The generator on prompt positions [a, b) (embeds `[B, b - a, H_g]`), attending to positions < b."""
    mask = None if step.attention_mask is None else step.attention_mask[:, :b]
    return model.generator_forward(embeds, mask, step.position_ids[:, a:b], step.cache, True)


def shared_prefill(model: FlyThinkerModel, worker: ReasonerWorker, step: StepInputs,
                   src_mask: torch.Tensor, n_chunks: int = 4) -> tuple[torch.Tensor, BaseModelOutputWithPast]:
    """Shared-context prefill on an empty cache. `src_mask [B, T]`: which reasoner slots are fused (slot t into
    position t + 1). Returns `(h [B, T, H_r], generator output)`."""
    ids = step.input_ids  # [B, T]
    T = ids.shape[1]

    def reasoner_span(a: int, b: int) -> torch.Tensor:  # [B, b - a, H_r]
        mask = None if step.attention_mask is None else step.attention_mask[:, :b]
        return model.reasoner_forward(ids[:, a:b], mask, step.position_ids[:, a:b], step.cache, True)

    def fused_span(a: int, b: int, h: torch.Tensor) -> torch.Tensor:  # [B, b - a, H_g]; h covers positions < b
        prev = None if a == 0 else h[:, a - 1] * src_mask[:, a - 1, None].to(h.dtype)
        return model.fuse(ids[:, a:b], h[:, a:b], src_mask[:, a:b], prev, lam=step.fusion_lambda)

    early = src_mask[:, : max(T - 2, 0)]
    if not bool(early.any()):  # only the last position is fused
        g0, h = worker.run_pair(lambda: _generator_span(model, step, 0, T - 1, model.embed(ids[:, : T - 1])),
                                lambda: reasoner_span(0, T))
        g1 = _generator_span(model, step, T - 1, T, fused_span(0, T, h)[:, -1:])
        return h, cat_outputs([g0, g1])

    bounds = chunk_bounds(T, n_chunks)
    hs = [reasoner_span(*bounds[0])]  # nothing to overlap with yet: the caller's full thread count
    outs = []
    for k, (a, b) in enumerate(bounds):
        h = torch.cat(hs, dim=1) if len(hs) > 1 else hs[0]
        emb = fused_span(a, b, h)  # reasoner chunks 0..k are done
        if k + 1 < len(bounds):
            g, h_next = worker.run_pair(lambda emb=emb, a=a, b=b: _generator_span(model, step, a, b, emb),
                                        lambda k=k: reasoner_span(*bounds[k + 1]))
            hs.append(h_next)
        else:
            g = _generator_span(model, step, a, b, emb)
        outs.append(g)
    return torch.cat(hs, dim=1), cat_outputs(outs)


def split_prefill(model: FlyThinkerModel, worker: ReasonerWorker, step: StepInputs, r_ids: torch.Tensor,
                  r_mask: torch.Tensor, r_pos: torch.Tensor) -> tuple[torch.Tensor, BaseModelOutputWithPast]:
    """Split-context prefill for generation (only the generator's last prompt position is fused, docs/design.md).
    Needs `step.local_mask[:, -1]` all ones (left padding). r_ids / r_mask / r_pos: the reasoner's prompt
    `[B, Q]`. Returns `(h [B, Q, H_r], generator output)`."""
    ids = step.input_ids  # [B, T]
    B, T = ids.shape
    g0, h = worker.run_pair(lambda: _generator_span(model, step, 0, T - 1, model.embed(ids[:, : T - 1])),
                            lambda: model.reasoner_prompt_forward(r_ids, r_mask, r_pos, step.cache, True))
    n_fused = torch.ones(B, dtype=torch.long, device=ids.device)
    latent, lmask, prev = split_latents(h, *split_alignment(step.local_mask, r_mask, n_fused))
    g1 = _generator_span(model, step, T - 1, T, model.fuse(ids, latent, lmask, prev, lam=step.fusion_lambda)[:, -1:])
    return h, cat_outputs([g0, g1])


__all__ = ["StepInputs", "cat_outputs", "chunk_bounds", "shared_prefill", "split_prefill"]
