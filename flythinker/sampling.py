"""Fused sampling inside Hugging Face `generate`: a LogitsProcessor that draws the token itself.

HF samples through a chain of warpers (temperature, top-k, top-p, min-p), each writing a full-vocabulary
tensor, then softmax + multinomial. `FusedSamplingLogitsProcessor` replaces that chain with one call to
`flythinker.kernels.sample` (Triton on CUDA, sorting-free torch path on CPU; semantics in
`kernels/sampling_naive.py`) and returns scores that are -inf everywhere except the drawn token, so whatever
HF does next (argmax, or softmax + multinomial over a one-hot) picks that token.

Usage::

    proc = FusedSamplingLogitsProcessor(temperature=0.7, top_k=50, top_p=0.9, min_p=0.0, seed=0)
    out = model.generate(input_ids, max_new_tokens=64, **proc.generate_kwargs())
    # == generate(..., do_sample=True, logits_processor=LogitsProcessorList([proc]))

`generate_kwargs()` sets `do_sample=True`: HF's warpers, if the generation config has any, leave our one-hot
distribution unchanged, its multinomial draws our token, and num_return_sequences > 1 works (greedy mode refuses
it). `do_sample=False` also works (HF's argmax returns our token). HF's own sampling
stays available: simply don't pass the processor. User processors run after HF's built-in ones (repetition
penalty, min_length, bad words, ...), so those still shape the scores before the draw. Not meant for beam
search (the processor would pick one token per beam). The lean decode loop (`flythinker.fast_generate`)
calls `flythinker.kernels.sample` directly instead.

With `seed`, every `generate` call starts from that seed, so one processor handed to two models (or to one model
twice) draws paired samples.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from flythinker.kernels.sampling import sample


class FusedSamplingLogitsProcessor(LogitsProcessor):
    """Draw the next token with the fused sampler; return -inf scores except 0 at the drawn token.

    temperature/top_k/top_p/min_p: scalars or per-row tensors [B] (as `flythinker.kernels.sample`).
    generator: a torch.Generator on the scores' device (its stream simply continues across calls); or seed: a fresh
    generator seeded with it at the start of every `generate` call, on the scores' device.

    A processor only sees `(input_ids, scores)`; a call is the next step of the same `generate` when its
    `input_ids [B, L]` extend the previous step's by exactly one token (same rows, same prefix). Anything else is
    the start of a new call. The one input that looks like a next step is a new `generate` whose prompt is exactly
    the previous call's output so far: call `reset()` before it.
    """

    def __init__(self, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor | None = None,
                 top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
                 generator: torch.Generator | None = None, seed: int | None = None, backend: str | None = None):
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.generator, self.seed, self.backend = generator, seed, backend
        self._prev_ids: torch.Tensor | None = None  # [B, L] input_ids of the latest step

    def reset(self) -> None:
        """Start the next call afresh (re-seed), whatever its input_ids look like."""
        self._prev_ids = None

    def _next_step(self, input_ids: torch.Tensor) -> bool:
        """Whether `input_ids [B, L]` continue the previous step's sequences by one token (same generate call)."""
        prev, self._prev_ids = self._prev_ids, input_ids
        return (prev is not None and input_ids.shape == (prev.shape[0], prev.shape[1] + 1)
                and input_ids.device == prev.device and torch.equal(input_ids[:, :-1], prev))

    def _generator(self, input_ids: torch.Tensor, device: torch.device) -> torch.Generator | None:
        if not self._next_step(input_ids) and self.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tok = sample(scores, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                     generator=self._generator(input_ids, scores.device), backend=self.backend)  # [B]
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tok[:, None], 0.0)

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate` that route token selection through this processor (and `reset()`
        it: the call that uses them starts from the seed)."""
        self.reset()
        # do_sample=True: the processor's one-hot scores pass HF's warpers (if the generation config has any)
        # unchanged and multinomial of a one-hot is the drawn token; unlike do_sample=False it allows
        # num_return_sequences > 1 (greedy mode refuses it with a message about beams)
        return {"do_sample": True, "logits_processor": LogitsProcessorList([self])}
