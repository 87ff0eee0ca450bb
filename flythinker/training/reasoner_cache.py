"""Reuse a frozen reasoner's latents across training steps that read the same batch.

Why: when only the generator side trains (the fusion alone, or the generator's LoRA too) the reasoner is a fixed
function of its inputs, yet every step runs it again. On the SmolLM2-135M split pair its forward is about half of a
fusion-only step (docs/results.md, "Measurements behind design choices"), so a
second epoch over the same batches (train_loop cycles one seeded permutation: epoch k repeats epoch 1's batches)
or a second variant trained on them costs about half as much.

    with cached_reasoner_latents(model) as cache:
        train_loop(model, ...)          # each distinct reasoner batch runs once; repeats read `cache`

Keys are the reasoner's exact inputs (ids, mask and positions, by content), so a hit returns what the forward
would compute for that batch. Refused where that is not true: a reasoner parameter that trains, a reasoner in
training mode with active dropout, or a call that reads or writes a KV cache (decoding).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ReasonerLatentCache:
    """The latents `[B, T, H_r]` of each distinct reasoner batch seen, by input content; hit / miss counts;
    `reasoner`: a digest of the reasoner's parameters, set on first use (a store is refused for another one)."""

    entries: dict[str, torch.Tensor] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    reasoner: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.entries.values())


def _key(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha1()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().to("cpu", torch.int64).contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def reasoner_digest(reasoner: nn.Module) -> str:
    """A digest of every parameter and buffer of `reasoner` (names, shapes, values): equal digests, equal latents.
    One pass over the weights (SmolLM2-135M: 0.5 GB of fp32)."""
    h = hashlib.sha1()
    for name, t in [*reasoner.named_parameters(), *reasoner.named_buffers()]:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def frozen_reasoner_problem(reasoner: nn.Module, training: bool | None = None) -> str | None:
    """Why the latents of `reasoner` are not a fixed function of its inputs (None: they are): a parameter that
    trains, or active dropout (a dropout module with p > 0 or attention dropout) while it is in training mode.
    `training`: judge as if in that mode (None: its current mode)."""
    trained = [n for n, p in reasoner.named_parameters() if p.requires_grad]
    if trained:
        return f"not a frozen reasoner; these parameters train: {trained[:3]}"
    dropout = [n for n, m in reasoner.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    attn_dropout = float(getattr(getattr(reasoner, "config", None), "attention_dropout", 0.0) or 0.0)
    if (reasoner.training if training is None else training) and (dropout or attn_dropout > 0):
        return ("the reasoner runs in training mode with dropout (its latents are random); call "
                "model.reasoner.eval() or set its dropout to 0")
    return None


def _check_frozen(reasoner: nn.Module) -> None:
    problem = frozen_reasoner_problem(reasoner)
    if problem:
        raise ValueError(f"cached_reasoner_latents: {problem}")


@contextmanager
def cached_reasoner_latents(model: nn.Module, store: ReasonerLatentCache | None = None
                            ) -> Iterator[ReasonerLatentCache]:
    """While active, `model.reasoner_forward` (a FlyThinkerForCausalLM's) runs the reasoner once per distinct
    input batch and returns a copy of the stored latents `[B, T, H_r]` on a repeat. The reasoner must be frozen
    (module docstring); calls with a KV cache or use_cache run the reasoner as usual (decoding is not cached).
    `store`: one from an earlier use, to share its latents with another model whose reasoner has the very same
    weights (refused otherwise, by `reasoner_digest`)."""
    _check_frozen(model.reasoner)
    store = store if store is not None else ReasonerLatentCache()
    digest = reasoner_digest(model.reasoner)
    if store.reasoner is not None and store.reasoner != digest:
        raise ValueError("cached_reasoner_latents: this store holds another reasoner's latents (its weights differ)")
    store.reasoner = digest
    fused = model.get_decoder()  # the fused pair (FlyThinkerModel), whose forward calls reasoner_forward
    inner = fused.reasoner_forward

    def reasoner_forward(input_ids, attention_mask, position_ids, cache, use_cache):
        if cache is not None or use_cache:
            return inner(input_ids, attention_mask, position_ids, cache, use_cache)
        key = _key(input_ids, attention_mask, position_ids)
        hit = store.entries.get(key)
        if hit is not None:
            store.hits += 1
            return hit.clone()
        _check_frozen(model.reasoner)  # a parameter unfrozen since entry would make every stored latent stale
        store.misses += 1
        with torch.no_grad():
            out = inner(input_ids, attention_mask, position_ids, cache, use_cache)
        store.entries[key] = out.detach()
        return out.clone()

    fused.reasoner_forward = reasoner_forward  # an instance attribute: shadows the method until removed
    try:
        yield store
    finally:
        del fused.reasoner_forward


__all__ = ["ReasonerLatentCache", "cached_reasoner_latents", "frozen_reasoner_problem", "reasoner_digest"]
