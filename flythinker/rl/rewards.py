"""Reward functions for GRPO (TRL calling convention) and their weighted combination.

TRL calls every reward function as ``f(prompts=..., completions=..., completion_ids=..., **dataset_columns,
trainer_state=..., ...)`` and expects one float (or ``None``) per completion. The functions here are plain callables
with a ``__name__`` (TRL logs each under it):

- :class:`TraitReward`: rule-based and verifiable: the fraction of the user's hidden traits (``persona-empathy``:
  strategy, length, register) that :func:`flythinker.persona.metrics.classify_response` reads in the completion.
- :class:`LengthPenalty`: PERM's ``-coef * max(0, n_tokens - limit)`` (PERM ``perm/grpo.py``; coef 0.001, limit 768).
- :class:`JudgeReward`: a PERM or PereGRM judge (:mod:`flythinker.empathy`) as a reward.
- :func:`combine_rewards`: one callable computing ``sum_i w_i * r_i`` (TRL's ``reward_weights`` does the same
  inside the trainer; this form also works outside it, e.g. in benchmarks).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from flythinker.persona.empathy_dataset import TRAITS
from flythinker.persona.metrics import classify_response

RewardFn = Callable[..., list[float | None]]


def completion_text(completion: Any) -> str:
    """The text of one TRL completion: a plain string, or a conversational ``[{"role", "content"}]`` list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a str or a list of chat messages, got {type(completion).__name__}")


def _traits(value: Any) -> dict[str, str]:
    t = json.loads(value) if isinstance(value, str) else value
    if not isinstance(t, dict):
        raise TypeError(f"traits must be a dict (or its JSON), got {type(value).__name__}")
    return t


class TraitReward:
    """Fraction of ``dims`` (default all of :data:`TRAITS`) where the completion shows the user's trait.

    Needs a dataset column ``traits`` (dict or JSON string per row). Returns values in {0, 1/n, ..., 1}.
    """

    def __init__(self, dims: Sequence[str] = tuple(TRAITS)):
        unknown = [d for d in dims if d not in TRAITS]
        if unknown or not dims:
            raise ValueError(f"dims must be a non-empty subset of {list(TRAITS)}, got {list(dims)}")
        self.dims = tuple(dims)
        self.__name__ = "trait" if self.dims == tuple(TRAITS) else "trait_" + "_".join(self.dims)

    def __call__(self, completions: Sequence[Any], traits: Sequence[Any] | None = None, **_: Any) -> list[float]:
        if traits is None:
            raise ValueError("TraitReward needs a 'traits' dataset column (the user's hidden traits per row)")
        if len(traits) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(traits)} trait rows")
        out = []
        for c, t in zip(completions, traits):
            t = _traits(t)
            missing = [d for d in self.dims if d not in t]
            if missing:
                raise ValueError(f"TraitReward: a row's traits lack {missing} (got {sorted(t)}); the trait reward "
                                 "needs data with known traits, e.g. persona-empathy")
            pred = classify_response(completion_text(c))
            out.append(sum(pred[d] == t[d] for d in self.dims) / len(self.dims))
        return out


class LengthPenalty:
    """``-coef * max(0, n - limit)`` with ``n`` the completion's token count (PERM: coef 0.001, limit 768)."""

    def __init__(self, limit: int = 768, coef: float = 0.001):
        if limit < 0 or coef < 0:
            raise ValueError(f"limit and coef must be >= 0, got {limit}, {coef}")
        self.limit, self.coef = int(limit), float(coef)
        self.__name__ = "length_penalty"

    def __call__(self, completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None,
                 **_: Any) -> list[float]:
        if completion_ids is None:
            raise ValueError("LengthPenalty needs completion_ids (TRL passes them)")
        return [-self.coef * max(0, len(ids) - self.limit) for ids in completion_ids]


def fill_group_means(values: Sequence[float | None], prompts: Sequence[Any] | None) -> list[float | None]:
    """Each ``None`` becomes the mean of the valid values of its group (consecutive completions of the same
    prompt, as TRL orders them), so its GRPO advantage is 0; a group without any valid value stays ``None``
    (TRL's ``nansum`` then adds 0 to every completion of that group: no advantage either)."""
    if prompts is None:
        prompts = [None] * len(values)
    out: list[float | None] = list(values)
    start = 0
    for end in range(1, len(values) + 1):
        if end < len(values) and prompts[end] == prompts[start]:
            continue
        got = [v for v in values[start:end] if v is not None]
        if got:
            mean = sum(got) / len(got)
            out[start:end] = [mean if v is None else v for v in values[start:end]]
        start = end
    return out


class JudgeReward:
    """A :mod:`flythinker.empathy` judge as a reward: one reward per completion.

    The dataset must carry the columns the rubric's prompts read (``query`` and, for the personalised rubric,
    ``persona``/``memories``/``situation``; see :func:`flythinker.empathy.records.contexts_from_columns`).

    Failures (TRL sums reward functions with ``nansum``, so a ``None`` would silently count as reward 0, a strong
    penalty): under the judge's ``authors`` rules the judge already substitutes (PERM: batch mean; PereGRM:
    0.6 / 0.8); under ``strict`` a completion without a reward gets the mean reward of its group's other
    completions (advantage 0: it neither pulls nor pushes the policy), see :func:`fill_group_means`. The count
    is logged as ``judge/failed_completions`` (TRL's ``log_metric``) and kept in ``judge.report()``.
    """

    def __init__(self, judge: Any, name: str | None = None):
        self.judge = judge
        self.__name__ = name or f"{judge.rubric.name}_judge"

    def __call__(self, completions: Sequence[Any], prompts: Sequence[Any] | None = None, log_metric: Any = None,
                 **columns: Any) -> list[float | None]:
        from flythinker.empathy.records import contexts_from_columns

        contexts = contexts_from_columns(len(completions), columns)
        results = self.judge.score([completion_text(c) for c in completions], contexts)
        rewards = [r.reward for r in results]
        failed = sum(r is None for r in rewards)
        if callable(log_metric):
            log_metric("judge/failed_completions", float(failed))
        return fill_group_means(rewards, prompts) if failed else rewards


def combine_rewards(funcs: Sequence[tuple[RewardFn, float]], name: str = "combined") -> RewardFn:
    """One reward function ``sum_i w_i * f_i(...)``. A ``None`` from any part makes that completion's sum ``None``
    (nothing is added for it; note that TRL's own sum over reward functions is a ``nansum``, which would count
    that ``None`` as 0: :class:`JudgeReward` therefore never hands TRL a ``None`` for a completion whose group has
    a valid reward)."""
    if not funcs:
        raise ValueError("combine_rewards needs at least one (function, weight) pair")

    def combined(**kwargs: Any) -> list[float | None]:
        total: list[float | None] | None = None
        for f, w in funcs:
            vals = f(**kwargs)
            if total is None:
                total = [0.0] * len(vals)
            if len(vals) != len(total):
                raise ValueError(f"reward {getattr(f, '__name__', f)} returned {len(vals)} values, "
                                 f"expected {len(total)}")
            total = [None if (t is None or v is None) else t + w * v for t, v in zip(total, vals)]
        return total or []

    combined.__name__ = name
    return combined


def judge_reward(rubric: str, judge_model: str, base_url: str | None = None, rules: str = "strict") -> JudgeReward:
    """The judge reward ``flythinker rl --reward perm|peregrm`` trains on.

    Args:
        rubric: ``"perm"`` or ``"peregrm"``.
        judge_model: a local model name or path (loaded in process), or the served model's name with ``base_url``.
        base_url: an OpenAI-compatible endpoint (the judge then writes its answers; locally it scores the
            expected answer's likelihood).
        rules: the parsing and failure rules, ``"strict"`` or ``"authors"`` (:mod:`flythinker.empathy`).

    The policy writes a plain reply (no "# Analysis" part), so every PERM dimension reads the response; the judge
    runs with its ``training`` sampling settings.
    """
    from flythinker.empathy import EmpathyJudge, HFJudgeBackend, OpenAIJudgeBackend, get_rubric

    backend = OpenAIJudgeBackend(judge_model, base_url=base_url) if base_url else HFJudgeBackend(judge_model)
    spec = get_rubric(rubric, analysis=False) if rubric == "perm" else get_rubric(rubric)
    return JudgeReward(EmpathyJudge(spec, backend, mode="generate" if base_url else "expected",
                                    policy_format="response", rules=rules, role="training"))


__all__ = ["JudgeReward", "LengthPenalty", "RewardFn", "TraitReward", "combine_rewards", "completion_text",
           "fill_group_means", "judge_reward"]
