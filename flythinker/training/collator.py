"""Batch (prompt, response) pairs, or (generator prompt, reasoner prompt, response) triples, for joint training.

Output of :class:`FlyThinkerCollator` (HF convention: labels are *not* shifted, the model shifts them):

- shared context: ``input_ids`` [B, L], ``attention_mask`` [B, L], ``labels`` [B, L] (prompt, padding:
  ``IGNORE_INDEX``)
- split context: the same for the generator view, plus ``reasoner_input_ids`` [B, L_r] and
  ``reasoner_attention_mask`` [B, L_r]: the reasoner's prompt followed by the *same* response tokens.

Padding side. The default is **left** padding: it is what HF batched generation uses and what the authors
trained with, and with both views left-padded every row's response ends in the last column of both tensors.
The model (``flythinker.alignment.split_alignment``) locates the split-context boundary from each row's last real
token and the labelled response length, so right padding (``padding_side="right"``) aligns just as well; what
matters, and what this collator guarantees, is that both views end with the *same* response tokens and that the
labels cover exactly those tokens (the model derives the number of fused positions from them).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flythinker.configuration import IGNORE_INDEX

TRUNCATION_KEYS = ("examples", "prompts", "prompt_tokens", "reasoner_prompts", "reasoner_prompt_tokens", "responses",
                   "response_tokens")

Text = str | Sequence[int] | Sequence[Mapping[str, str]]  # text, token ids, or chat messages


@dataclass
class Example:
    """One tokenized training example. ``reasoner_prompt`` is None in shared context."""

    prompt: list[int]
    response: list[int]
    reasoner_prompt: list[int] | None = None


def _as_triple(feature: Any) -> tuple[Any, Any, Any]:
    """(generator prompt, reasoner prompt or None, response) from a dict or a tuple."""
    if isinstance(feature, Mapping):
        if "response" not in feature:
            raise ValueError(f"example has no 'response' field (keys: {sorted(feature)})")
        if "generator_prompt" in feature or "reasoner_prompt" in feature:
            missing = [k for k in ("generator_prompt", "reasoner_prompt") if k not in feature]
            if missing:
                raise ValueError(f"split-context example is missing {missing}")
            return feature["generator_prompt"], feature["reasoner_prompt"], feature["response"]
        if "prompt" not in feature:
            raise ValueError(
                f"example needs 'prompt' (shared context) or 'generator_prompt'+'reasoner_prompt' (split); "
                f"keys: {sorted(feature)}"
            )
        return feature["prompt"], None, feature["response"]
    if isinstance(feature, (tuple, list)) and len(feature) in (2, 3):
        if len(feature) == 2:
            return feature[0], None, feature[1]
        return feature[0], feature[1], feature[2]
    raise TypeError(
        f"example must be a dict or a (prompt, response) / (generator_prompt, reasoner_prompt, response) tuple, "
        f"got {type(feature).__name__}"
    )


@dataclass
class FlyThinkerCollator:
    """Tokenize, truncate and pad training examples into model inputs (see module docstring for the output).

    Args:
        tokenizer: needed when prompts/responses are strings or chat messages; gives pad/eos ids by default.
        pad_token_id / eos_token_id: override the tokenizer's (required without a tokenizer).
        padding_side: "left" (default, see module docstring) or "right".
        add_eos: append EOS to every response (so the model learns to stop); skipped when the response is
            truncated or already ends with EOS.
        chat_template: wrap *string* prompts as one user message with the tokenizer's chat template
            (``add_generation_prompt=True``). Prompts given as a list of ``{"role", "content"}`` messages always
            use the template.
        max_length / reasoner_max_length: cap on the generator / reasoner sequence (prompt + response); each caps
            its own view only (None: uncapped; the long reasoner view is not cut to the generator's cap).
            Prompts lose tokens from the left (oldest context first); if the response alone does not fit it is
            cut on the right, identically in both views so they stay aligned. Never silent: the first batch that
            is cut warns with its counts, and :attr:`truncation` counts every cut over the collator's life
            (keys :data:`TRUNCATION_KEYS`: examples cut, prompts / reasoner prompts / responses cut and the
            tokens each lost).
        pad_to_multiple_of: round padded lengths up (e.g. 8 for tensor cores).
    """

    tokenizer: Any = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    padding_side: str = "left"
    add_eos: bool = True
    chat_template: bool = False
    max_length: int | None = None
    reasoner_max_length: int | None = None
    pad_to_multiple_of: int | None = None
    truncation: dict[str, int] = field(init=False, repr=False, compare=False)
    _warned: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.truncation = dict.fromkeys(TRUNCATION_KEYS, 0)
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        tok = self.tokenizer
        if self.pad_token_id is None and tok is not None:
            self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.eos_token_id is None and tok is not None:
            self.eos_token_id = tok.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("no pad token id: pass pad_token_id= or a tokenizer with a pad or eos token")
        if self.add_eos and self.eos_token_id is None:
            raise ValueError("add_eos=True needs an eos token id (pass eos_token_id= or a tokenizer with one)")
        for name in ("max_length", "reasoner_max_length"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"{name} must be >= 2 (one prompt token + one response token), got {value}")

    # ---- tokenization -------------------------------------------------------------------------------------
    def _ids(self, value: Any, *, is_prompt: bool, what: str) -> list[int]:
        if isinstance(value, str):
            if self.tokenizer is None:
                raise ValueError(f"{what} is a string but the collator has no tokenizer")
            if is_prompt and self.chat_template:
                return self._ids([{"role": "user", "content": value}], is_prompt=True, what=what)
            # Responses never get special tokens (no BOS in the middle of a sequence); prompts get the
            # tokenizer's usual ones (a BOS where the model family uses one).
            return list(self.tokenizer(value, add_special_tokens=is_prompt)["input_ids"])
        if isinstance(value, Sequence) and len(value) > 0 and isinstance(value[0], Mapping):
            if not is_prompt:
                raise ValueError(f"{what}: chat messages are only accepted as prompts")
            if self.tokenizer is None or getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError(f"{what} is a list of chat messages but the tokenizer has no chat template")
            text = self.tokenizer.apply_chat_template(list(value), tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if any(v < 0 for v in value):
                raise ValueError(f"{what} has negative token ids")
            return list(value)
        raise TypeError(f"{what} must be a str, a list of token ids or chat messages, got {type(value).__name__}")

    def tokenize(self, feature: Any) -> Example:
        """One example -> token ids (no truncation, no EOS yet)."""
        g, r, resp = _as_triple(feature)
        prompt = self._ids(g, is_prompt=True, what="prompt")
        reasoner = None if r is None else self._ids(r, is_prompt=True, what="reasoner_prompt")
        response = self._ids(resp, is_prompt=False, what="response")
        if not response:
            raise ValueError("empty response: nothing to train on")
        if r is not None and (not prompt or not reasoner):
            raise ValueError("split-context examples need non-empty generator and reasoner prompts")
        return Example(prompt, response, reasoner)

    # ---- truncation ---------------------------------------------------------------------------------------
    def _finalize(self, ex: Example) -> tuple[Example, tuple[int, int, int]]:
        """(the example cut to the caps with EOS added, tokens cut from (prompt, reasoner prompt, response))."""
        response = list(ex.response)
        eos_ok = self.add_eos and response[-1] != self.eos_token_id
        caps = [self.max_length]
        if ex.reasoner_prompt is not None:
            caps.append(self.reasoner_max_length)  # max_length caps the generator's view only
        room = min((c - 1 for c in caps if c is not None), default=None)  # keep >= 1 prompt token per view
        response_cut = 0
        if room is not None and len(response) + eos_ok > room:
            response_cut = len(response) + eos_ok - room  # counting an EOS that no longer fits
            response, eos_ok = response[:room], False  # cut: the response did not end, so no EOS
        if eos_ok:
            response.append(self.eos_token_id)

        def cut_prompt(prompt: list[int], cap: int | None) -> list[int]:
            if cap is None or len(prompt) + len(response) <= cap:
                return prompt
            return prompt[len(prompt) + len(response) - cap :]  # drop the oldest context first

        prompt = cut_prompt(ex.prompt, self.max_length)
        reasoner = None
        if ex.reasoner_prompt is not None:
            reasoner = cut_prompt(ex.reasoner_prompt, self.reasoner_max_length)
        cuts = (len(ex.prompt) - len(prompt), len(ex.reasoner_prompt or ()) - len(reasoner or ()), response_cut)
        return Example(prompt, response, reasoner), cuts

    def _count_truncation(self, cuts: list[tuple[int, int, int]]) -> None:
        """Add one batch's cuts to :attr:`truncation`; the first batch with any cut warns (once per collator)."""
        cut = [c for c in cuts if any(c)]
        if not cut:
            return
        t = self.truncation
        t["examples"] += len(cut)
        for i, (key, tokens) in enumerate((("prompts", "prompt_tokens"), ("reasoner_prompts", "reasoner_prompt_tokens"),
                                           ("responses", "response_tokens"))):
            t[key] += sum(1 for c in cut if c[i])
            t[tokens] += sum(c[i] for c in cut)
        if self._warned:
            return
        self._warned = True
        caps = f"max_length={self.max_length}, reasoner_max_length={self.reasoner_max_length}"
        warnings.warn(
            f"FlyThinkerCollator truncated {len(cut)} of {len(cuts)} examples of this batch to fit {caps}: "
            f"{t['prompts']} generator prompts lost {t['prompt_tokens']} oldest tokens, "
            f"{t['reasoner_prompts']} reasoner prompts {t['reasoner_prompt_tokens']}, {t['responses']} responses "
            f"were cut on the right by {t['response_tokens']} tokens (EOS included; a cut response gets none). "
            "Warned once; later batches are counted in collator.truncation", stacklevel=3)

    # ---- padding ------------------------------------------------------------------------------------------
    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        length = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if not row:
                continue
            if self.padding_side == "left":
                out[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def __call__(self, features: Sequence[Any]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("empty batch")
        finalized = [self._finalize(self.tokenize(f)) for f in features]
        self._count_truncation([cuts for _, cuts in finalized])
        examples = [ex for ex, _ in finalized]
        split = {ex.reasoner_prompt is not None for ex in examples}
        if len(split) != 1:
            raise ValueError("a batch mixes shared-context (prompt) and split-context (generator/reasoner) examples")
        seqs = [ex.prompt + ex.response for ex in examples]
        labels = [[IGNORE_INDEX] * len(ex.prompt) + ex.response for ex in examples]
        batch = {
            "input_ids": self._pad(seqs, self.pad_token_id),
            "attention_mask": self._pad([[1] * len(s) for s in seqs], 0),
            "labels": self._pad(labels, IGNORE_INDEX),
        }
        if split == {True}:
            r_seqs = [ex.reasoner_prompt + ex.response for ex in examples]
            batch["reasoner_input_ids"] = self._pad(r_seqs, self.pad_token_id)
            batch["reasoner_attention_mask"] = self._pad([[1] * len(s) for s in r_seqs], 0)
        return batch
