"""Training data files -> examples for :class:`~flythinker.training.collator.FlyThinkerCollator`.

Accepted (JSON lines, one JSON list, or one JSON object, read by ``flythinker.persona.jsonio.read_json_items`` like
every other data file), detected from the first record's keys:

- pairs: ``{"prompt": ..., "response": "..."}`` (shared context);
- triples: ``{"generator_prompt": ..., "reasoner_prompt": ..., "response": "..."}`` (split context);
- chats: ``{"messages": [{"role", "content"}, ..., {"role": "assistant", "content": "..."}]}`` (shared context,
  the last assistant message is the response);
  a prompt may be a string or a list of chat messages;
- persona records (LongLaMP / PersonaEmp / PERM / flythinker formats, via ``flythinker.persona.load_records``),
  turned into generator/reasoner token views by ``flythinker.persona.build_views`` (split or shared context).
  Views carry the chat template's end-of-turn tokens already: train them with ``add_eos=False``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A malformed training file; the message names the file, the record and the problem."""


PAIR_KEYS = ({"prompt", "response"}, {"generator_prompt", "reasoner_prompt", "response"}, {"messages"})


def is_pair_record(item: Any) -> bool:
    """A pair/triple/chat record, or a malformed one (any of their keys and not a persona record: reported as a
    malformed pair, not as an unknown persona format)."""
    from flythinker.persona import detect_format

    if not isinstance(item, dict) or not set().union(*PAIR_KEYS) & set(item):
        return False
    try:
        detect_format(item)
    except ValueError:
        return True
    return False


def _check_prompt(value: Any, where: str, field: str) -> None:
    if isinstance(value, str):
        if not value:
            raise DataError(f"{where}: '{field}' is an empty string")
        return
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return
    raise DataError(f"{where}: '{field}' must be a non-empty string or a list of {{role, content}} messages")


def _pair_example(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if "messages" in item and "response" not in item:
        msgs = item["messages"]
        _check_prompt(msgs, where, "messages")
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: 'messages' must end with an assistant message (the response) after a prompt")
        example = {"prompt": msgs[:-1], "response": msgs[-1]["content"]}
    elif {"generator_prompt", "reasoner_prompt"} & set(item):
        missing = [k for k in ("generator_prompt", "reasoner_prompt", "response") if k not in item]
        if missing:
            raise DataError(f"{where}: split-context record is missing {missing}")
        _check_prompt(item["generator_prompt"], where, "generator_prompt")
        _check_prompt(item["reasoner_prompt"], where, "reasoner_prompt")
        example = {k: item[k] for k in ("generator_prompt", "reasoner_prompt", "response")}
    else:
        missing = [k for k in ("prompt", "response") if k not in item]
        if missing:
            raise DataError(f"{where}: record is missing {missing} (keys: {sorted(item)})")
        _check_prompt(item["prompt"], where, "prompt")
        example = {"prompt": item["prompt"], "response": item["response"]}
    if not isinstance(example["response"], str) or not example["response"]:
        raise DataError(f"{where}: 'response' must be a non-empty string")
    _check_unicode(example, where)
    return example


def _check_unicode(example: dict[str, Any], where: str) -> None:
    """Every text of an example must be encodable (a lone surrogate such as JSON's "\\ud800" fails inside the
    tokenizer with a TypeError otherwise)."""
    from flythinker.persona.records import FieldError, check_text

    for key, value in example.items():
        texts = [value] if isinstance(value, str) else [m["content"] for m in value] if isinstance(value, list) else []
        try:
            for text in texts:
                check_text(text, key)
        except FieldError as exc:
            raise DataError(f"{where}: {exc}") from None


def load_examples(
    path: str | os.PathLike,
    *,
    tokenizer=None,
    context: str = "split",
    max_reasoner_tokens: int | None = None,
    max_generator_tokens: int | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Read a training file. Returns ``(examples, kind)``: kind ``"pairs"`` (strings/messages, tokenized by the
    collator) or ``"views"`` (persona records already turned into token ids; `tokenizer` required).

    `context` ("split" | "shared") and the token budgets apply to persona records only: pair files say
    themselves whether they are split (generator_prompt/reasoner_prompt) or shared (prompt).
    """
    from flythinker.persona.jsonio import read_json_items

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        items = read_json_items(path)
    except ValueError as e:  # JsonFileError: names the file and the line
        raise DataError(str(e)) from None
    if not items:
        raise DataError(f"{path}: no records (the file is empty)")
    if is_pair_record(items[0]):
        examples = [_pair_example(item, f"{path}: record {i + 1}") for i, item in enumerate(items)]
        kinds = {"reasoner_prompt" in ex for ex in examples}
        if len(kinds) > 1:
            raise DataError(f"{path}: mixes shared-context (prompt) and split-context (generator_prompt/"
                            "reasoner_prompt) records; use one kind per file")
        return examples, "pairs"
    return _persona_examples(path, items, tokenizer, context, max_reasoner_tokens, max_generator_tokens), "views"


def _persona_examples(path, items, tokenizer, context, max_reasoner_tokens, max_generator_tokens
                      ) -> list[dict[str, Any]]:
    from flythinker.persona import build_views
    from flythinker.persona.loaders import parse_records
    if context not in ("split", "shared"):
        raise DataError(f"context must be 'split' or 'shared', got {context!r}")
    if tokenizer is None:
        raise DataError("persona records need a tokenizer to build their views")
    try:
        records = parse_records(items, str(path))
    except ValueError as e:  # RecordError and format detection are ValueErrors with a clear message
        raise DataError(f"{path}: not prompt/response pairs ({sorted(PAIR_KEYS[0])} or "
                        f"{sorted(PAIR_KEYS[1])}) and not persona records: {e}") from None
    examples, skipped = [], 0
    for rec in records:
        if rec.response is None:
            skipped += 1  # reference-free records (PersonaEmp style) have nothing to train on
            continue
        try:
            # The caps bound prompt + response (the collator cuts anything longer from the left, which would cut
            # the chat header off): count_response gives the views what the response leaves, so history is
            # dropped from the oldest end instead.
            v = build_views(rec, tokenizer, mode=context, warn=False, max_reasoner_tokens=max_reasoner_tokens,
                            max_generator_tokens=max_generator_tokens, count_response=True)
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None  # the views name the record
        examples.append(v.example())
    if not examples:
        raise DataError(f"{path}: {len(records)} persona records but none has a reference response to train on")
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} of {len(records)} persona records without a reference response",
                      stacklevel=3)
    return examples
