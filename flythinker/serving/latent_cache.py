"""The per-request latent state of a FlyThinker pair inside vLLM: a paged per-token latent cache.

Generator position t reads the reasoner's latent from position t - 1 of the *same request*. vLLM flattens the
scheduled tokens of all requests into one list and never shows the model a request id, but it does show every
attention layer where each token lives in the paged KV cache: the slot mapping (one slot per scheduled token) and
the block table (request row -> physical blocks). So the latents live in that cache like one more KV layer:

* the store is an ordinary vLLM `Attention` layer that is never run. vLLM allocates its pages with the pair's KV
  cache (same KV cache group, hence the same block table and slot mapping), frees them with the request, and the
  scheduler accounts for them in its memory budget;
* each step writes the reasoner latent `h_p` of every scheduled token at that token's slot, then reads, for every
  token at position p >= 1, the slot of position p - 1 of its own request through the block table
  (`block_table[req, (p-1) // block] * block + (p-1) % block`). Writing first makes the in-chunk case (p - 1
  scheduled in the same step) and the cross-step case (decode, the next chunk of a chunked prefill) one gather;
* preemption frees the pages with the KV pages and recomputation rewrites both, so nothing goes stale.

In shared context the latent at position p is a function of the token prefix 0..p, exactly like the KV entries,
so vLLM's prefix caching stays correct (a cached block carries its latents).

Storage: `n` heads of size `hs` per token with `2 * hs * n >= H_r` (the CPU layout of one page row is
`[num_kv_heads, block, 2 * head_size]`); only `hs` values the attention backends accept are used.
"""

from __future__ import annotations

import torch
from torch import nn

# Head sizes every vLLM attention backend accepts (the CPU backend's list is the tightest: 32, 64, 80, ...).
_STORE_HEAD_SIZE = 32


def store_geometry(hidden: int) -> tuple[int, int]:
    """(num_heads, head_size) of a store row holding `hidden` values: `2 * head_size * num_heads >= hidden`."""
    if hidden <= 0:
        raise ValueError(f"latent width must be positive, got {hidden}")
    n = -(-hidden // (2 * _STORE_HEAD_SIZE))
    return n, _STORE_HEAD_SIZE


class PagedLatentCache(nn.Module):
    """One paged slot per token for the reasoner latent `[H_r]`, sharing the pair's block table.

    `exchange(h, positions)` writes `h [N, H_r]` at the scheduled tokens' slots and returns
    `(prev [N, H_r], has_prev [N] bool)`: the latent of each token's previous position in its request.
    """

    def __init__(self, hidden: int, *, cache_config, prefix: str):
        super().__init__()
        from vllm.model_executor.layers.attention.attention import Attention

        self.hidden = hidden
        self.num_heads, self.head_size = store_geometry(hidden)
        self.layer_name = prefix
        # An attention layer only for its KV pages: it has no weights and its forward is never called.
        self.store = Attention(self.num_heads, self.head_size, scale=1.0, num_kv_heads=self.num_heads,
                               cache_config=cache_config, prefix=prefix)
        self.checks = True  # compare the block-table slots with vLLM's slot mapping (cheap on CPU)

    def _pages(self) -> torch.Tensor:
        """The store as `[num_blocks, num_heads, block_size, 2 * head_size]` (vLLM's CPU page layout)."""
        kv = self.store.kv_cache
        if isinstance(kv, (list, tuple)):
            kv = kv[0]
        if kv.dim() == 4 and kv.shape[1] == self.num_heads and kv.shape[3] == 2 * self.head_size:
            return kv
        # GPU backends page K and V apart ([2, num_blocks, block, heads, head_size]): not wired up yet (no GPU here)
        raise NotImplementedError(f"flythinker: KV page layout {tuple(kv.shape)} is not supported by the latent "
                                  f"store yet (expected vLLM's CPU layout [blocks, {self.num_heads}, block, "
                                  f"{2 * self.head_size}])")

    def metadata(self):
        """This step's attention metadata of the store (None in vLLM's profiling run)."""
        from vllm.forward_context import get_forward_context

        md = get_forward_context().attn_metadata
        if md is None:
            return None
        if isinstance(md, list):
            raise NotImplementedError("flythinker: micro-batching (ubatch) is not supported by the latent cache")
        return md[self.layer_name]

    def write(self, h: torch.Tensor, slots: torch.Tensor) -> None:
        """Store latents `h [n, H_r]` at KV slots `[n]` (negative slots, vLLM's padding, are skipped)."""
        pages = self._pages()
        block = pages.shape[2]
        n = h.shape[0]
        row = torch.zeros(n, self.num_heads * 2 * self.head_size, dtype=pages.dtype, device=h.device)
        row[:, :self.hidden] = h
        row = row.view(n, self.num_heads, 2 * self.head_size)
        ok = slots >= 0  # PAD_SLOT_ID = -1
        pages[slots[ok] // block, :, slots[ok] % block, :] = row[ok]

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Latents `[n, H_r]` stored at KV slots `[n]` (>= 0)."""
        pages = self._pages()
        block = pages.shape[2]
        return pages[slots // block, :, slots % block, :].reshape(slots.numel(), -1)[:, :self.hidden].to(dtype)

    def exchange(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's latents, read each token's previous-position latent (shared context).

        h: `[N, H_r]` reasoner latents of the N scheduled tokens (flattened over requests, vLLM's order);
        positions: `[N]` their positions. Returns `(prev [N, H_r], has_prev [N] bool)`; a token without a
        previous position (p = 0), a padding token, or a step without metadata (vLLM's profiling run) gets none.
        """
        from flythinker.serving.split import row_of_tokens, slots_of

        N = h.shape[0]
        md = self.metadata()
        if md is None:  # dummy/profiling run: shapes only
            return torch.zeros_like(h), torch.zeros(N, dtype=torch.bool, device=h.device)
        block = self._pages().shape[2]
        n_act = int(md.num_actual_tokens)
        table = block_table(md)
        req = row_of_tokens(md.query_start_loc, n_act)
        pos = positions[:n_act].long()
        slot_now = md.slot_mapping[:n_act].long()
        if self.checks and not torch.equal(slots_of(table, req, pos, block), slot_now):
            raise RuntimeError("flythinker: the latent cache's slot arithmetic disagrees with vLLM's slot "
                               "mapping (unsupported KV cache layout or block size)")
        self.write(h[:n_act], slot_now)
        has_prev = pos >= 1
        got = self.read(slots_of(table, req, (pos - 1).clamp_min(0), block), h.dtype)
        prev = torch.zeros_like(h)
        prev[:n_act] = got * has_prev[:, None].to(h.dtype)
        flag = torch.zeros(N, dtype=torch.bool, device=h.device)
        flag[:n_act] = has_prev
        return prev, flag


def block_table(md) -> torch.Tensor:
    """The block table `[R, max_blocks]` of an attention metadata object (CPU: `block_table`)."""
    return md.block_table if hasattr(md, "block_table") else md.block_table_tensor


__all__ = ["PagedLatentCache", "block_table", "store_geometry"]
