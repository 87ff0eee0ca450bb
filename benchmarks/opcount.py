"""Aten ops per decoded token ("decode at the cost of one model"): a count of the ops one decode step
dispatches, the per-op overhead being what a small model's batch-1 CPU step pays beside streaming its weights.

Counted with a `TorchDispatchMode` over one step after a warm step, under inference_mode: every op that reaches the
Python dispatcher (views included; CompositeImplicit ops such as `linear` count once). Used by
benchmarks/decode_pairs.py (shared section, on SmolLM2) and tests/test_shared_base_lean.py (tiny config).
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as c: ...` -> `c.ops`: a Counter of the aten ops (by overload packet) run inside."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@torch.inference_mode()
def pair_step_ops(model, ids: torch.Tensor, mask: torch.Tensor | None = None, rsn_ids: torch.Tensor | None = None,
                  rsn_mask: torch.Tensor | None = None) -> Counter[str]:
    """The ops of one decode step of a FlyThinker pair in the fast loop (`flythinker.decode.decode_one_token`: the
    fusion, both halves, the logits; a shared-base pair's batched step), after the prefill and one warm step."""
    from flythinker import decode

    gm, rm = decode._loop_masks(ids, mask, rsn_ids, rsn_mask, 3)
    logits, st = decode.prefill(model, ids, gm, rsn_ids, rm)
    step = decode.generator_step(model, st.cache)
    tok = logits.argmax(-1)
    decode.decode_one_token(model, st, tok, 0, step)
    with OpCounter() as c:
        decode.decode_one_token(model, st, tok, 1, step)
    return c.ops


@torch.inference_mode()
def lm_step_ops(lm, ids: torch.Tensor, mask: torch.Tensor | None = None) -> Counter[str]:
    """The ops of one decode step of a plain causal LM in the same lean loop (static cache, fixed-shape mask, the
    decoder + LM head of the last position), after the prefill and one warm step."""
    from transformers import StaticCache

    B, P = ids.shape
    cache = StaticCache(config=lm.config, max_cache_len=P + 3)
    full = torch.zeros(B, P + 3, dtype=torch.long, device=ids.device)
    full[:, :P] = 1 if mask is None else mask
    dec = lm.get_decoder()
    hidden = dec(input_ids=ids, attention_mask=full[:, :P], cache=cache, use_cache=True).last_hidden_state
    tok = lm.lm_head(hidden[:, -1]).argmax(-1)[:, None]
    pos = full[:, :P].sum(1, keepdim=True)
    c = OpCounter()
    for s in range(2):
        full[:, P + s] = 1
        with c if s else nullcontext():
            hidden = dec(input_ids=tok, attention_mask=full, position_ids=pos + s, cache=cache,
                         use_cache=True).last_hidden_state
            lm.lm_head(hidden[:, -1])
    return c.ops


def total(ops: Counter[str]) -> int:
    return sum(ops.values())
