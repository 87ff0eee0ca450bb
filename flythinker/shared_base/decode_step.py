"""The batched decode step of a shared-base pair (`flythinker.decode`): both halves' rows as one forward of 2B rows
through the shared base.

The two halves have different prompt lengths in split context: after the prefill (each half into its own static
cache) both caches are copied into one static cache of 2B rows, each half left-padded to the longer prompt; masks
and position ids stay per row, so attention and RoPE see exactly what each half saw alone.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import StaticCache

from flythinker.shared_base.lora_layer import StepContext, adapters


class SharedStep:
    """One decode step of a shared-base pair as ONE forward of 2B rows through the shared base.

    Built from the two halves' prefilled static caches (`flythinker.decode.prefill`): the combined static cache
    `[2B, heads, L + N, d]` holds the generator's prompt (rows :B) and the reasoner's (rows B:), each
    right-aligned at slot L = max(P, Q) with its own mask; step s writes slot L + s of every row. The adapters'
    stacked weights are checked (and rebuilt if changed) when the step is built: a change of the adapters in the
    middle of one decode call is not seen by that call."""

    def __init__(self, model: nn.Module, gen_cache, rsn_cache, gen_mask: torch.Tensor, rsn_mask: torch.Tensor,
                 P: int, Q: int, n: int) -> None:
        self.model = model
        self.decoder = model.generator.get_decoder()
        lora = next(iter(adapters(model.generator).values()), None)
        self.ctx = lora._ctx if lora is not None else StepContext()  # r = 0: no adapters to route
        self.B = B = gen_mask.shape[0]
        self.L = L = max(P, Q)
        self.cache = StaticCache(config=model.config.generator, max_cache_len=L + n)
        for layer, g, r in zip(self.cache.layers, gen_cache.layers, rsn_cache.layers, strict=True):
            k = g.keys.new_zeros(2 * B, g.keys.shape[1], 1, g.keys.shape[3])
            v = g.values.new_zeros(2 * B, g.values.shape[1], 1, g.values.shape[3])
            layer.lazy_initialization(k, v)
            layer.keys[:B, :, L - P:L] = g.keys[:, :, :P]
            layer.values[:B, :, L - P:L] = g.values[:, :, :P]
            layer.keys[B:, :, L - Q:L] = r.keys[:, :, :Q]
            layer.values[B:, :, L - Q:L] = r.values[:, :, :Q]
            layer.cumulative_length.fill_(L)
        self.mask = torch.zeros(2 * B, L + n, dtype=gen_mask.dtype, device=gen_mask.device)  # [2B, L + n]
        self.mask[:B, L - P:L] = gen_mask[:, :P]
        self.mask[B:, L - Q:L] = rsn_mask[:, :Q]
        self.ctx.refresh()  # the adapters' stacked weights, checked once per decode call

    def __call__(self, gen_embeds: torch.Tensor, tok: torch.Tensor, gen_pos: torch.Tensor, rsn_pos: torch.Tensor,
                 s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step s: generator embeddings `[B, 1, H]` (fused), the token `tok [B, 1]`, positions `[B, 1]` ->
        (next logits `[B, V]`, the reasoner's new latent `[B, H]`)."""
        B = self.B
        x = torch.cat([gen_embeds, self.model.reasoner.get_input_embeddings()(tok).to(gen_embeds.dtype)])
        self.mask[:, self.L + s] = 1
        with self.ctx.batched(B, refresh=False):  # refreshed once, in __init__
            hidden = self.decoder(inputs_embeds=x, attention_mask=self.mask, position_ids=torch.cat([gen_pos, rsn_pos]),
                                  cache=self.cache, use_cache=True).last_hidden_state  # [2B, 1, H]
        return self.model.logits_from_hidden(hidden[:B], 1)[:, -1].float(), hidden[B:, -1]


__all__ = ["SharedStep"]
