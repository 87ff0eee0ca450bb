"""Judge backends behind one interface.

A backend turns :class:`~flythinker.empathy.prompts.JudgePrompt` lists into text (``generate``) and, when it can
see token probabilities, into probability-weighted scores (``expected_scores``):

- :class:`HFJudgeBackend`: any local HF causal LM, batched (left padding), chat template applied; the default is
  the offline SmolLM2-135M-Instruct (``flythinker.hub.load_pretrained("smollm2-135m-instruct")``).
- :class:`OpenAIJudgeBackend`: an OpenAI-compatible ``/v1/chat/completions`` endpoint through the ``openai``
  client, with a per-request timeout, retries (the client's exponential backoff) and a concurrency limit.
- :class:`CallableJudgeBackend`: a plain Python function ``f(messages) -> str``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .prompts import JudgePrompt


class JudgeBackendError(RuntimeError):
    """The judge could not be asked: an unreachable or failing endpoint, a timeout, a malformed answer (the message
    is one line naming the endpoint and what went wrong)."""


class JudgeBackend:
    """Interface. ``generate``: one completion text per prompt (``n`` independent samples each: a list of lists;
    ``top_p`` / ``max_new_tokens`` ``None``: the server's default, or top-p 1 and
    :data:`~flythinker.empathy.rules.LOCAL_MAX_NEW_TOKENS` for a local model).
    ``expected_scores``: per prompt ``(expected score, probability mass on the score tokens)``."""

    name = "backend"

    def generate(self, prompts: Sequence[JudgePrompt], *, n: int = 1, temperature: float = 0.0,
                 top_p: float | None = None, max_new_tokens: int | None = 256) -> list[list[str]]:
        raise NotImplementedError

    def expected_scores(self, prompts: Sequence[JudgePrompt]) -> list[tuple[float, float]]:
        raise NotImplementedError(f"{type(self).__name__} has no access to token probabilities: use mode='generate'")


class HFJudgeBackend(JudgeBackend):
    """A local causal LM judge. ``model``: a loaded model, or a name/path for ``flythinker.hub.load_pretrained``
    (default ``"smollm2-135m-instruct"``). ``batch_size`` prompts run per forward / generate call."""

    name = "hf"

    def __init__(self, model: Any = "smollm2-135m-instruct", tokenizer: Any = None, batch_size: int = 8,
                 seed: int = 0):
        if isinstance(model, str) or hasattr(model, "__fspath__"):
            from flythinker.hub import load_pretrained

            self.model_name = str(model)
            model, tokenizer = load_pretrained(model)
        else:
            self.model_name = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
            if tokenizer is None:
                raise ValueError("HFJudgeBackend needs the tokenizer when given a model object")
        self.model, self.tokenizer = model.eval(), tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = int(batch_size)
        self.seed = seed
        self._score_ids: dict[tuple[int, int], dict[int, list[int]]] = {}

    def _text(self, p: JudgePrompt) -> str:
        from flythinker.persona.views import render_chat

        return render_chat(self.tokenizer, p.messages, add_generation_prompt=True) + p.prefix

    def _batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        L = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), L), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, L - len(r):] = 1
        dev = next(self.model.parameters()).device
        return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}

    @torch.no_grad()
    def generate(self, prompts, *, n=1, temperature=0.0, top_p=None, max_new_tokens=256):
        from .rules import LOCAL_MAX_NEW_TOKENS

        max_new_tokens = LOCAL_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        texts = [self._text(p) for p in prompts]
        out: list[list[str]] = []
        g = torch.Generator().manual_seed(self.seed)
        for s in range(0, len(texts), self.batch_size):
            batch = self._batch(texts[s:s + self.batch_size])
            kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
                                  "num_return_sequences": n}
            if temperature > 0:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
                kw.update(do_sample=True, temperature=temperature, top_p=1.0 if top_p is None else top_p, top_k=0)
            else:
                if n > 1:
                    raise ValueError("n > 1 samples need temperature > 0 (greedy samples are identical)")
                kw.update(do_sample=False)
            seq = self.model.generate(**batch, **kw)
            dec = self.tokenizer.batch_decode(seq[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [dec[i * n:(i + 1) * n] for i in range(len(dec) // n)]
        return out

    def score_token_ids(self, lo: int, hi: int) -> dict[int, list[int]]:
        """``{value: [token ids]}``: the single tokens that spell each value in ``[lo, hi]`` (with and without a
        leading space). Values with no single-token spelling raise ``ValueError`` (expected mode needs them)."""
        key = (lo, hi)
        if key not in self._score_ids:
            table: dict[int, list[int]] = {}
            for v in range(lo, hi + 1):
                ids = set()
                for spelling in (str(v), f" {v}"):
                    enc = self.tokenizer(spelling, add_special_tokens=False)["input_ids"]
                    # one token that decodes back to the number (an <unk> would be one token too)
                    if len(enc) == 1 and self.tokenizer.decode(enc).strip() == str(v):
                        ids.add(enc[0])
                if not ids:
                    raise ValueError(f"score {v} is not a single token for this tokenizer: expected mode needs "
                                     "single-token scores")
                table[v] = sorted(ids)
            self._score_ids[key] = table
        return self._score_ids[key]

    @torch.no_grad()
    def expected_scores(self, prompts):
        out: list[tuple[float, float]] = []
        for s in range(0, len(prompts), self.batch_size):
            chunk = prompts[s:s + self.batch_size]
            batch = self._batch([self._text(p) for p in chunk])
            logits = self.model(**batch, logits_to_keep=1).logits[:, -1].float()  # [b, V]
            probs = torch.softmax(logits, dim=-1)
            for row, p in zip(probs, chunk):
                table = self.score_token_ids(p.lo, p.hi)
                mass = {v: float(row[ids].sum()) for v, ids in table.items()}
                total = sum(mass.values())
                if total <= 0 or math.isnan(total):
                    out.append((float("nan"), 0.0))
                else:
                    out.append((sum(v * m for v, m in mass.items()) / total, total))
        return out


class OpenAIJudgeBackend(JudgeBackend):
    """An OpenAI-compatible chat endpoint. ``timeout`` (s, per request), ``max_retries`` (the client retries
    connection errors, 408/409/429 and 5xx with exponential backoff), ``max_concurrency`` requests in flight."""

    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, max_concurrency: int = 4, seed: int | None = 0):
        try:
            import openai
        except ImportError as e:
            raise ImportError("the HTTP judge needs the openai client: pip install 'flythinker[judge]'") from e
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.model_name = model
        self.base_url = base_url
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout,
                                    max_retries=max_retries)
        self.max_concurrency = int(max_concurrency)
        self.seed = seed

    def _one(self, p: JudgePrompt, n: int, temperature: float, top_p: float | None,
             max_new_tokens: int | None) -> list[str]:
        import openai

        messages = list(p.messages) + ([{"role": "assistant", "content": p.prefix}] if p.prefix else [])
        where = f"judge endpoint {self.base_url or 'OpenAI'} (model {self.model_name!r})"
        extra: dict[str, Any] = {}
        if top_p is not None:
            extra["top_p"] = top_p
        if max_new_tokens is not None:
            extra["max_tokens"] = max_new_tokens
        try:
            resp = self.client.chat.completions.create(model=self.model_name, messages=messages, n=n,
                                                       temperature=temperature, seed=self.seed, **extra)
        except openai.OpenAIError as exc:  # connection refused, timeout, HTTP 4xx/5xx after the retries
            raise JudgeBackendError(f"{where}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
        except ValueError as exc:  # a body that is not JSON
            raise JudgeBackendError(f"{where}: the answer is not valid JSON ({exc})") from exc
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list) or not all(isinstance(getattr(getattr(c, "message", None), "content", ""),
                                                               (str, type(None))) for c in choices):
            raise JudgeBackendError(f"{where}: the answer is not a chat completion (no list of choices with "
                                    "message.content)")
        texts = [c.message.content or "" for c in choices]
        if len(texts) != n:
            raise JudgeBackendError(f"{where}: the answer has {len(texts)} choices, asked for {n}")
        return [p.prefix + t if p.prefix else t for t in texts]

    def generate(self, prompts, *, n=1, temperature=0.0, top_p=None, max_new_tokens=256):
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(lambda p: self._one(p, n, temperature, top_p, max_new_tokens), prompts))


class CallableJudgeBackend(JudgeBackend):
    """A Python function as the judge: ``fn(messages: list[dict]) -> str`` (called ``n`` times per prompt)."""

    name = "callable"

    def __init__(self, fn: Callable[[list[dict[str, str]]], str]):
        if not callable(fn):
            raise TypeError(f"expected a callable, got {type(fn).__name__}")
        self.fn = fn
        self.model_name = getattr(fn, "__name__", "callable")

    def generate(self, prompts, *, n=1, temperature=0.0, top_p=None, max_new_tokens=256):
        out = []
        for p in prompts:
            msgs = list(p.messages) + ([{"role": "assistant", "content": p.prefix}] if p.prefix else [])
            texts = []
            for _ in range(n):
                t = self.fn(msgs)
                if not isinstance(t, str):
                    raise TypeError(f"the judge callable must return str, got {type(t).__name__}")
                texts.append(p.prefix + t if p.prefix else t)
            out.append(texts)
        return out


__all__ = ["CallableJudgeBackend", "HFJudgeBackend", "JudgeBackend", "JudgeBackendError", "OpenAIJudgeBackend"]
