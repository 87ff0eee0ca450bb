"""A lean decode loop for a FlyThinker pair (gpt-fast style): static KV caches, the reasoner's one-token step
overlapped with the generator's, sampling through `flythinker.kernels.sample`, no per-step host sync on GPU.

    prefill          the model's own forward on the prompt, into static caches -> first logits + loop state
    decode_one_token fuse the pending latent into the new token, run both halves -> next logits, next latent
    decode_n_tokens  pick, handle eos, feed back; stop once every row is finished
    fast_generate    the public entry: checks, then prefill + decode_n_tokens
    generate_fast_path  what `FlyThinkerForCausalLM.generate()` calls first: with fast_path="auto" (default) runs
                     fast_generate when the call is one it reproduces token for token (greedy / one seeded
                     FusedSamplingLogitsProcessor; no beams, other processors, stopping criteria, extra outputs),
                     else None (transformers' loop runs); fast_path=True insists, False skips it

The one-token step is the two-copy one (the generator's half beside the reasoner's, config.parallel) or, for a
shared-base pair (flythinker.shared_base), one forward of 2B rows through the shared base with per-row adapters
(`decode_path` names which; `generate_path(model, *args, **kwargs)` names the loop a generate() call takes, and a
DEBUG log says which ran).

It gives the same tokens as `model.generate` with the same settings: greedy, or seeded sampling with the same
`FusedSamplingLogitsProcessor(seed=...)` draws (`flythinker.sampling`); finished rows are padded exactly like HF
(pad id = generation_config.pad_token_id, else the first eos id) and the loop stops once every row is finished.
What it leaves out from `generate`: beam search, logits processors / stopping criteria other than eos, and
`min_new_tokens`. Use `model.generate` for those.

Where the time goes (CPU, SmolLM2-135M pair; docs/results.md, "Measurements behind design choices"): the
one-token steps are bound by streaming the weights; the loop saves HF's per-step bookkeeping (DynamicCache growth
copies, mask/position rebuilding, logits processors, stopping criteria) and runs the reasoner on its own core.
`compile=True` wraps the generator's one-token step in `torch.compile`: worth it on GPU, where Python launch overhead
dominates a 135M model's step; on CPU compiling costs far more than it saves on a short reply, so it is off by
default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers import StaticCache
from transformers.utils import logging

from flythinker import reasoner_prefix_cache as prefix_cache
from flythinker.cache import FlyThinkerCache
from flythinker.kernels import sample
from flythinker.modeling import FlyThinkerForCausalLM
from flythinker.shared_base import SharedStep, is_shared_base
from flythinker.workers import InlineWorker, ReasonerWorker

logger = logging.get_logger(__name__)
GeneratorStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DecodeState:
    """What the loop carries from one token to the next (all on the generator's inputs' device)."""

    cache: FlyThinkerCache  # static KV caches of both models
    mask: torch.Tensor  # [B, P + N] generator mask of fixed shape: slot P + s turns on at step s
    rsn_mask: torch.Tensor  # [B, Q + N] the reasoner's (the generator's own in shared context)
    gen_pos: torch.Tensor  # [B, 1] generator position of the latest token
    rsn_pos: torch.Tensor  # [B, 1] reasoner position of the latest token
    pending: torch.Tensor  # [B, H_r] latent fused into the next generator position
    worker: ReasonerWorker  # runs the reasoner's half beside the generator's (config.parallel)
    P: int  # generator prompt length
    Q: int  # reasoner prompt length (P in shared context)
    shared: SharedStep | None = None  # shared-base pair: both halves' rows in one batched forward
    fusion_lambda: float | None = None  # this call's lambda (None: config.fusion_lambda)
    fed: int = 0  # tokens fed to both models since the prefill
    reply_latents: list[torch.Tensor] | None = None  # the reasoner's latents `[B, H_r]` per fed token (prefix cache)


def prefill(model: FlyThinkerForCausalLM, input_ids: torch.Tensor, mask: torch.Tensor,
            rsn_ids: torch.Tensor | None, rsn_mask: torch.Tensor, fusion_lambda: float | None = None,
            parallel: str | None = None) -> tuple[torch.Tensor, DecodeState]:
    """Run the prompt `input_ids [B, P]` through the model into static caches sized for `mask [B, P + N]`.
    Split context: `rsn_ids [B, Q]` with `rsn_mask [B, Q + N]`. Returns the first logits `[B, V]` and the state."""
    P, N = input_ids.shape[1], mask.shape[1] - input_ids.shape[1]
    Q = P if rsn_ids is None else rsn_ids.shape[1]
    cache = FlyThinkerCache(generator=StaticCache(config=model.config.generator, max_cache_len=P + N),
                            reasoner=StaticCache(config=model.config.reasoner, max_cache_len=Q + N))
    out = model(input_ids=input_ids, attention_mask=mask[:, :P], cache=cache, use_cache=True, logits_to_keep=1,
                reasoner_input_ids=rsn_ids, reasoner_attention_mask=None if rsn_ids is None else rsn_mask[:, :Q],
                fusion_lambda=fusion_lambda, parallel=parallel)
    gen_pos = mask[:, :P].sum(1, keepdim=True) - 1  # [B, 1]: the last prompt token is real (left padding)
    # the reasoner's prompt may be right-padded: the cache knows its next position
    rsn_pos = gen_pos if rsn_ids is None else cache.reasoner_next_position[:, None] - 1
    shared = (SharedStep(model, cache.generator, cache.reasoner, mask, rsn_mask, P, Q, N)
              if is_shared_base(model) else None)
    worker = model.reasoner_worker(parallel) if shared is None else InlineWorker()
    state = DecodeState(cache, mask, rsn_mask, gen_pos, rsn_pos, cache.pending, worker, P, Q, shared, fusion_lambda)
    if rsn_ids is not None and prefix_cache.usable(model, rsn_mask[:, :Q], cache):
        state.reply_latents = []  # the reply the reasoner reads extends this view's prefix-cache entry
    return out.logits[:, -1].float(), state


def decode_path(model: FlyThinkerForCausalLM, parallel: str | None = None) -> str:
    """Which one-token step `fast_generate` runs for `model`: "shared-base batched" (one forward of 2B rows through
    the shared base), or the two-copy step in the worker's mode ("sequential" / "threads" / "streams") for
    `parallel` (None: config.parallel)."""
    if is_shared_base(model):
        return "shared-base batched"
    name = type(model.reasoner_worker(parallel)).__name__
    return {"InlineWorker": "sequential", "ThreadWorker": "threads", "StreamWorker": "streams"}.get(name, name)


def generator_step(model: FlyThinkerForCausalLM, cache: FlyThinkerCache) -> GeneratorStep:
    """The generator's one-token step `(embeds [B, 1, H_g], mask, pos [B, 1]) -> logits [B, V]` (compilable)."""

    def step(embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        hidden = model.generator_forward(embeds, mask, pos, cache, True).last_hidden_state  # [B, 1, H_g]
        return model.logits_from_hidden(hidden, 1)[:, -1].float()  # [B, V]

    return step


def decode_one_token(model: FlyThinkerForCausalLM, state: DecodeState, tok: torch.Tensor, s: int,
                     gen_step: GeneratorStep) -> torch.Tensor:
    """Feed step s's token `tok [B]` to both models (the generator's half beside the reasoner's): returns the next
    logits `[B, V]` and moves the state on (positions, masks, the pending latent)."""
    t = tok[:, None]  # [B, 1]
    state.gen_pos, state.rsn_pos = state.gen_pos + 1, state.rsn_pos + 1
    state.mask[:, state.P + s] = 1
    state.rsn_mask[:, state.Q + s] = 1  # the same tensor as mask in shared context
    embeds = model.fuse_pending(t, state.pending, check_inputs=False, lam=state.fusion_lambda)  # [B, 1, H_g]
    state.fed += 1
    if state.shared is not None:
        logits, state.pending = state.shared(embeds, t, state.gen_pos, state.rsn_pos, s)
        _record_latent(state)
        return logits

    def reasoner_half() -> torch.Tensor:  # [B, H_r]: the new token is always attended, nothing to zero
        return model.reasoner_forward(t, state.rsn_mask, state.rsn_pos, state.cache, True)[:, -1]

    logits, state.pending = state.worker.run_pair(
        partial(gen_step, embeds, state.mask, state.gen_pos), reasoner_half)
    _record_latent(state)
    return logits


def _record_latent(state: DecodeState) -> None:
    if state.reply_latents is not None:
        state.reply_latents.append(state.pending)


def store_reply(model: FlyThinkerForCausalLM, state: DecodeState, rsn_ids: torch.Tensor, new: torch.Tensor) -> bool:
    """Extend the reasoner prefix cache's entry of the view `rsn_ids [1, Q]` with the reply tokens the reasoner
    read (`new [1, n]`, the first `state.fed` of them). Returns whether an entry was stored."""
    if state.reply_latents is None or state.fed == 0:
        return False
    if state.shared is not None:  # the reasoner's row of the combined cache, its view right-aligned at slot L
        layers, rows, start = state.shared.cache.layers, slice(1, 2), state.shared.L - state.Q
    else:
        layers, rows, start = state.cache.reasoner.layers, slice(0, 1), 0
    return prefix_cache.store_reply(model, rsn_ids, new[0, : state.fed], state.reply_latents, layers, rows, start)


def decode_n_tokens(model: FlyThinkerForCausalLM, state: DecodeState, logits: torch.Tensor, n: int,
                    pick: Callable[[torch.Tensor], torch.Tensor], eos: torch.Tensor | None, pad: int | None,
                    check_every: int, gen_step: GeneratorStep, streamer: Any = None) -> torch.Tensor:
    """Up to `n` new tokens `[B, n']` from the first `logits [B, V]`. Rows that emitted an eos get `pad` after it;
    every `check_every` steps (the only host sync) the loop stops if all rows are finished."""
    B = logits.shape[0]
    tokens = torch.empty(B, n, dtype=torch.long, device=logits.device)
    finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
    all_done = torch.zeros(n, dtype=torch.bool, device=logits.device)  # [n]: every row finished after step s
    for s in range(n):
        tok = pick(logits)  # [B]
        if eos is not None:
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            finished |= torch.isin(tok, eos)
            all_done[s] = finished.all()
        tokens[:, s] = tok
        if streamer is not None:
            streamer.put(tok.cpu())
        if eos is not None and ((s + 1) % check_every == 0 or s + 1 == n) and bool(all_done[s]):
            return tokens[:, : int(all_done[: s + 1].nonzero()[0, 0]) + 1]  # up to the first all-finished step
        if s + 1 < n:
            logits = decode_one_token(model, state, tok, s, gen_step)
    return tokens


def left_pad(rows: Sequence[Sequence[int] | torch.Tensor], pad_id: int, device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prompts for `generate` / `fast_generate`: id lists or 1-D tensors -> `(ids [B, L], mask [B, L])`,
    left-padded with `pad_id` (every row's last position is a real token, as decoding needs). An empty batch or row
    is an error."""
    if len(rows) == 0 or any(len(r) == 0 for r in rows):
        raise ValueError("left_pad needs at least one prompt, each of at least one token")
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[i, L - len(r):] = 1
    return ids.to(device), mask.to(device)


def _eos_tensor(eos_token_id: int | list[int] | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    t = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id, dtype=torch.long,
                        device=device).reshape(-1)
    return t if t.numel() else None


def _loop_masks(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rsn_ids: torch.Tensor | None,
                rsn_attention_mask: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-shape masks for the loop (a compiled step never sees a new shape): generator `[B, P + n]` (left
    padding required) and reasoner `[B, Q + n]` (the same tensor in shared context)."""
    B, P = input_ids.shape
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("fast_generate needs left-padded prompts: a row's last prompt position is padding "
                             "(the first new token would be predicted from a pad slot)")
    mask = torch.zeros(B, P + n, dtype=torch.long, device=input_ids.device)
    mask[:, :P] = 1 if attention_mask is None else attention_mask
    if rsn_ids is None:
        return mask, mask
    if rsn_ids.dim() != 2 or rsn_ids.shape[0] != B:
        raise ValueError(f"reasoner_input_ids must be [B={B}, Q], got {tuple(rsn_ids.shape)}")
    if rsn_attention_mask is not None and rsn_attention_mask.shape != rsn_ids.shape:
        raise ValueError("reasoner_attention_mask must have the shape of reasoner_input_ids")
    Q = rsn_ids.shape[1]
    rsn_mask = torch.zeros(B, Q + n, dtype=torch.long, device=input_ids.device)
    rsn_mask[:, :Q] = 1 if rsn_attention_mask is None else rsn_attention_mask
    return mask, rsn_mask


@torch.inference_mode()
def fast_generate(
    model: FlyThinkerForCausalLM,
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
    fusion_lambda: float | None = None,
    parallel: str | None = None,
) -> torch.Tensor:
    """Generate with a `FlyThinkerForCausalLM`: returns `[B, P + n]` ids (prompt then n <= max_new_tokens tokens).

    input_ids / attention_mask `[B, P]` (left padding); split context: reasoner_input_ids / mask `[B, Q]`.
    Sampling (do_sample=True): temperature / top_k / top_p / min_p as `flythinker.kernels.sample`, drawn with
    `generator` or a fresh one seeded by `seed`. eos/pad default to the model's generation_config.
    check_every: steps between the all-finished checks (the only host sync; default 1 on CPU, 8 on GPU).
    fusion_lambda / parallel: this call's fusion weight / overlap mode (None: the config's, `parallel` being its
    runtime default, never saved; the config is not changed).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    dev = input_ids.device
    eos = _eos_tensor(model.generation_config.eos_token_id if eos_token_id is None else eos_token_id, dev)
    pad = model.generation_config.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None and eos is not None:
        pad = int(eos[0])
    if do_sample and generator is None and seed is not None:
        generator = torch.Generator(device=dev).manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B]
        if not do_sample:
            return logits.argmax(-1)
        return sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator,
                      check_inputs=False)

    mask, rsn_mask = _loop_masks(input_ids, attention_mask, reasoner_input_ids, reasoner_attention_mask,
                                 max_new_tokens)
    logits, state = prefill(model, input_ids, mask, reasoner_input_ids, rsn_mask, fusion_lambda, parallel)
    gen_step = generator_step(model, state.cache)
    if compile:
        gen_step = torch.compile(gen_step, dynamic=False)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    new = decode_n_tokens(model, state, logits, max_new_tokens, pick, eos, pad,
                          check_every or (8 if dev.type == "cuda" else 1), gen_step, streamer)
    store_reply(model, state, reasoner_input_ids, new)
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, new], dim=1)


# ---------------------------------------------------------------------------------------------- generate()'s fast path
# kwargs the fast path reproduces; anything else (beams, processors, stopping criteria, extra outputs, a user cache,
# ...) goes to transformers' loop
_FAST_KWARGS = {"input_ids", "attention_mask", "max_new_tokens", "max_length", "do_sample", "num_beams",
                "eos_token_id", "pad_token_id", "streamer", "reasoner_input_ids", "reasoner_attention_mask",
                "generation_config", "logits_processor", "use_cache", "fusion_lambda", "parallel"}
# generation-config fields (as diffs from the defaults) that leave greedy decoding what the fast loop does
_FAST_CONFIG = {"bos_token_id", "eos_token_id", "pad_token_id", "max_new_tokens", "max_length", "do_sample",
                "num_beams", "use_cache", "temperature", "top_k", "top_p", "min_p", "transformers_version",
                "_from_model_config", "output_attentions", "output_hidden_states"}


def _fused_sampler(procs: Any) -> dict | None:
    """fast_generate's sampling kwargs for a logits_processor list that is exactly one seeded, scalar
    FusedSamplingLogitsProcessor (it draws what fast_generate draws with the same seed); None otherwise."""
    from flythinker.sampling import FusedSamplingLogitsProcessor

    if procs is None or len(procs) == 0:
        return {}
    if len(procs) != 1 or type(procs[0]) is not FusedSamplingLogitsProcessor:
        return None
    p = procs[0]
    if p.seed is None or p._prev_ids is not None or p.backend is not None or any(
            isinstance(v, torch.Tensor) for v in (p.temperature, p.top_k, p.top_p, p.min_p)):
        return None
    return {"do_sample": True, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
            "seed": p.seed}


def _fast_path_plan(model: FlyThinkerForCausalLM, args: tuple, kwargs: dict) -> tuple[dict | None, str]:
    """(fast_generate kwargs, "") if this generate() call is one the lean loop reproduces token for token, else
    (None, why not)."""
    import copy

    if len(args) > 1 or (args and "input_ids" in kwargs):
        return None, "positional arguments beyond input_ids"
    extra = sorted(set(kwargs) - _FAST_KWARGS)
    if extra:
        return None, f"arguments {extra}"
    ids = args[0] if args else kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or model.training:
        return None, "no 2-D input_ids (or training mode)"
    gc = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    gc.update(**{k: v for k, v in kwargs.items() if k in _FAST_CONFIG})
    diff = sorted(set(gc.to_diff_dict()) - _FAST_CONFIG)
    sampler = _fused_sampler(kwargs.get("logits_processor"))
    if sampler is None:
        return None, "logits processors"
    # HF sampling is reproduced only through the fused processor (its one-hot scores make HF's draw its token)
    if diff or (gc.do_sample and not sampler) or (gc.num_beams or 1) != 1 or gc.use_cache is False:
        return None, f"generation config {diff or 'sampling / beams / no cache'}"
    mask = kwargs.get("attention_mask")
    P = ids.shape[1]
    if mask is None and gc.pad_token_id is not None and bool((ids == gc.pad_token_id).any()):
        return None, "no attention_mask and pad tokens in the prompt (transformers infers a mask)"
    if mask is not None and (mask.shape != ids.shape or not bool(mask[:, -1].all())):
        return None, "not a left-padded [B, P] attention_mask"
    n = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 20) - P
    if n < 1:
        return None, "no new tokens to make"
    eos = gc.eos_token_id
    plan = dict(attention_mask=mask, max_new_tokens=int(n), streamer=kwargs.get("streamer"),
                eos_token_id=[] if eos is None else eos, pad_token_id=gc.pad_token_id,
                reasoner_input_ids=kwargs.get("reasoner_input_ids"),
                reasoner_attention_mask=kwargs.get("reasoner_attention_mask"),
                fusion_lambda=kwargs.get("fusion_lambda"), parallel=kwargs.get("parallel"), **sampler)
    return plan, ""


FAST_PATH_CHOICES = ("auto", True, False)
TRANSFORMERS_LOOP = "transformers generate"


def _plan(model: FlyThinkerForCausalLM, args: tuple, kwargs: dict) -> tuple[dict | None, str]:
    """(fast_generate kwargs or None, the path's name) for `model.generate(*args, **kwargs)`, `fast_path` read from
    kwargs (and removed): "auto" (default) the lean loop when it reproduces the call, True the lean loop or a
    ValueError naming why not, False transformers' loop."""
    choice = kwargs.pop("fast_path", "auto")
    if not any(choice is c for c in FAST_PATH_CHOICES):
        raise ValueError(f"fast_path must be 'auto', True or False, got {choice!r}")
    if choice is False:
        return None, TRANSFORMERS_LOOP
    plan, why = _fast_path_plan(model, args, kwargs)
    if plan is None:
        if choice is True:
            raise ValueError(f"fast_path=True: the lean loop does not reproduce this call ({why}); use "
                             "fast_path='auto' or False for transformers' loop")
        logger.debug("generate: transformers' loop (%s)", why)
        return None, TRANSFORMERS_LOOP
    return plan, f"fast static-cache loop, {decode_path(model, kwargs.get('parallel'))} step"


def generate_path(model: FlyThinkerForCausalLM, *args: Any, **kwargs: Any) -> str:
    """The loop `model.generate(*args, **kwargs)` runs, named without running it: "transformers generate" or
    "fast static-cache loop, <step> step" (`decode_path`). Raises like generate for `fast_path=True` on a call
    the lean loop does not reproduce."""
    return _plan(model, args, dict(kwargs))[1]


def generate_fast_path(model: FlyThinkerForCausalLM, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Run `model.generate(*args, **kwargs)` on the lean loop when `fast_path` (in kwargs, removed here) chooses it:
    "auto" when it gives the same tokens (greedy, or one seeded FusedSamplingLogitsProcessor; no beams, other
    processors, stopping criteria or extra outputs), with the shared-base batched step for a shared-base pair.
    Returns the ids `[B, P + n]`, or None: use transformers' loop. `generate_path` names the choice beforehand;
    a DEBUG log of this module names it as it runs."""
    plan, path = _plan(model, args, kwargs)
    if plan is None:
        return None
    ids = args[0] if args else kwargs["input_ids"]
    logger.debug("generate: %s", path)
    out = fast_generate(model, ids, **plan)
    return out.clone()  # a normal tensor, not an inference-mode one (as transformers' generate returns)


# importing this module makes the lean loop generate's fast path (the model itself knows no decode loop)
FlyThinkerForCausalLM.register_lean_generate(generate_fast_path)

__all__ = ["DecodeState", "decode_n_tokens", "decode_one_token", "decode_path", "fast_generate",
           "generate_fast_path", "generate_path", "generator_step", "left_pad", "prefill"]
