"""A lean decode loop for a FlyThinker pair (gpt-fast style): static KV caches, the reasoner's one-token step
overlapped with the generator's, sampling through `flythinker.kernels.sample`, no per-step host sync on GPU.

It gives the same tokens as `model.generate` with the same settings: greedy, or seeded sampling with the same
`FusedSamplingLogitsProcessor(seed=...)` draws (`flythinker.sampling`); finished rows are padded exactly like HF
(pad id = generation_config.pad_token_id, else the first eos id) and the loop stops once every row is finished.
What it leaves out from `generate`: beam search, logits processors / stopping criteria other than eos, and
`min_new_tokens`. Use `model.generate` for those.

Where the time goes (CPU, SmolLM2-135M pair, see benchmarks/decode.py): the one-token steps are bound by streaming
the weights (`aten::mm` ~83% of a step); the loop saves HF's per-step bookkeeping (DynamicCache growth copies
~46 KB x 30 layers per token and row, mask/position rebuilding, logits processors, stopping criteria) and runs
the reasoner on its own core. `compile=True` wraps the generator's one-token step in `torch.compile` (worth it on
GPU, where Python launch overhead dominates a 135M model's step; on CPU it measured 53 vs 62 ms per step but
compiling took ~60 s, so it is off by default).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from transformers import StaticCache

from flythinker.alignment import positions_from_mask
from flythinker.cache import FlyThinkerCache
from flythinker.concurrency import worker_for
from flythinker.kernels import sample


def _eos_tensor(eos_token_id: int | list[int] | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    if isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    t = torch.as_tensor(eos_token_id, dtype=torch.long, device=device).reshape(-1)
    return t if t.numel() else None


@torch.inference_mode()
def fast_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Any = None,
    reasoner_input_ids: torch.Tensor | None = None,
    reasoner_attention_mask: torch.Tensor | None = None,
    compile: bool = False,
    check_every: int | None = None,
) -> torch.Tensor:
    """Generate with a `FlyThinkerForCausalLM`: returns `[B, P + n]` ids (prompt then n <= max_new_tokens tokens).

    input_ids / attention_mask `[B, P]` (left padding); split context: reasoner_input_ids / mask `[B, Q]`.
    Sampling (do_sample=True): temperature / top_k / top_p / min_p as `flythinker.kernels.sample`, drawn with
    `generator` or a fresh one seeded by `seed`. eos/pad default to the model's generation_config.
    check_every: steps between the all-finished checks (the only host sync; default 1 on CPU, 8 on GPU).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    dev = input_ids.device
    B, P = input_ids.shape
    gcfg = model.generation_config
    eos = _eos_tensor(gcfg.eos_token_id if eos_token_id is None else eos_token_id, dev)
    pad = pad_token_id if pad_token_id is not None else gcfg.pad_token_id
    if pad is None and eos is not None:
        pad = int(eos[0])
    if check_every is None:
        check_every = 8 if dev.type == "cuda" else 1
    if do_sample and generator is None and seed is not None:
        generator = torch.Generator(device=dev).manual_seed(seed)

    # [B, P + N] masks of fixed shape (a compiled step never sees a new shape): slot P + s turns on at step s.
    mask = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=dev)
    mask[:, :P] = 1
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("fast_generate needs left-padded prompts: a row's last prompt position is padding "
                             "(the first new token would be predicted from a pad slot)")
        mask[:, :P] = attention_mask
    split = reasoner_input_ids is not None
    if split:
        if reasoner_input_ids.dim() != 2 or reasoner_input_ids.shape[0] != B:
            raise ValueError(f"reasoner_input_ids must be [B={B}, Q], got {tuple(reasoner_input_ids.shape)}")
        Q = reasoner_input_ids.shape[1]
        r_mask = torch.zeros(B, Q + max_new_tokens, dtype=torch.long, device=dev)
        r_mask[:, :Q] = 1
        if reasoner_attention_mask is not None:
            if reasoner_attention_mask.shape != reasoner_input_ids.shape:
                raise ValueError("reasoner_attention_mask must have the shape of reasoner_input_ids")
            r_mask[:, :Q] = reasoner_attention_mask
    else:
        Q, r_mask = P, mask

    cache = FlyThinkerCache(
        generator=StaticCache(config=model.config.generator, max_cache_len=P + max_new_tokens),
        reasoner=StaticCache(config=model.config.reasoner, max_cache_len=Q + max_new_tokens))
    out = model(input_ids=input_ids, attention_mask=mask[:, :P], cache=cache, use_cache=True, logits_to_keep=1,
                reasoner_input_ids=reasoner_input_ids,
                reasoner_attention_mask=r_mask[:, :Q] if split else None)
    logits = out.logits[:, -1].float()  # [B, V]
    pending = cache.pending  # [B, H_r], already masked
    gen_pos = positions_from_mask(mask[:, :P])[:, -1:]  # [B, 1]
    # the reasoner's prompt may be right-padded: its next position follows its last real token
    rsn_pos = (r_mask[:, :Q].sum(1, keepdim=True) - 1) if split else gen_pos

    def pick(scores: torch.Tensor) -> torch.Tensor:
        if not do_sample:
            return scores.argmax(-1)
        return sample(scores, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator,
                      check_input=False)

    gen_base, rsn_base = model.generator.get_decoder(), model.reasoner.get_decoder()
    rdev = rsn_base.get_input_embeddings().weight.device

    def gen_step(emb: torch.Tensor, m: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = gen_base(inputs_embeds=emb, attention_mask=m, position_ids=pos, cache=cache.generator,
                     use_cache=True).last_hidden_state
        return model._logits(h, 1)[:, -1].float()

    gen_call: Callable[..., torch.Tensor] = torch.compile(gen_step, dynamic=False) if compile else gen_step

    def rsn_step(tok: torch.Tensor, m: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = rsn_base(input_ids=tok.to(rdev), attention_mask=m.to(rdev), position_ids=pos.to(rdev),
                     cache=cache.reasoner, use_cache=True).last_hidden_state
        return h[:, -1].to(dev)  # the new token is always attended (mask 1): nothing to zero

    worker = worker_for(model)
    tokens = torch.empty(B, max_new_tokens, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    all_done = torch.zeros(max_new_tokens, dtype=torch.bool, device=dev)  # all rows finished after step s
    if streamer is not None:
        streamer.put(input_ids.cpu())
    n = max_new_tokens
    for s in range(max_new_tokens):
        tok = pick(logits)
        if eos is not None:
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            finished |= torch.isin(tok, eos)
            all_done[s] = finished.all()
        tokens[:, s] = tok
        if streamer is not None:
            streamer.put(tok.cpu())
        if eos is not None and ((s + 1) % check_every == 0 or s + 1 == max_new_tokens) and bool(all_done[s]):
            n = int(all_done[: s + 1].nonzero()[0, 0]) + 1  # the first step after which every row was done
            break
        if s + 1 == max_new_tokens:
            break
        t = tok[:, None]  # [B, 1]
        gen_pos, rsn_pos = gen_pos + 1, rsn_pos + 1
        emb = model._fuse(t, pending.new_zeros(t.shape[0], 1, pending.shape[-1]), None, pending, check_inputs=False)
        mask[:, P + s] = 1
        if split:
            r_mask[:, Q + s] = 1
        logits, pending = worker.run_pair(partial(gen_call, emb, mask, gen_pos), partial(rsn_step, t, r_mask, rsn_pos))
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, tokens[:, :n]], dim=1)


class _CallableModule(types.ModuleType):
    # `import flythinker.fast_generate` binds the package attribute `flythinker.fast_generate` to this module,
    # shadowing the function of the same name: make the module callable so `flythinker.fast_generate(...)` works
    # whichever import ran first.
    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return fast_generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["fast_generate"]
