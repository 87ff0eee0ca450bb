"""FlyThinkerCache: both models' KV caches, the reasoner latents produced so far, and the reasoner's own mask.

One `Cache` object under generate's single cache name, so that beam search's `reorder_cache`, contrastive search's
`batch_select_indices`, assisted decoding's `crop` etc. keep everything consistent (a side cache in another kwarg
would silently desync: generate only reorders the first cache it finds).

What is stored beyond the two `DynamicCache`s:
- the latents `h_t` the reasoner has emitted, already multiplied by their validity mask, in a doubling buffer
  `[B, cap, H_r]`. The last one is the *pending* latent, fused into the next generator position. Keeping the
  history (4 * H_r bytes per token and row, e.g. 2.3 KB for H_r=576, against 2 * layers * kv_dim * 4 = 46 KB of
  KV for SmolLM2-135M) is what makes `crop` exact: rolling back n tokens makes latent L-n-1 pending again.
- in split context, the reasoner's attention mask `[B, L_r]` and its next position id per row `[B]`: generate only
  extends the generator's mask, so the reasoner's (different-length, differently padded) mask lives here. It grows
  by the new tokens each step in a doubling buffer, and the positions of the new tokens come from the stored next
  position (O(T) work per step of T tokens, not a re-cumsum of the whole [B, L_r] mask).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import Cache


class FlyThinkerCache(Cache):
    """Composite cache of a FlyThinker pair.

    Args:
        generator, reasoner: existing `Cache`s, or None to create `DynamicCache(config=...)` from the configs.
        generator_config, reasoner_config: the sub-model configs (layer types: full / sliding attention).
    """

    def __init__(self, generator: Cache | None = None, reasoner: Cache | None = None, *,
                 generator_config: PreTrainedConfig | None = None,
                 reasoner_config: PreTrainedConfig | None = None) -> None:
        # Like EncoderDecoderCache, no Cache.__init__: the layers live in the two sub-caches.
        self.generator = generator if generator is not None else DynamicCache(config=generator_config)
        self.reasoner = reasoner if reasoner is not None else DynamicCache(config=reasoner_config)
        self._latents: torch.Tensor | None = None  # [B, cap, H_r], rows already masked
        self._num_latents = 0
        self._clear_reasoner_mask()

    # ------------------------------------------------------------------ latents
    @property
    def pending(self) -> torch.Tensor | None:
        """The latent `[B, H_r]` to fuse into the next generator position (zero rows: nothing to fuse)."""
        if self._latents is None or self._num_latents == 0:
            return None
        return self._latents[:, self._num_latents - 1]

    @property
    def latents(self) -> torch.Tensor | None:
        """All latents emitted so far `[B, N, H_r]` (masked), oldest first."""
        return None if self._latents is None else self._latents[:, : self._num_latents]

    def append_latents(self, h: torch.Tensor) -> None:
        """Append `h` `[B, T, H_r]` (already multiplied by its validity mask)."""
        h = h.detach()
        B, T, H = h.shape
        n = self._num_latents + T
        if self._latents is None or self._latents.shape[1] < n or self._latents.shape[0] != B:
            cap = max(n, 2 * (0 if self._latents is None else self._latents.shape[1]), 16)
            buf = h.new_zeros(B, cap, H)
            if self._latents is not None and self._num_latents:
                buf[:, : self._num_latents] = self._latents[:, : self._num_latents]
            self._latents = buf
        self._latents[:, self._num_latents:n] = h
        self._num_latents = n

    # ------------------------------------------------------------------ split context: the reasoner's own mask
    def _clear_reasoner_mask(self) -> None:
        self.split = False  # set at prefill: whether the reasoner reads its own prompt
        self._rmask: torch.Tensor | None = None  # [B, cap] doubling buffer of the reasoner's mask
        self._rlen = 0  # used columns of _rmask
        self.reasoner_next_position: torch.Tensor | None = None  # [B] long: position id of the next real token

    @property
    def reasoner_attention_mask(self) -> torch.Tensor | None:
        """The reasoner's attention mask so far `[B, L_r]` (a view; split context only, else None)."""
        return None if self._rmask is None else self._rmask[:, : self._rlen]

    def start_split(self, mask: torch.Tensor) -> None:
        """Split-context prefill: the reasoner's prompt mask `[B, Q]` (any padding) becomes the reasoner's mask."""
        self.split = True
        self._rmask, self._rlen = None, 0
        self.reasoner_next_position = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        self.extend_reasoner(mask)

    def extend_reasoner(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' mask `[B, T]` to the reasoner's. Returns the full mask `[B, L_r]` and the new
        tokens' reasoner position ids `[B, T]` (HF convention: cumsum of the mask - 1, pads 0)."""
        B, T = mask.shape
        n = self._rlen + T
        if self._rmask is None or self._rmask.shape[1] < n or self._rmask.shape[0] != B:
            cap = max(n, 2 * (0 if self._rmask is None else self._rmask.shape[1]), 16)
            buf = mask.new_zeros(B, cap)
            if self._rmask is not None and self._rlen:
                buf[:, : self._rlen] = self._rmask[:, : self._rlen]
            self._rmask = buf
        self._rmask[:, self._rlen:n] = mask
        self._rlen = n
        m = mask.long()
        pos = self.reasoner_next_position[:, None] + m.cumsum(-1) - 1  # [B, T]: a cumsum over the new tokens only
        self.reasoner_next_position = self.reasoner_next_position + m.sum(-1)
        return self.reasoner_attention_mask, pos.masked_fill(m == 0, 0)

    # ------------------------------------------------------------------ Cache API
    def __repr__(self) -> str:
        return (f"{type(self).__name__}(generator={self.generator!r}, reasoner={self.reasoner!r}, "
                f"latents={self._num_latents}, split={self.split})")

    def __len__(self) -> int:
        return len(self.generator)

    @property
    def layers(self):
        # The generator's layers: what generate's generic helpers (mask sizes, stop checks) reason about.
        return self.generator.layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The generator's cached length: what generate uses to slice new input ids."""
        return self.generator.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.generator.get_max_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.generator.get_mask_sizes(query_length, layer_idx)

    def reset(self) -> None:
        self.generator.reset()
        self.reasoner.reset()
        self._latents, self._num_latents = None, 0
        self._clear_reasoner_mask()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i of every part becomes old row beam_idx[i]."""
        self.generator.reorder_cache(beam_idx)
        self.reasoner.reorder_cache(beam_idx)
        self._index_select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.generator.batch_select_indices(indices)
        self.reasoner.batch_select_indices(indices)
        self._index_select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.generator.batch_repeat_interleave(repeats)
        self.reasoner.batch_repeat_interleave(repeats)
        if self._latents is not None:
            self._latents = self._latents.repeat_interleave(repeats, dim=0)
        if self._rmask is not None:
            self._rmask = self._rmask.repeat_interleave(repeats, dim=0)
            self.reasoner_next_position = self.reasoner_next_position.repeat_interleave(repeats, dim=0)

    def _index_select(self, idx: torch.Tensor) -> None:
        if self._latents is not None:
            self._latents = self._latents.index_select(0, idx.to(self._latents.device))
        if self._rmask is not None:
            idx = idx.to(self._rmask.device)
            self._rmask = self._rmask.index_select(0, idx)
            self.reasoner_next_position = self.reasoner_next_position.index_select(0, idx)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (a negative count, transformers 5.x) from every part."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        n = -tokens_to_remove
        # no early return for n == 0: transformers calls crop(0) on purpose so sliding-window layers shrink back
        self.generator.crop(tokens_to_remove)
        self.reasoner.crop(tokens_to_remove)
        self._num_latents = max(self._num_latents - n, 0)
        if self._rmask is not None:
            keep = max(self._rlen - n, 0)
            self.reasoner_next_position = self.reasoner_next_position - self._rmask[:, keep:self._rlen].long().sum(-1)
            self._rlen = keep

    def activate_past_recording(self, **kwargs: Any) -> None:
        """Record past states on both parts so assisted / prompt-lookup decoding can roll back (`crop`).

        Keyword arguments (transformers >= 5.25: `recurrent_states_to_keep`) go to both sub-caches unchanged.
        """
        self.generator.activate_past_recording(**kwargs)
        self.reasoner.activate_past_recording(**kwargs)

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        """Recurrent states kept for rollback (0 for attention-only models): the larger of the two parts', since
        `layer_idx` numbers the generator's layers (the reasoner is asked for its maximum)."""
        return max(self.generator.get_recurrent_states_to_keep(layer_idx),
                   self.reasoner.get_recurrent_states_to_keep(None))

    def is_recording_past(self, layer_idx: int) -> bool:
        return self.generator.is_recording_past(layer_idx)

    @property
    def batch_size(self) -> int:
        return self.generator.batch_size

    @property
    def is_compileable(self) -> bool:
        return False  # dynamic shapes (growing latent buffer); keeps generate from auto-compiling

    @property
    def is_initialized(self) -> bool:
        return self.generator.is_initialized

    @property
    def is_croppable(self) -> bool:
        return self.generator.is_croppable and self.reasoner.is_croppable

    @property
    def is_sliding(self) -> list[bool]:
        return self.generator.is_sliding

    @property
    def is_linear(self) -> list[bool]:
        return self.generator.is_linear

    @property
    def is_dummy(self) -> list[bool]:
        return self.generator.is_dummy


__all__ = ["FlyThinkerCache"]
