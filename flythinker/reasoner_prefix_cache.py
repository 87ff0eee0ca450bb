"""Reasoner prefix caching for returning users (split context, `generate`).

A returning user's reasoner view is last time's view, plus the reply the reasoner already read while it was being
generated, plus the new message. The reasoner's KV entries and latents at positions 0..m-1 are a function of tokens
0..m-1 only (causal attention, positions counted from 0), so a prefill that starts with the same m tokens as an
earlier one may copy those KV entries and latents instead of recomputing them, and compute only the rest.

`ReasonerPrefixCache` holds such prefills keyed by their exact token ids:

- `lookup(ids)` finds the stored entry sharing the longest common token prefix with `ids` and returns it with the
  number of tokens `m` that may be reused (at most `len(ids) - 1`: the last position is always computed, so the
  pending latent always comes from this call's forward). Entries never match beyond their first differing token:
  a prefix that differs in one token reuses only the tokens before it;
- `store(ids, keys, values, latents)` adds one (an entry whose ids are a prefix of the new one is dropped: the new
  one covers it; nothing is added when a stored entry already covers the new ids), then evicts
  least-recently-used entries until the byte budget holds. An entry larger than the whole budget is not stored;
- entries hold batch-1 tensors: `keys[i], values[i]` `[kv_heads, L, head_dim]` per reasoner layer, `latents`
  `[L, H_r]` (the reasoner's final-norm outputs).

Where it is used (`FlyThinkerForCausalLM.reasoner_prefix_cache`, set with `enable_reasoner_prefix_cache`):
the split-context prefill of a batch of one unpadded reasoner view (transformers' `generate` loop and the lean
static-cache loop both go through it), and at the end of the lean loop, which extends the entry with the reply
tokens the reasoner read. Batches of several rows, padded reasoner views, sliding-window reasoner layers, training
and shared context bypass it (the prefill then runs as without a cache).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from flythinker.cache import FlyThinkerCache

FlyThinkerForCausalLM = nn.Module  # annotation: a flythinker.modeling model (this module sits below it)

DEFAULT_MAX_BYTES = 512 * 2**20


@dataclass
class PrefixEntry:
    """One stored reasoner prefill of `L` tokens (batch 1)."""

    ids: torch.Tensor  # [L] long, on the CPU
    keys: list[torch.Tensor]  # per layer [kv_heads, L, head_dim]
    values: list[torch.Tensor]  # per layer [kv_heads, L, head_dim]
    latents: torch.Tensor  # [L, H_r]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        L = self.ids.numel()
        if self.latents.shape[0] != L or any(t.shape[1] != L for t in (*self.keys, *self.values)):
            raise ValueError(f"a prefix entry's KV and latents must cover its {L} tokens")
        tensors = (self.ids, self.latents, *self.keys, *self.values)
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class PrefixStats:
    """Counters since the cache was made (or cleared)."""

    hits: int = 0  # prefills that reused at least one token
    misses: int = 0  # prefills that reused none
    reused_tokens: int = 0  # tokens copied instead of computed
    computed_tokens: int = 0  # reasoner prompt tokens computed by prefills that looked the cache up
    evictions: int = 0
    too_big: int = 0  # entries over the whole budget (not stored)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D id tensors."""
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return n if diff.numel() == 0 else int(diff[0, 0])


class ReasonerPrefixCache:
    """LRU cache of reasoner prefills keyed by exact token prefixes, bounded by a byte budget.

    Args:
        max_bytes: the budget for all entries' tensors (KV of every reasoner layer, latents, ids). SmolLM2-135M
            as reasoner (30 layers, 3 KV heads of 64, fp32): 46 KB of KV per token, so 512 MiB hold ~11k tokens.
        min_reuse: reuse a stored prefix only when at least this many tokens match (shorter ones are recomputed:
            copying a few tokens' KV saves nothing).
    Thread-safe (one lock around the entries).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, min_reuse: int = 1) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if isinstance(min_reuse, bool) or not isinstance(min_reuse, int) or min_reuse < 1:
            raise ValueError(f"min_reuse must be an int >= 1, got {min_reuse!r}")
        self.max_bytes = max_bytes
        self.min_reuse = min_reuse
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # oldest use first
        self._next_key = 0
        self._lock = threading.Lock()
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by all entries."""
        return sum(e.nbytes for e in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.stats = PrefixStats()

    def lookup(self, ids: torch.Tensor) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest token prefix with `ids [Q]` and how many tokens of it to reuse
        (`min(common prefix, Q - 1)`; (None, 0) below `min_reuse`). Marks the entry as recently used."""
        ids = ids.detach().reshape(-1).cpu()
        with self._lock:
            best, best_m = None, 0
            for key, entry in self._entries.items():
                m = common_prefix(entry.ids, ids)
                if m > best_m:
                    best, best_m = key, m
            m = min(best_m, ids.numel() - 1)
            if best is None or m < self.min_reuse:
                return None, 0
            self._entries.move_to_end(best)
            return self._entries[best], m

    def store(self, ids: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
              latents: torch.Tensor) -> bool:
        """Add a prefill of `ids [L]` (tensors as in `PrefixEntry`, copied). Returns whether it was stored."""
        entry = PrefixEntry(ids.detach().reshape(-1).cpu().clone(), [k.detach().clone() for k in keys],
                            [v.detach().clone() for v in values], latents.detach().clone())
        with self._lock:
            if entry.nbytes > self.max_bytes:
                self.stats.too_big += 1
                return False
            L = entry.ids.numel()
            for key, e in self._entries.items():  # an entry that already covers these tokens: keep it
                if e.ids.numel() >= L and common_prefix(e.ids, entry.ids) == L:
                    self._entries.move_to_end(key)
                    return True
            for key in [k for k, e in self._entries.items()  # covered by the new entry
                        if e.ids.numel() <= entry.ids.numel() and common_prefix(e.ids, entry.ids) == e.ids.numel()]:
                del self._entries[key]
            self._entries[self._next_key] = entry
            self._next_key += 1
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                total -= old.nbytes
                self.stats.evictions += 1
            return True


# ---------------------------------------------------------------------------------------------- model-side helpers
def usable(model: FlyThinkerForCausalLM, r_mask: torch.Tensor, cache: FlyThinkerCache | None) -> bool:
    """Whether a split prefill of reasoner mask `r_mask [B, Q]` into `cache` may use the model's prefix cache."""
    return (getattr(model, "reasoner_prefix_cache", None) is not None and cache is not None
            and r_mask.shape[0] == 1 and bool(r_mask.all()) and not any(cache.reasoner.is_sliding)
            and not (model.training and torch.is_grad_enabled()))


def _layer_kv(cache_layers, rows: slice, span: slice) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer `keys/values[rows, :, span]` of a KV cache's layers, squeezed to `[kv_heads, L, head_dim]`."""
    keys = [layer.keys[rows, :, span][0] for layer in cache_layers]
    values = [layer.values[rows, :, span][0] for layer in cache_layers]
    return keys, values


def cached_reasoner_prefill(model: FlyThinkerForCausalLM, r_ids: torch.Tensor, r_mask: torch.Tensor,
                            r_pos: torch.Tensor, cache: FlyThinkerCache) -> torch.Tensor:
    """The reasoner's prompt latents `[1, Q, H_r]` for `r_ids [1, Q]` (unpadded), reusing the longest stored
    prefix: its KV entries are appended to the (empty) reasoner cache, only the rest of the prompt runs, and the
    new prefill is stored. Equal (token for token) to `model.reasoner_forward` on the whole prompt."""
    pc = model.reasoner_prefix_cache
    entry, m = pc.lookup(r_ids[0])
    Q = r_ids.shape[1]
    if entry is not None:
        for layer, k, v in zip(cache.reasoner.layers, entry.keys, entry.values, strict=True):
            layer.update(k[None, :, :m], v[None, :, :m])
    h_new = model.reasoner_forward(r_ids[:, m:], r_mask, r_pos[:, m:], cache, True)  # [1, Q - m, H_r]
    h = h_new if entry is None else torch.cat([entry.latents[None, :m].to(h_new), h_new], dim=1)
    with pc._lock:
        pc.stats.hits += entry is not None
        pc.stats.misses += entry is None
        pc.stats.reused_tokens += m
        pc.stats.computed_tokens += Q - m
    keys, values = _layer_kv(cache.reasoner.layers, slice(0, 1), slice(0, Q))
    pc.store(r_ids[0], keys, values, h[0])
    return h


def store_reply(model: FlyThinkerForCausalLM, r_ids: torch.Tensor, reply: torch.Tensor,
                reply_latents: list[torch.Tensor], cache_layers, rows: slice, start: int) -> bool:
    """After a lean-loop reply: store the reasoner's view `r_ids [1, Q]` followed by the `reply [n]` tokens it
    read, extending the view's entry (its latents) with `reply_latents` (n tensors `[1, H_r]`). `cache_layers`:
    the reasoner's KV layers, row slice `rows`, view starting at slot `start`. Returns whether it was stored
    (False when the view's entry is gone or the cache is off)."""
    pc = getattr(model, "reasoner_prefix_cache", None)
    if pc is None or not reply_latents:
        return False
    entry, m = pc.lookup(torch.cat([r_ids[0], reply[:1]]))
    Q, n = r_ids.shape[1], reply.numel()
    if entry is None or m != Q or entry.ids.numel() < Q:  # the view's own entry was evicted (or replaced)
        return False
    ids = torch.cat([r_ids[0].cpu(), reply.cpu()])
    keys, values = _layer_kv(cache_layers, rows, slice(start, start + Q + n))
    latents = torch.cat([entry.latents[:Q], torch.cat(reply_latents).to(entry.latents)])
    return pc.store(ids, keys, values, latents)


__all__ = ["DEFAULT_MAX_BYTES", "PrefixEntry", "PrefixStats", "ReasonerPrefixCache", "cached_reasoner_prefill",
           "common_prefix", "store_reply", "usable"]
