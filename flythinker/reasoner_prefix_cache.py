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
from collections.abc import Iterator
from contextlib import contextmanager
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

    def lookup(self, ids: torch.Tensor, keep_last: bool = True) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest token prefix with `ids [Q]` and how many tokens of it to reuse
        (`min(common prefix, Q - 1)`, or the whole common prefix with `keep_last=False`; (None, 0) below
        `min_reuse`). Marks the entry as recently used."""
        ids = ids.detach().reshape(-1).cpu()
        with self._lock:
            best, best_m = None, 0
            for key, entry in self._entries.items():
                m = common_prefix(entry.ids, ids)
                if m > best_m:
                    best, best_m = key, m
            m = min(best_m, ids.numel() - (1 if keep_last else 0))
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


# ------------------------------------------------------------------------------ one batch's shared prompts (GRPO)
@dataclass
class ReuseStats:
    """What `PromptReuse` did since it was made (`clear()` keeps them; `begin()` too)."""

    prompt_tokens: int = 0  # prompt tokens the reasoner computed to fill the store (once per distinct prompt)
    reused_tokens: int = 0  # prompt tokens copied into forwards instead of computed
    rest_tokens: int = 0  # positions the reasoner computed after the reused prompt (completions, padding)
    forwards: int = 0  # reasoner prompt forwards served from the store
    fills: int = 0  # store fills (one per batch and reasoner signature)
    bypassed: dict[str, int] = field(default_factory=dict)  # forwards run as without reuse, by reason


def reuse_signature(model: FlyThinkerForCausalLM) -> tuple:
    """What a reasoner's latents depend on besides its input ids, as far as a store can see it: the reasoner
    object, its parameters' in-place versions, LoRA layers' state (disabled, active, merged adapters: TRL's PEFT
    reference disables them) and autocast on the reasoner's device. A stored prefill is reused only under an
    equal signature."""
    reasoner = model.reasoner
    dev = model.reasoner_device.type
    adapters = tuple((name, bool(getattr(m, "disable_adapters", False)), tuple(getattr(m, "active_adapters", ())),
                      bool(getattr(m, "merged", False)))
                     for name, m in reasoner.named_modules() if hasattr(m, "lora_A"))
    return (id(reasoner), tuple(p._version for p in reasoner.parameters()), adapters,
            torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)


def _left_pad(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    Q = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), Q, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        if r:
            ids[i, Q - len(r):] = torch.as_tensor(r, dtype=torch.long, device=device)
            mask[i, Q - len(r):] = 1
    return ids, mask


class PromptReuse:
    """The reasoner's prefills of one batch's prompts, each computed once, reused by every split-context forward
    that reads one of them: GRPO's G completions of a prompt, in `generate` and in every log-prob forward.

    Exactness: the reasoner is causal and counts positions from each row's first real token, so its KV entries and
    latents at a row's first m real positions are a function of those m tokens only; a forward whose rows start
    (after their left padding) with a stored prompt gets those entries copied (its KV cache filled with them, pads
    as zeros under a zero mask) and runs the reasoner on the rest of each row only (the completion the reasoner
    reads beside the generator), attending to the copied entries. Only the shared prompt part is reused: each
    row's completion is computed, as without reuse. Numbers equal the plain forward's up to floating-point
    rounding of the differently shaped matmuls (the tests compare them).

    Valid only while the reasoner is a fixed function of its inputs; each forward checks, and runs as without
    reuse (counted in `stats.bypassed`) when it is not: a reasoner parameter that trains or dropout in training
    mode (`frozen_reasoner_problem`), a changed reasoner signature (`reuse_signature`: other weights, adapters,
    autocast; a store is kept per signature), sliding-window reasoner layers, a filled cache, rows that do not start
    with a registered prompt. Never across prompts: entries match by exact token ids (a prompt differing in one
    token reuses at most the tokens before it).

        reuse = PromptReuse()
        reuse.begin(prompts)                     # the batch's reasoner prompts (token id lists)
        with reusing_prompts(pair, reuse):
            pair.generate(...); pair(...)        # each distinct prompt runs through the reasoner once
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, fill_batch: int = 8) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.fill_batch = fill_batch
        self.prompts: list[list[int]] = []
        self._stores: dict[tuple, ReasonerPrefixCache] = {}
        self.stats = ReuseStats()

    def begin(self, prompts) -> int:
        """Register a new batch's reasoner prompts (token id lists; repeats once) and drop the previous batch's
        prefills. Returns the number of distinct prompts."""
        seen: dict[tuple[int, ...], None] = {}
        for p in prompts:
            seen.setdefault(tuple(int(t) for t in p), None)
        self.prompts = [list(p) for p in seen if p]
        self._stores.clear()
        return len(self.prompts)

    def clear(self) -> None:
        self.begin([])

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._stores.values())

    def _bypass(self, why: str) -> None:
        why = why.split(";")[0]  # the reason, without the parameter names
        self.stats.bypassed[why] = self.stats.bypassed.get(why, 0) + 1

    def _problem(self, model: FlyThinkerForCausalLM, cache: FlyThinkerCache | None) -> str | None:
        from transformers import DynamicCache

        from flythinker.training.reasoner_cache import frozen_reasoner_problem

        if not self.prompts:
            return "no prompts registered"
        problem = frozen_reasoner_problem(model.reasoner)
        if problem:
            return problem
        layers = cache.reasoner if cache is not None else DynamicCache(config=model.config.reasoner)
        if any(getattr(layers, "is_sliding", ())):
            return "sliding-window reasoner layers"
        if cache is not None and cache.reasoner.get_seq_length() > 0:
            return "a filled cache"
        return None

    def _store(self, model: FlyThinkerForCausalLM) -> ReasonerPrefixCache:
        """This signature's store, filled with every registered prompt (the reasoner runs on those missing)."""
        sig = reuse_signature(model)
        store = self._stores.get(sig)
        if store is None:
            store = self._stores[sig] = ReasonerPrefixCache(self.max_bytes)
            self.stats.fills += 1
            self._fill(model, store)
        return store

    @torch.no_grad()
    def _fill(self, model: FlyThinkerForCausalLM, store: ReasonerPrefixCache) -> None:
        from transformers import DynamicCache

        from flythinker.alignment import positions_from_mask
        from flythinker.cache import FlyThinkerCache

        device = model.generator_device
        todo = sorted(self.prompts, key=len)
        for s in range(0, len(todo), self.fill_batch):
            chunk = todo[s:s + self.fill_batch]
            ids, mask = _left_pad(chunk, device)
            tmp = FlyThinkerCache(generator=DynamicCache(), reasoner=DynamicCache(config=model.config.reasoner))
            with _eval_mode(model.reasoner):
                h = model.reasoner_forward(ids, mask, positions_from_mask(mask), tmp, True)  # [n, Q, H_r]
            Q = ids.shape[1]
            self.stats.prompt_tokens += int(mask.sum())
            for i, p in enumerate(chunk):
                keys, values = _layer_kv(tmp.reasoner.layers, slice(i, i + 1), slice(Q - len(p), Q))
                store.store(torch.as_tensor(p), keys, values, h[i, Q - len(p):])

    def prompt_forward(self, model: FlyThinkerForCausalLM, r_ids: torch.Tensor, r_mask: torch.Tensor,
                       r_pos: torch.Tensor, cache: FlyThinkerCache | None, use_cache: bool) -> torch.Tensor | None:
        """The reasoner's latents `[B, T, H_r]` for `r_ids [B, T]` (left-padded rows: a stored prompt, possibly
        followed by more tokens) with the stored prompts' entries copied in, or None (run the plain forward) where
        reuse does not apply. With `cache` (an empty prefill cache) its reasoner KV is filled as the plain
        forward would fill it."""
        problem = self._problem(model, cache)
        if problem is not None:
            self._bypass(problem)
            return None
        store = self._store(model)
        plan = _reuse_plan(store, r_ids, r_mask)
        if plan is None:
            self._bypass("rows that do not start with a registered prompt")
            return None
        C, rows = plan
        B, T = r_ids.shape
        if cache is None and C < T:  # the rest attends to the copied prompt entries
            from transformers import DynamicCache

            from flythinker.cache import FlyThinkerCache

            cache = FlyThinkerCache(generator=DynamicCache(), reasoner=DynamicCache(config=model.config.reasoner))
        h = _copy_prefix(rows, B, C, cache, r_ids.device)
        if C < T:
            with _eval_mode(model.reasoner):
                rest = model.reasoner_forward(r_ids[:, C:], r_mask, r_pos[:, C:], cache, True)  # [B, T - C, H_r]
            h = torch.cat([h.to(rest.dtype), rest], dim=1)
        self.stats.forwards += 1
        self.stats.reused_tokens += sum(n for _, _, n in rows)
        self.stats.rest_tokens += B * (T - C)
        return h


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode for one call, each submodule's mode restored after. Why: transformers' decoder layers
    drop a KV cache while gradient checkpointing in training mode (TRL's default), and the reuse feeds the copied
    prompt entries through one. Same numbers: reuse requires a frozen reasoner without active dropout, so its
    training mode changes nothing else (and a frozen reasoner saves no activations to checkpoint)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _reuse_plan(store: ReasonerPrefixCache, r_ids: torch.Tensor, r_mask: torch.Tensor
                ) -> tuple[int, list[tuple[int, PrefixEntry, int]]] | None:
    """The common boundary C (every row's positions before it are left pads or tokens of its stored entry) and
    per row (first real position s, entry, tokens copied C - s); None when nothing can be copied."""
    mask = r_mask.bool().cpu()
    ids = r_ids.cpu()
    found = []
    for b in range(ids.shape[0]):
        real = mask[b].nonzero()
        if real.numel() == 0:
            return None
        s = int(real[0, 0])
        gap = (~mask[b, s:]).nonzero()
        end = s + (int(gap[0, 0]) if gap.numel() else mask.shape[1] - s)  # the first real run only
        entry, m = store.lookup(ids[b, s:end], keep_last=False)
        found.append((s, entry, m))
    C = min(s + m for s, _, m in found)
    rows = [(s, e, C - s) for s, e, _ in found]
    if sum(max(n, 0) for _, _, n in rows) == 0:
        return None
    return C, [(s, e, max(n, 0)) for s, e, n in rows]


def _copy_prefix(rows: list[tuple[int, PrefixEntry | None, int]], B: int, C: int, cache: FlyThinkerCache | None,
                 device: torch.device) -> torch.Tensor:
    """The latents `[B, C, H_r]` of the first C positions (each row's copied entry at its real positions, zeros at
    pads); with `cache`, its reasoner layers receive the matching KV entries `[B, kv_heads, C, head_dim]`."""
    ref = next(e for _, e, n in rows if n > 0)
    h = ref.latents.new_zeros(B, C, ref.latents.shape[-1])
    for b, (_, e, n) in enumerate(rows):
        if n > 0:
            h[b, C - n:] = e.latents[:n]
    if cache is not None:
        for i, layer in enumerate(cache.reasoner.layers):
            k0, v0 = ref.keys[i], ref.values[i]
            k = k0.new_zeros(B, k0.shape[0], C, k0.shape[-1])
            v = v0.new_zeros(B, v0.shape[0], C, v0.shape[-1])
            for b, (_, e, n) in enumerate(rows):
                if n > 0:
                    k[b, :, C - n:] = e.keys[i][:, :n]
                    v[b, :, C - n:] = e.values[i][:, :n]
            layer.update(k, v)
    return h.to(device)


@contextmanager
def reusing_prompts(model: FlyThinkerForCausalLM, reuse: PromptReuse | None) -> Iterator[PromptReuse | None]:
    """While active, split-context reasoner prompt forwards of `model` (a pair) go through `reuse` (None: off)."""
    fused = model.get_decoder()
    prev = fused.reasoner_prompt_reuse
    fused.reasoner_prompt_reuse = reuse
    try:
        yield reuse
    finally:
        fused.reasoner_prompt_reuse = prev


__all__ = ["DEFAULT_MAX_BYTES", "PrefixEntry", "PrefixStats", "PromptReuse", "ReasonerPrefixCache", "ReuseStats",
           "cached_reasoner_prefill", "common_prefix", "reuse_signature", "reusing_prompts", "store_reply", "usable"]
