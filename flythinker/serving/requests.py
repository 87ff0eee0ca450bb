"""Per-request split-context info for the model forward: which part of a request's prompt is the reasoner's view.

Split context (docs/design.md) is served with the prompt `reasoner_ids ++ generator_ids` (so vLLM allocates slots for
both views and prefix caching hashes both) and the reasoner view's length Q in the request's
`SamplingParams.extra_args["flythinker_reasoner_tokens"]` (the OpenAI server's `vllm_xargs`).

vLLM's model interface carries no per-request data to `forward`, but its logits processors see every request's
batch row, prompt ids and sampling params before each forward (`update_state`, called from
`InputBatch.refresh_metadata` after the batch is condensed and reordered). `SplitContextChannel` is such a logits
processor (entry point group `vllm.logits_processors`; it never changes the logits) and keeps `ROWS`, batch row ->
`RowInfo`, which the model reads in the same worker process. Rows are laid out in `query_start_loc` in that same
order, and the model checks each scheduled prompt token against the row's prompt ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

XARG = "flythinker_reasoner_tokens"
# the whole prompt's token count as the client or the server's middleware saw it: a request whose prompt the engine
# receives at another length (truncate_prompt_tokens, a template change) is refused instead of split at Q anyway
PROMPT_XARG = "flythinker_prompt_tokens"


@dataclass
class RowInfo:
    """One running request: Q reasoner-view tokens, then P = prompt_len - Q generator-view tokens."""

    reasoner_tokens: int
    prompt_ids: list[int]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


ROWS: dict[int, RowInfo] = {}  # persistent-batch row -> split info (rows without an entry are shared context)


def reasoner_tokens(params) -> int:
    """Q from sampling params (0 = shared context); ValueError naming the problem for a bad value."""
    extra = getattr(params, "extra_args", None) or {}
    q = extra.get(XARG, 0)
    if isinstance(q, bool) or not isinstance(q, int) or q < 0:
        raise ValueError(f"vllm_xargs.{XARG} must be a non-negative integer (the reasoner view's token count at "
                         f"the start of the prompt), got {q!r}")
    return q


def check_admitted(prompt_ids, params) -> None:
    """ValueError unless a request is servable as the engine will run it (called on vLLM's final prompt ids, after
    templating and truncation, before the request reaches the engine; see `flythinker.serving.register`).

    A split request (Q = `reasoner_tokens(params)` > 0) needs 1 <= Q < len(prompt_ids) (the generator view needs a
    token), the prompt length the client sent when it gave one (`PROMPT_XARG`), and no `prompt_logprobs` (the
    reasoner-view positions have no generator distribution). Shared-context requests pass unchanged.
    """
    q = reasoner_tokens(params)
    extra = getattr(params, "extra_args", None) or {}
    sent = extra.get(PROMPT_XARG)
    if not q:
        if sent is not None:
            raise ValueError(f"vllm_xargs.{PROMPT_XARG} is only meaningful with vllm_xargs.{XARG}")
        return
    n = len(prompt_ids or ())
    if sent is not None and (isinstance(sent, bool) or not isinstance(sent, int) or sent != n):
        raise ValueError(f"the split request's prompt reached the engine with {n} tokens instead of the {sent!r} "
                         "sent (truncate_prompt_tokens and other prompt rewrites would cut a view)")
    if not 1 <= q < n:
        raise ValueError(f"vllm_xargs.{XARG} must be an integer in [1, {n - 1}] (the prompt has {n} tokens and "
                         f"the generator view needs at least one), got {q}")
    if getattr(params, "prompt_logprobs", None) is not None:
        raise ValueError("prompt_logprobs is not available on a split request (its reasoner-view positions have no "
                         "generator distribution)")


def _logits_processor_base():
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


class SplitContextChannel(_logits_processor_base()):
    """A no-op logits processor that records each batch row's split-context info into `ROWS`."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        reasoner_tokens(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        ROWS.clear()  # a new engine starts with an empty batch

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for i in batch_update.removed:
            ROWS.pop(i, None)
        for i, params, prompt_ids, _out in batch_update.added:
            q = reasoner_tokens(params) if params is not None else 0
            if q:
                ROWS[i] = RowInfo(q, list(prompt_ids or []))
            else:
                ROWS.pop(i, None)
        from vllm.v1.sample.logits_processor import MoveDirectionality

        for a, b, kind in batch_update.moved:
            ia, ib = ROWS.pop(a, None), ROWS.pop(b, None)
            if ia is not None:
                ROWS[b] = ia
            if kind == MoveDirectionality.SWAP and ib is not None:
                ROWS[a] = ib


__all__ = ["PROMPT_XARG", "ROWS", "RowInfo", "SplitContextChannel", "XARG", "check_admitted", "reasoner_tokens"]
