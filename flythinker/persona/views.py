"""Turn one :class:`PersonaRecord` into the generator view and the reasoner view (token ids).

Split context (docs/design.md): the reasoner reads the long personal view; the generator reads the short view
(the query, plus at most the record's one-line ``persona.short``). Shared context (the paper): both read the long
view. What the long view holds is the ``view`` option (:data:`VIEWS`):

- ``"full"``: persona profile, memories, past turns, situation and query (the broad view);
- ``"memories_query"``: the user's memories and the query only -- the PersonaEmp protocol, where persona,
  situation, category and relevant memories are for the judge, never for the policy;
- ``"auto"`` (default): ``"memories_query"`` for records whose ``meta["protocol"]`` is ``"personaemp"`` (what the
  PersonaEmp loader sets), else ``"full"``.

Both views go through the tokenizer's chat template as ``[system, user]`` messages with a generation prompt.
A tokenizer without a chat template gets :data:`FALLBACK_TEMPLATE` (documented below). Token budgets count
*prompt* tokens; over budget, history is dropped from the oldest end: past turns first, then memories (the
distilled facts outlive the raw conversation), then the start of the persona profile. The :class:`Views`
fields say what was dropped, and a warning is issued (``warn=False`` silences it, the fields remain).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from .records import PersonaRecord

DEFAULT_SYSTEM_PROMPT = "You are a helpful, warm assistant. Adapt your reply to this user."
# Used when the tokenizer has no chat template: "### <Role>\n<content>\n\n" per message; the generation prompt
# is "### Assistant\n"; an assistant message ends with the tokenizer's eos token (if any).
FALLBACK_TEMPLATE = "### {role}\n{content}{end}\n\n"
_SPEAKER = {"user": "User", "assistant": "Assistant", "system": "System"}
VIEWS = ("auto", "full", "memories_query")


def resolve_view(record: PersonaRecord, view: str = "auto") -> str:
    """``"full"`` or ``"memories_query"`` for ``record`` (see the module docstring)."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if view == "auto":
        return "memories_query" if record.meta.get("protocol") == "personaemp" else "full"
    return view


@dataclass
class Views:
    """Token ids of one record's two prompts and its response.

    ``generator_prompt_ids`` / ``reasoner_prompt_ids``: chat-templated prompts ending with the generation
    prompt (identical in shared mode). ``response_ids``: the reference response with its end-of-turn tokens,
    shared by both models (``None`` if the record has none). ``truncated_turns`` / ``truncated_memories``:
    how many past turns / memories were dropped (oldest first) to fit the budget; ``truncated_persona_words``:
    words cut from the start of the persona profile; ``generator_persona_dropped``: the short persona line was
    left out of the generator view to fit its budget.
    """

    generator_prompt_ids: list[int]
    reasoner_prompt_ids: list[int]
    response_ids: list[int] | None
    mode: str
    truncated_turns: int = 0
    truncated_memories: int = 0
    truncated_persona_words: int = 0
    generator_persona_dropped: bool = False

    @property
    def truncated(self) -> bool:
        return bool(self.truncated_turns or self.truncated_memories or self.truncated_persona_words
                    or self.generator_persona_dropped)

    def example(self, context: str | None = None) -> dict[str, list[int]]:
        """These views as one training example (the features :class:`~flythinker.training.FlyThinkerCollator`
        takes). The one place views become examples.

        ``context`` (default: the views' own ``mode``): ``"split"`` -> ``generator_prompt`` (the short view),
        ``reasoner_prompt`` (the long view), ``response``; ``"shared"`` -> ``prompt`` = the long view (what both
        models read in shared context), ``response``; ``"generator"`` -> ``prompt`` = the generator's own view
        (a generator trained alone on what it reads in split context), ``response``.
        """
        context = self.mode if context is None else context
        if self.response_ids is None:
            raise ValueError("these views have no response (the record has no reference): nothing to train on")
        if context == "split":
            return {"generator_prompt": self.generator_prompt_ids, "reasoner_prompt": self.reasoner_prompt_ids,
                    "response": self.response_ids}
        if context in ("shared", "generator"):
            prompt = self.reasoner_prompt_ids if context == "shared" else self.generator_prompt_ids
            return {"prompt": prompt, "response": self.response_ids}
        raise ValueError(f"context must be 'split', 'shared' or 'generator', got {context!r}")


def generate_inputs(views: list[Views], pad_id: int, context: str = "split") -> dict:
    """A batch of records' views as `FlyThinkerForCausalLM.generate` keyword inputs, left-padded with `pad_id`
    (the one place views become generation inputs, as :meth:`Views.example` is for training).

    ``context``: ``"split"`` -> ``input_ids`` / ``attention_mask`` `[B, P]` from the generator views and
    ``reasoner_input_ids`` / ``reasoner_attention_mask`` `[B, Q]` from the reasoner views; ``"shared"`` -> the
    long (reasoner) views as ``input_ids`` (what both models, or a generator given the full view, read);
    ``"generator"`` -> the generator views alone (a generator without its reasoner).
    """
    from flythinker.decode import left_pad

    if not views:
        raise ValueError("generate_inputs needs at least one record's views")
    if context not in ("split", "shared", "generator"):
        raise ValueError(f"context must be 'split', 'shared' or 'generator', got {context!r}")
    rows = [v.reasoner_prompt_ids if context == "shared" else v.generator_prompt_ids for v in views]
    ids, mask = left_pad(rows, pad_id)
    out = {"input_ids": ids, "attention_mask": mask}
    if context == "split":
        out["reasoner_input_ids"], out["reasoner_attention_mask"] = left_pad(
            [v.reasoner_prompt_ids for v in views], pad_id)
    return out


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Render messages with the tokenizer's chat template, or :data:`FALLBACK_TEMPLATE` if it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    eos = getattr(tokenizer, "eos_token", None) or ""
    out = "".join(FALLBACK_TEMPLATE.format(role=_SPEAKER[m["role"]], content=m["content"],
                                           end=eos if m["role"] == "assistant" else "") for m in messages)
    return out + ("### Assistant\n" if add_generation_prompt else "")


def _encode(tokenizer, text: str) -> list[int]:
    # Special tokens come from the template text itself; never let the tokenizer add a second BOS.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _long_system(record: PersonaRecord, system_prompt: str, n_drop: int, persona_skip: int,
                 full: bool = True) -> str:
    """System text of the long view with the ``n_drop`` oldest history items and ``persona_skip`` words gone
    (``full=False``: memories only)."""
    history = record.history if full else []
    n_turn_drop = min(n_drop, len(history))
    n_mem_drop = n_drop - n_turn_drop
    parts = [system_prompt] if system_prompt else []
    profile = record.persona.profile.split()[persona_skip:] if persona_skip else None
    profile_text = " ".join(profile) if profile is not None else record.persona.profile
    if full and profile_text.strip():
        parts.append("About the user:\n" + profile_text.strip())
    mems = record.memories[n_mem_drop:]
    if mems:
        parts.append("What you remember about the user (oldest first):\n" + "\n".join(
            f"- [{m.label}] {m.value}" if m.label else f"- {m.value}" for m in mems))
    turns = history[n_turn_drop:]
    if turns:
        parts.append("Earlier conversation with the user (oldest first):\n" + "\n".join(
            f"{_SPEAKER[t.role]}: {t.text}" for t in turns))
    return "\n\n".join(parts)


def _user_text(record: PersonaRecord, with_situation: bool) -> str:
    if with_situation and record.query.situation:
        return f"Situation: {record.query.situation}\n\n{record.query.text}"
    return record.query.text


def _messages(system: str, user: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}]


def _smallest_fitting(n: int, length: Callable[[int], int], budget: int) -> int | None:
    """Smallest k in [0, n] with length(k) <= budget (length non-increasing in k), or None."""
    if length(n) > budget:
        return None
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if length(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _long_view(record, tokenizer, system_prompt, budget, rid, full: bool = True) -> tuple[list[int], int, int]:
    """(ids, items dropped, persona words dropped) of the long view within ``budget`` prompt tokens
    (``full=False``: the memories-and-query view)."""
    user = _user_text(record, with_situation=full)
    n_items = (len(record.history) if full else 0) + len(record.memories)

    def ids(n_drop: int, persona_skip: int = 0) -> list[int]:
        system = _long_system(record, system_prompt, n_drop, persona_skip, full)
        return _encode(tokenizer, render_chat(tokenizer, _messages(system, user), add_generation_prompt=True))

    whole = ids(0)
    if budget is None or len(whole) <= budget:
        return whole, 0, 0
    k = _smallest_fitting(n_items, lambda k: len(ids(k)), budget)
    if k is not None:
        return ids(k), k, 0
    n_words = len(record.persona.profile.split()) if full else 0
    w = _smallest_fitting(n_words, lambda w: len(ids(n_items, w)), budget)
    if w is None:
        raise ValueError(f"record {rid!r}: the query alone needs {len(ids(n_items, n_words))} prompt tokens, "
                         f"over the budget of {budget}")
    return ids(n_items, w), n_items, w


def build_views(record: PersonaRecord, tokenizer, mode: str = "split", max_reasoner_tokens: int | None = None,
                max_generator_tokens: int | None = None, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                warn: bool = True, count_response: bool = False, view: str = "auto") -> Views:
    """Build the generator and reasoner views of ``record`` (see the module docstring).

    ``view``: what the long view holds (:data:`VIEWS`; ``"auto"`` follows the record's protocol).
    ``mode``: ``"split"`` or ``"shared"``. In shared mode both models read one view, so it must fit both
    budgets (the smaller one applies). Budgets count prompt tokens; with ``count_response`` they cap prompt +
    response (a sequence cap, like the collator's ``max_length``): each prompt gets what the response leaves (at
    least one token), so history is dropped from the oldest end instead of the collator cutting the chat header
    off. The response is tokenised once, before the budgets are applied.
    Raises ``ValueError`` when the query alone does not fit a budget.

    Args:
        record: the user and their query (persona, history oldest first, memories, the reference response if any).
        tokenizer: a Hugging Face tokenizer; its chat template renders both views (else :data:`FALLBACK_TEMPLATE`).
        mode: ``"split"`` (the reasoner reads the long view, the generator the short one) or ``"shared"``.
        max_reasoner_tokens, max_generator_tokens: token budgets of the two prompts (None: no limit).
        system_prompt: the system message of both views.
        warn: warn when a view was cut to fit its budget (the counts are on the returned views either way).
        count_response: the budgets cap prompt + response instead of the prompt alone.
        view: what the long view holds (:data:`VIEWS`; ``"auto"`` follows the record's protocol).

    Returns:
        :class:`Views`: token ids of the generator prompt, the reasoner prompt and the response, and what was cut.
    """
    if mode not in ("split", "shared"):
        raise ValueError(f"mode must be 'split' or 'shared', got {mode!r}")
    for name, b in (("max_reasoner_tokens", max_reasoner_tokens), ("max_generator_tokens", max_generator_tokens)):
        if b is not None and (not isinstance(b, int) or b <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {b!r}")
    rid = record.record_id
    full = resolve_view(record, view) == "full"
    short = (record.persona.short or "").strip() if full else ""
    g_messages = g_ids = None  # the split-context generator view before any budget (shared: the long view)
    if mode == "split":
        g_messages = _messages((system_prompt + (f"\nAbout the user: {short}" if short else "")).strip(),
                               record.query.text)
        g_ids = _encode(tokenizer, render_chat(tokenizer, g_messages, add_generation_prompt=True))
    response = None
    if record.response is not None:
        response = _response_ids(record, tokenizer, g_ids, g_messages, system_prompt)
        if count_response:
            max_reasoner_tokens = _prompt_budget(max_reasoner_tokens, len(response))
            max_generator_tokens = _prompt_budget(max_generator_tokens, len(response))
    if mode == "shared":
        budgets = [b for b in (max_reasoner_tokens, max_generator_tokens) if b is not None]
        r_ids, dropped, pw = _long_view(record, tokenizer, system_prompt, min(budgets) if budgets else None, rid,
                                        full)
        g_ids, persona_dropped = r_ids, False
    else:
        r_ids, dropped, pw = _long_view(record, tokenizer, system_prompt, max_reasoner_tokens, rid, full)
        g_ids, persona_dropped = _short_view(record, tokenizer, system_prompt, g_ids, short, max_generator_tokens)
    n_turns = min(dropped, len(record.history) if full else 0)
    views = Views(g_ids, r_ids, response, mode, truncated_turns=n_turns, truncated_memories=dropped - n_turns,
                  truncated_persona_words=pw, generator_persona_dropped=persona_dropped)
    if warn and views.truncated:
        warnings.warn(f"record {rid!r}: truncated to fit the token budget (dropped {views.truncated_turns} "
                      f"oldest turns, {views.truncated_memories} oldest memories, {pw} persona words"
                      f"{', the generator persona line' if persona_dropped else ''})", stacklevel=2)
    return views


def _prompt_budget(cap: int | None, n_response: int) -> int | None:
    return None if cap is None else max(cap - n_response, 1)


def _short_view(record, tokenizer, system_prompt, g_ids, short, budget) -> tuple[list[int], bool]:
    """(ids, persona line dropped) of the generator's split-context view within ``budget`` prompt tokens."""
    persona_dropped = False
    if budget is not None and len(g_ids) > budget and short:
        persona_dropped = True
        g_ids = _encode(tokenizer, render_chat(tokenizer, _messages(system_prompt, record.query.text),
                                               add_generation_prompt=True))
    if budget is not None and len(g_ids) > budget:
        raise ValueError(f"record {record.record_id!r}: the generator's query view needs {len(g_ids)} prompt "
                         f"tokens, over max_generator_tokens={budget}")
    return g_ids, persona_dropped


def _response_ids(record, tokenizer, prompt_ids, messages, system_prompt) -> list[int]:
    """The response as the template writes an assistant turn (with its end-of-turn tokens).

    Taken as the difference between the rendered conversation with and without the assistant turn; if the
    template does not render the prompt as a prefix, the response text plus the eos token is used instead.
    """
    if messages is None:  # shared view: the diff is the same whatever the prompt, so use the short one
        messages = _messages(system_prompt, record.query.text)
        prompt_ids = _encode(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))
    full = _encode(tokenizer, render_chat(
        tokenizer, messages + [{"role": "assistant", "content": record.response}], add_generation_prompt=False))
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids):]
    eos = getattr(tokenizer, "eos_token_id", None)
    return _encode(tokenizer, record.response) + ([eos] if eos is not None else [])
