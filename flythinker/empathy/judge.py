"""The empathy judge: rubric + backend + scoring rules -> per-dimension scores, a reward, and counted failures.

``mode="generate"``: the judge writes text and the score is read under the ``rules`` (:mod:`.rules`:
``"authors"`` reproduces each rubric's repository, ``"strict"`` checks scale and denominators); ``trials``
samples per dimension are averaged. ``mode="expected"``: a local judge's probability-weighted score over the score
tokens (no text to parse; the rules then only decide what a failure becomes).

What the judge sees, per rubric: PERM scores resonation (on the policy's analysis when it writes one),
expression and reception with the persona, situation and message in view, and its bystander also sees the
situation and persona; PereGRM (training, ``dynamic_criteria``) asks ONE call per trial for criteria specific to
this person, an analysis and a ``\\boxed{}`` score, and its bystander sees only the message and the reply and
answers JSON; PereGRM with fixed criteria (evaluation) scores against criteria written beforehand (given in the
context, or written once per query by a ``criteria`` call and cached).

In expected mode a score whose score tokens hold less than ``min_score_mass`` of the judge's next-token probability
(default :data:`MIN_SCORE_MASS`, 5%) is a counted failure, not a score: the judge was not answering with a score
(SmolLM2-135M-Instruct, the default local judge, puts about 0.1% there on PERM prompts), and the weighted mean of
such a sliver is noise.

Failures are always counted (:meth:`EmpathyJudge.report`, each item's ``failures``). What they become depends on
the rules: ``authors`` -> PERM's batch mean / PereGRM's 0.6 and 0.8 (listed in ``fallbacks``); ``strict`` -> no
reward (``None``) unless ``fallback`` gives explicit replacement scores (also counted).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .aggregate import combine, length_penalty
from .backends import JudgeBackend
from .parse import JudgeParseError, parse_criteria, parse_policy_output, strip_think
from .prompts import JudgePrompt, bystander_prompt, criteria_prompt, dimension_prompt, dynamic_criteria_prompt
from .records import JudgeContext
from .rubrics import Rubric
from .rules import (
    PEREGRM_BYSTANDER_FALLBACK,
    PEREGRM_DIMENSION_FALLBACK,
    JudgeSettings,
    aggregate_authors,
    batch_mean_fill,
    check_rules,
    default_settings,
    read_score,
)

MIN_SCORE_MASS = 0.05


@dataclass
class JudgeResult:
    """One judged response: raw ``scores`` per dimension (1-5; bystander 0-100; ``None`` = unparsed), the
    ``reward`` (``None`` when a needed score is missing and the rules give no substitute), ``failures``
    (dimension -> reason), ``fallbacks`` (dimensions whose score is a substitute), ``format_ok``
    (analysis/response headings), ``criteria`` (fixed criteria used, per dimension), ``raw`` judge outputs."""

    scores: dict[str, float | None]
    reward: float | None
    failures: dict[str, str] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    format_ok: bool = True
    criteria: dict[str, str] = field(default_factory=dict)
    raw: dict[str, list[str]] = field(default_factory=dict)


def split_policy_output(text: str, rubric: str, rules: str, with_analysis: bool):
    """``(analysis, response, format_ok)`` of one completion. ``authors``: PERM reads ``# Analysis ... #
    Response ...`` and judges empty texts when the headings are missing; PereGRM judges the text after
    ``</think>`` when both think tags are present, else the whole text. ``strict``: the text after the last
    ``</think>``, then the headings when expected (missing headings: ``format_ok`` False)."""
    if rules == "authors" and rubric == "peregrm":
        if "<think>" in text and "</think>" in text:
            return text.split("<think>")[-1].split("</think>")[0].strip(), text.split("</think>")[-1].strip(), True
        return text, text, True
    po = parse_policy_output(strip_think(text) if rules == "strict" else text, with_analysis)
    return po.analysis, po.response, po.format_ok


class EmpathyJudge:
    """Score responses with ``rubric`` on ``backend`` under ``rules`` (``"authors"`` or ``"strict"``).

    Args:
        mode: ``"generate"`` (parse text) or ``"expected"`` (score-token probabilities; local judges).
        rules: parsing and failure rules (module docstring of :mod:`flythinker.empathy.rules`).
        role: ``"training"`` or ``"evaluation"``: which of the papers' judge settings apply by default.
        trials, temperature, top_p, max_new_tokens: override the role's settings (``None``: the default of
            :func:`~flythinker.empathy.rules.default_settings`; ``authors``: the papers' values).
        criteria_settings: sampling of the fixed-criteria calls (default: the rules' ``criteria`` role).
        policy_format: ``"analysis_response"`` (PERM: ``# Analysis`` then ``# Response``) or ``"response"``.
        fallback: ``strict`` only: explicit replacement scores ``{"dimension": s, "bystander": b}``.
        use_bystander: judge the bystander (default: yes, except PereGRM evaluation under ``authors``).
        length_limit, length_coef: ``strict`` only: a length penalty on the response's word count (PERM counts
            tokens: use :class:`flythinker.rl.LengthPenalty` for that).
        min_score_mass: expected mode, the least probability on the score tokens that counts as a score.

    A rubric dimension that reads the policy's analysis needs ``policy_format="analysis_response"`` (a plain
    response has no analysis to judge: use e.g. ``get_rubric("perm", analysis=False)``).
    """

    def __init__(self, rubric: Rubric, backend: JudgeBackend, mode: str = "generate", rules: str = "strict",
                 role: str = "training", trials: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, max_new_tokens: int | None = None,
                 criteria_settings: JudgeSettings | None = None, policy_format: str = "response",
                 fallback: Mapping[str, float] | None = None, use_bystander: bool | None = None,
                 length_limit: int = 768, length_coef: float = 0.0, min_score_mass: float = MIN_SCORE_MASS):
        self.rules = check_rules(rules)
        self._check(mode, policy_format, fallback, length_coef, role)
        _check_numbers(rubric, fallback or {}, min_score_mass, 0.0 if temperature is None else temperature)
        reads_analysis = [d.name for d in rubric.dimensions if d.reads == "analysis"]
        if reads_analysis and policy_format != "analysis_response":
            raise ValueError(f"rubric {rubric.name!r} judges {', '.join(reads_analysis)} on the policy's analysis "
                             f"part, but policy_format={policy_format!r} has none (it would judge an empty "
                             "analysis): build the rubric with analysis=False, or use "
                             "policy_format='analysis_response'")
        base = default_settings(rules, rubric.name, role)
        self.settings = JudgeSettings(
            base.temperature if temperature is None else float(temperature), base.top_p if top_p is None else top_p,
            base.max_new_tokens if max_new_tokens is None else int(max_new_tokens),
            base.trials if trials is None else int(trials))
        s = self.settings
        if s.trials < 1 or (s.trials > 1 and s.temperature <= 0 and mode == "generate"):
            raise ValueError(f"trials={s.trials} needs trials >= 1, and temperature > 0 when trials > 1")
        self.criteria_settings = criteria_settings or default_settings(rules, rubric.name, "criteria")
        self.rubric, self.backend, self.mode, self.role = rubric, backend, mode, role
        self.policy_format, self.fallback = policy_format, dict(fallback or {})
        if use_bystander is None:
            use_bystander = not (rules == "authors" and rubric.name == "peregrm" and role == "evaluation")
        self.use_bystander = use_bystander and rubric.bystander is not None
        self.length_limit, self.length_coef = length_limit, length_coef
        self.min_score_mass = float(min_score_mass)
        self.stats: Counter = Counter()
        self._criteria_cache: dict[tuple[str, str], str] = {}

    @property
    def trials(self) -> int:
        return self.settings.trials

    @property
    def temperature(self) -> float:
        return self.settings.temperature

    @property
    def max_new_tokens(self) -> int | None:
        return self.settings.max_new_tokens

    def _check(self, mode, policy_format, fallback, length_coef, role) -> None:
        if mode not in ("generate", "expected"):
            raise ValueError(f"mode must be 'generate' or 'expected', got {mode!r}")
        if policy_format not in ("response", "analysis_response"):
            raise ValueError(f"policy_format must be 'response' or 'analysis_response', got {policy_format!r}")
        if role not in ("training", "evaluation"):
            raise ValueError(f"role must be 'training' or 'evaluation', got {role!r}")
        unknown = set(fallback or {}) - {"dimension", "bystander"}
        if unknown:
            raise ValueError(f"fallback keys must be 'dimension' and/or 'bystander', got {sorted(unknown)}")
        if self.rules == "authors" and fallback:
            raise ValueError("rules='authors' substitutes failures as the authors do (PERM: batch mean; PereGRM: "
                             "0.6 / 0.8); an explicit fallback needs rules='strict'")
        if self.rules == "authors" and length_coef:
            raise ValueError("PERM's length penalty counts completion tokens: use flythinker.rl.LengthPenalty "
                             "beside the judge reward (rules='authors' has no word-count penalty)")

    def check_backend(self) -> None:
        """ValueError now, before any judging, if expected mode cannot read a score scale the prompts ask for (a
        value with no single-token spelling in the judge's tokenizer)."""
        if self.mode != "expected" or not hasattr(self.backend, "score_token_ids"):
            return
        ctx = JudgeContext(query="ok")
        prompts = [dimension_prompt(d, ctx, "ok", True, None) for d in self.rubric.dimensions]
        if self.use_bystander:
            prompts.append(bystander_prompt(self.rubric.bystander, ctx, "ok", True))
        for p in prompts:
            self.backend.score_token_ids(p.lo, p.hi)

    # ------------------------------------------------------------------ fixed criteria (PereGRM evaluation)
    def _criteria(self, contexts: Sequence[JudgeContext]) -> dict[tuple[int, str], str]:
        """Per (item, dimension) fixed criteria: given in the context, cached, or written once by the judge."""
        out: dict[tuple[int, str], str] = {}
        todo: list[tuple[int, str, JudgePrompt, tuple[str, str]]] = []
        for i, ctx in enumerate(contexts):
            for d in self.rubric.dimensions:
                key = (ctx.item_id or ctx.query, d.name)
                if d.name in ctx.criteria:
                    out[(i, d.name)] = ctx.criteria[d.name]
                elif key in self._criteria_cache:
                    out[(i, d.name)] = self._criteria_cache[key]
                else:
                    todo.append((i, d.name, criteria_prompt(d, ctx), key))
        if todo:
            cs = self.criteria_settings
            texts = self.backend.generate([t[2] for t in todo], n=1, temperature=cs.temperature, top_p=cs.top_p,
                                          max_new_tokens=cs.max_new_tokens)
            for (i, name, _, key), (text,) in zip(todo, texts):
                self.stats["criteria_calls"] += 1
                try:
                    crit = parse_criteria(text)
                except JudgeParseError:
                    self.stats["criteria_failures"] += 1
                    crit = ""  # scored without criteria; counted above
                out[(i, name)] = crit
                if crit:
                    self._criteria_cache[key] = crit
        return out

    # ------------------------------------------------------------------ prompts
    def _dimension_job(self, d, ctx, analysis, response, crit) -> JudgePrompt:
        text = analysis if d.reads == "analysis" else response
        expected = self.mode == "expected"
        if self.rubric.name == "peregrm" and self.rubric.dynamic_criteria and not expected:
            return dynamic_criteria_prompt(d, ctx, text)
        return dimension_prompt(d, ctx, text, expected, crit)

    def _prompts(self, responses, contexts):
        """All score prompts: list of (item index, dimension, prompt); the split outputs; fixed criteria."""
        with_analysis = self.policy_format == "analysis_response"
        split = [split_policy_output(r, self.rubric.name, self.rules, with_analysis) for r in responses]
        fixed = self.rubric.name == "peregrm" and not self.rubric.dynamic_criteria
        crit = self._criteria(contexts) if fixed else {}
        jobs = []
        for i, ((analysis, response, _), ctx) in enumerate(zip(split, contexts)):
            for d in self.rubric.dimensions:
                jobs.append((i, d.name, self._dimension_job(d, ctx, analysis, response, crit.get((i, d.name)))))
            if self.use_bystander:
                jobs.append((i, "bystander", bystander_prompt(self.rubric.bystander, ctx, response,
                                                              self.mode == "expected", style=self.rubric.name)))
        return jobs, split, crit

    # ------------------------------------------------------------------ running and reading
    def _read_expected(self, prompts) -> list[tuple[list[float], list[str], str | None, int]]:
        res = []
        for p, (value, mass) in zip(prompts, self.backend.expected_scores(prompts)):
            self.stats["score_calls"] += 1
            self.stats["score_token_mass_sum"] += mass
            if value != value:  # NaN: no probability on any score token
                self.stats["parse_failures"] += 1
                res.append(([], [], "no probability mass on the score tokens", 1))
                continue
            if mass < self.min_score_mass:
                self.stats["low_mass_failures"] += 1
                self.stats["parse_failures"] += 1
                res.append(([], [f"expected={value:.4f} mass={mass:.4f}"],
                            f"only {mass:.2%} of the probability on the score tokens (below min_score_mass "
                            f"{self.min_score_mass:.2%})", 1))
                continue
            if p.dimension == "bystander":
                value = 100.0 * (value - 1.0) / 4.0
            res.append(([value], [f"expected={value:.4f} mass={mass:.4f}"], None, 0))
        return res

    def _read_texts(self, prompts) -> list[tuple[list[float], list[str], str | None, int]]:
        """Per prompt: (values of the samples that parsed, raw texts, last failure reason, failed samples). The
        empathy dimensions are sampled ``trials`` times; the bystander once (as in both papers)."""
        s = self.settings
        texts: list[list[str]] = [[] for _ in prompts]
        for n, idx in ((s.trials, [i for i, p in enumerate(prompts) if p.dimension != "bystander"]),
                       (1, [i for i, p in enumerate(prompts) if p.dimension == "bystander"])):
            if idx:
                got = self.backend.generate([prompts[i] for i in idx], n=n, temperature=s.temperature,
                                            top_p=s.top_p, max_new_tokens=s.max_new_tokens)
                for i, t in zip(idx, got):
                    texts[i] = t
        res = []
        for p, samples in zip(prompts, texts):
            vals, reason, failed = [], None, 0
            for t in samples:
                self.stats["score_calls"] += 1
                try:
                    vals.append(read_score(t, self.rules, self.rubric.name, p.marker, p.lo, p.hi))
                except JudgeParseError as e:
                    self.stats["parse_failures"] += 1
                    reason, failed = str(e), failed + 1
            res.append((vals, list(samples), reason, failed))
        return res

    def _value(self, name: str, vals: list[float], failed: int) -> tuple[float | None, bool]:
        """(score, substituted): PereGRM's training reward under ``authors`` replaces each failed trial by its
        fixed fallback (its evaluation script leaves unparsed scores out instead)."""
        if self.rules == "authors" and self.rubric.name == "peregrm" and failed and self.role == "training":
            fb = PEREGRM_BYSTANDER_FALLBACK if name == "bystander" else PEREGRM_DIMENSION_FALLBACK
            vals = vals + [fb] * failed
            self.stats["fallbacks"] += failed
            return sum(vals) / len(vals), True
        return (sum(vals) / len(vals) if vals else None), False

    def score(self, responses: Sequence[str], contexts: Sequence[JudgeContext]) -> list[JudgeResult]:
        """Judge ``responses[i]`` as the reply to ``contexts[i]``; one :class:`JudgeResult` each. Under
        ``authors`` PERM's batch mean is taken over this call's items."""
        if len(responses) != len(contexts):
            raise ValueError(f"{len(responses)} responses but {len(contexts)} contexts")
        jobs, split, crit = self._prompts(responses, contexts)
        results = [JudgeResult(scores={}, reward=None, format_ok=ok) for _, _, ok in split]
        for r in results:
            if not r.format_ok:
                self.stats["format_failures"] += 1
                r.failures["format"] = "no '# Analysis' / '# Response' headings"
        prompts = [j[2] for j in jobs]
        read = self._read_expected(prompts) if self.mode == "expected" else self._read_texts(prompts)
        for (i, name, _), (vals, raw, reason, failed) in zip(jobs, read):
            r = results[i]
            r.raw[name] = raw
            r.scores[name], substituted = self._value(name, vals, failed)
            if reason is not None:
                r.failures[name] = reason
            if substituted:
                r.fallbacks.append(name)
        if self.rules == "authors" and self.rubric.name == "perm":
            self._batch_mean(results)
        for i, r in enumerate(results):
            r.criteria = {d.name: crit[(i, d.name)] for d in self.rubric.dimensions if (i, d.name) in crit}
            r.reward = self._reward_authors(r) if self.rules == "authors" else self._reward_strict(r, split[i][1])
            self.stats["items"] += 1
            self.stats["items_without_reward"] += r.reward is None
        return results

    def _batch_mean(self, results: list[JudgeResult]) -> None:
        names = [d.name for d in self.rubric.dimensions] + (["bystander"] if self.use_bystander else [])
        for name in names:
            filled = batch_mean_fill([r.scores.get(name) for r in results], name)
            for r, v in zip(results, filled):
                if r.scores.get(name) is None:
                    r.scores[name] = v
                    r.fallbacks.append(name)
                    self.stats["fallbacks"] += 1

    def _reward_authors(self, r: JudgeResult) -> float | None:
        his = {d.name: d.hi for d in self.rubric.dimensions}
        needed = list(his) + (["bystander"] if self.use_bystander else [])
        if any(r.scores.get(n) is None for n in needed):  # PereGRM evaluation: unparsed scores are left out
            return None
        reward = aggregate_authors({n: r.scores[n] for n in his}, his, self.rubric.aggregation, self.rubric.name)
        if self.use_bystander and self.rubric.bystander_coef:
            reward += self.rubric.bystander_coef * (r.scores["bystander"] / 100.0 - 1.0)
        return reward

    def _reward_strict(self, r: JudgeResult, response: str) -> float | None:
        dims = {d.name: d.hi for d in self.rubric.dimensions}
        scores = {}
        for name in list(dims) + (["bystander"] if self.use_bystander else []):
            v = r.scores.get(name)
            key = "bystander" if name == "bystander" else "dimension"
            if v is None:
                if key not in self.fallback:
                    return None
                v = self.fallback[key]
                r.fallbacks.append(name)
                self.stats["fallbacks"] += 1
            scores[name] = v
        if not r.format_ok and "dimension" not in self.fallback:
            return None
        by = scores.pop("bystander", None)
        pen = length_penalty(len(response.split()), self.length_limit, self.length_coef) if self.length_coef else 0.0
        return combine(scores, dims, self.rubric.aggregation, by, self.rubric.bystander_coef, pen)

    def report(self) -> dict[str, float]:
        """Counts so far: items, calls, parse/format/criteria failures, fallbacks, mean score-token mass."""
        s = dict(self.stats)
        calls = s.get("score_calls", 0)
        if self.mode == "expected" and calls:
            s["mean_score_token_mass"] = s.pop("score_token_mass_sum") / calls
        s.setdefault("parse_failures", 0)
        s.setdefault("fallbacks", 0)
        s["parse_failure_rate"] = s["parse_failures"] / calls if calls else 0.0
        return s


def _check_numbers(rubric: Rubric, fallback: Mapping[str, float], min_score_mass: float, temperature: float) -> None:
    """ValueError for a non-finite or out-of-range fallback score, mass threshold or temperature."""
    import math

    scales = {"dimension": (min(d.lo for d in rubric.dimensions), max(d.hi for d in rubric.dimensions))}
    if rubric.bystander is not None:
        scales["bystander"] = (rubric.bystander.lo, rubric.bystander.hi)
    for key, value in fallback.items():
        lo, hi = scales.get(key, (-math.inf, math.inf))
        if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"fallback {key!r} must be a number in [{lo}, {hi}], got {value!r}")
    if not (math.isfinite(min_score_mass) and 0.0 <= min_score_mass <= 1.0):
        raise ValueError(f"min_score_mass must be in [0, 1], got {min_score_mass!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")


__all__ = ["MIN_SCORE_MASS", "EmpathyJudge", "JudgeResult", "split_policy_output"]
