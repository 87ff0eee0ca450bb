"""The empathy judge: rubric + backend -> per-dimension scores, a reward, and counted failures.

``mode="generate"``: the judge writes text and the rubric's marker is parsed (``Score: N``, ``\\boxed{N}``,
``Total Score: N/100``); ``trials`` samples per dimension are averaged over those that parse (PereGRM: 4).
``mode="expected"``: a local judge's probability-weighted score over the score tokens (no text to parse).

In expected mode a score whose score tokens hold less than ``min_score_mass`` of the judge's next-token probability
(default :data:`MIN_SCORE_MASS`, 5%) is a counted failure, not a score: the judge was not answering with a score
(SmolLM2-135M-Instruct, the default local judge, puts about 0.1% there on PERM prompts), and the weighted mean of
such a sliver is noise.

An output that does not parse is counted in :attr:`EmpathyJudge.stats` and in the item's ``failures``; the item's
reward is then ``None`` unless ``fallback`` gives explicit replacement scores (``{"dimension": 3.0,
"bystander": 80.0}``: PereGRM's silent defaults were 0.6*5 and 80), which are also counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .aggregate import combine, length_penalty
from .backends import JudgeBackend
from .parse import JudgeParseError, parse_criteria, parse_policy_output, parse_score, strip_think
from .prompts import JudgePrompt, bystander_prompt, criteria_prompt, dimension_prompt
from .records import JudgeContext
from .rubrics import Rubric

MIN_SCORE_MASS = 0.05


@dataclass
class JudgeResult:
    """One judged response: raw ``scores`` per dimension (1-5; bystander 0-100; ``None`` = unparsed), the
    ``reward`` (``None`` when a needed score is missing and no fallback is set), ``failures`` (dimension ->
    reason), ``fallbacks`` (dimensions whose score is the fallback), ``format_ok`` (analysis/response headings),
    ``criteria`` (PereGRM, per dimension), ``raw`` judge outputs."""

    scores: dict[str, float | None]
    reward: float | None
    failures: dict[str, str] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    format_ok: bool = True
    criteria: dict[str, str] = field(default_factory=dict)
    raw: dict[str, list[str]] = field(default_factory=dict)


class EmpathyJudge:
    """Score responses with ``rubric`` on ``backend``.

    ``policy_format``: ``"analysis_response"`` (PERM: ``# Analysis`` then ``# Response``) or ``"response"``
    (plain). ``trials``: samples per dimension in generate mode (``temperature`` must be > 0 for more than one).
    ``length_limit``/``length_coef``: PERM's length penalty on the response's word count (off when coef is 0).
    ``min_score_mass``: expected mode, the least probability on the score tokens that counts as a score (see the
    module docstring). A rubric dimension that reads the policy's analysis needs ``policy_format=
    "analysis_response"`` (a plain response has no analysis to judge: use e.g. ``get_rubric("perm",
    analysis=False)``).
    """

    def __init__(self, rubric: Rubric, backend: JudgeBackend, mode: str = "generate", trials: int = 1,
                 temperature: float = 0.0, max_new_tokens: int = 192, policy_format: str = "response",
                 fallback: Mapping[str, float] | None = None, use_bystander: bool = True, length_limit: int = 768,
                 length_coef: float = 0.0, min_score_mass: float = MIN_SCORE_MASS):
        if mode not in ("generate", "expected"):
            raise ValueError(f"mode must be 'generate' or 'expected', got {mode!r}")
        if policy_format not in ("response", "analysis_response"):
            raise ValueError(f"policy_format must be 'response' or 'analysis_response', got {policy_format!r}")
        if trials < 1 or (trials > 1 and temperature <= 0 and mode == "generate"):
            raise ValueError(f"trials={trials} needs trials >= 1, and temperature > 0 when trials > 1")
        unknown = set(fallback or {}) - {"dimension", "bystander"}
        if unknown:
            raise ValueError(f"fallback keys must be 'dimension' and/or 'bystander', got {sorted(unknown)}")
        _check_numbers(rubric, fallback or {}, min_score_mass, temperature)
        reads_analysis = [d.name for d in rubric.dimensions if d.reads == "analysis"]
        if reads_analysis and policy_format != "analysis_response":
            raise ValueError(f"rubric {rubric.name!r} judges {', '.join(reads_analysis)} on the policy's analysis "
                             f"part, but policy_format={policy_format!r} has none (it would judge an empty "
                             "analysis): build the rubric with analysis=False, or use "
                             "policy_format='analysis_response'")
        self.rubric, self.backend, self.mode = rubric, backend, mode
        self.trials, self.temperature, self.max_new_tokens = trials, temperature, max_new_tokens
        self.policy_format, self.fallback = policy_format, dict(fallback or {})
        self.use_bystander = use_bystander and rubric.bystander is not None
        self.length_limit, self.length_coef = length_limit, length_coef
        self.min_score_mass = float(min_score_mass)
        self.stats: Counter = Counter()
        self._criteria_cache: dict[tuple[str, str], str] = {}

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

    # ------------------------------------------------------------------ criteria (PereGRM)
    def _criteria(self, items: Sequence[tuple[int, JudgeContext]]) -> dict[tuple[int, str], str]:
        """Per (item, dimension) criteria: given in the context (fixed), cached, or written by the judge."""
        out: dict[tuple[int, str], str] = {}
        todo: list[tuple[int, str, JudgePrompt, tuple[str, str]]] = []
        for i, ctx in items:
            for d in self.rubric.dimensions:
                if d.name in ctx.criteria:
                    out[(i, d.name)] = ctx.criteria[d.name]
                    continue
                key = (ctx.item_id or ctx.query, d.name)
                if not self.rubric.dynamic_criteria and key in self._criteria_cache:
                    out[(i, d.name)] = self._criteria_cache[key]
                    continue
                todo.append((i, d.name, criteria_prompt(d, ctx), key))
        if todo:
            # dynamic criteria are sampled (a fresh view per call, as PereGRM); fixed ones are written once, greedily
            temp = self.temperature if self.rubric.dynamic_criteria else 0.0
            texts = self.backend.generate([t[2] for t in todo], n=1, temperature=temp,
                                          max_new_tokens=self.max_new_tokens)
            for (i, name, _, key), (text,) in zip(todo, texts):
                self.stats["criteria_calls"] += 1
                try:
                    crit = parse_criteria(text)
                except JudgeParseError:
                    self.stats["criteria_failures"] += 1
                    crit = ""  # scored without user-specific criteria; counted above
                out[(i, name)] = crit
                if not self.rubric.dynamic_criteria and crit:
                    self._criteria_cache[key] = crit
        return out

    # ------------------------------------------------------------------ scoring
    def _prompts(self, responses, contexts):
        """All score prompts: list of (item index, dimension, prompt); and per-item policy-format flags."""
        parsed = [parse_policy_output(strip_think(r), self.policy_format == "analysis_response") for r in responses]
        crit = self._criteria(list(enumerate(contexts))) if self.rubric.name == "peregrm" else {}
        expected = self.mode == "expected"
        jobs = []
        for i, (po, ctx) in enumerate(zip(parsed, contexts)):
            for d in self.rubric.dimensions:
                text = po.analysis if d.reads == "analysis" else po.response
                jobs.append((i, d.name, dimension_prompt(d, ctx, text, expected, crit.get((i, d.name)))))
            if self.use_bystander:
                jobs.append((i, "bystander", bystander_prompt(self.rubric.bystander, ctx, po.response, expected)))
        return jobs, parsed, crit

    def _run(self, jobs) -> list[tuple[list[float], list[str], str | None]]:
        """Per job: (parsed values, raw texts, failure reason or None)."""
        prompts = [j[2] for j in jobs]
        if self.mode == "expected":
            res = []
            for p, (value, mass) in zip(prompts, self.backend.expected_scores(prompts)):
                self.stats["score_calls"] += 1
                self.stats["score_token_mass_sum"] += mass
                if value != value:  # NaN: no probability on any score token
                    res.append(([], [], "no probability mass on the score tokens"))
                    continue
                if mass < self.min_score_mass:
                    self.stats["low_mass_failures"] += 1
                    res.append(([], [f"expected={value:.4f} mass={mass:.4f}"],
                                f"only {mass:.2%} of the probability on the score tokens (below min_score_mass "
                                f"{self.min_score_mass:.2%})"))
                    continue
                if p.dimension == "bystander":
                    value = 100.0 * (value - 1.0) / 4.0
                res.append(([value], [f"expected={value:.4f} mass={mass:.4f}"], None))
            return res
        texts = self.backend.generate(prompts, n=self.trials, temperature=self.temperature,
                                      max_new_tokens=self.max_new_tokens)
        res = []
        for p, samples in zip(prompts, texts):
            vals, reason = [], None
            for t in samples:
                self.stats["score_calls"] += 1
                try:
                    vals.append(parse_score(t, p.marker, p.lo, p.hi))
                except JudgeParseError as e:
                    self.stats["parse_failures"] += 1
                    reason = str(e)
            res.append((vals, list(samples), None if vals else reason))
        return res

    def score(self, responses: Sequence[str], contexts: Sequence[JudgeContext]) -> list[JudgeResult]:
        """Judge ``responses[i]`` as the reply to ``contexts[i]``; one :class:`JudgeResult` each."""
        if len(responses) != len(contexts):
            raise ValueError(f"{len(responses)} responses but {len(contexts)} contexts")
        jobs, parsed, crit = self._prompts(responses, contexts)
        results = [JudgeResult(scores={}, reward=None, format_ok=po.format_ok) for po in parsed]
        for r, po in zip(results, parsed):
            if not po.format_ok:
                self.stats["format_failures"] += 1
                r.failures["format"] = "no '# Analysis' / '# Response' headings"
        for (i, name, _), (vals, raw, reason) in zip(jobs, self._run(jobs)):
            r = results[i]
            r.raw[name] = raw
            r.scores[name] = sum(vals) / len(vals) if vals else None
            if reason is not None:
                r.failures[name] = reason
        for i, r in enumerate(results):
            r.criteria = {d.name: crit[(i, d.name)] for d in self.rubric.dimensions if (i, d.name) in crit}
            r.reward = self._reward(r, parsed[i].response)
            self.stats["items"] += 1
            self.stats["items_without_reward"] += r.reward is None
        return results

    def _reward(self, r: JudgeResult, response: str) -> float | None:
        dims = {d.name: d.hi for d in self.rubric.dimensions}
        scores = {}
        for name in dims:
            v = r.scores.get(name)
            if v is None:
                if "dimension" not in self.fallback:
                    return None
                v = self.fallback["dimension"]
                r.fallbacks.append(name)
                self.stats["fallbacks"] += 1
            scores[name] = v
        by = None
        if self.use_bystander:
            by = r.scores.get("bystander")
            if by is None:
                if "bystander" not in self.fallback:
                    return None
                by = self.fallback["bystander"]
                r.fallbacks.append("bystander")
                self.stats["fallbacks"] += 1
        if not r.format_ok and "dimension" not in self.fallback:
            return None
        pen = length_penalty(len(response.split()), self.length_limit, self.length_coef) if self.length_coef else 0.0
        return combine(scores, dims, self.rubric.aggregation, by, self.rubric.bystander_coef, pen)

    def report(self) -> dict[str, float]:
        """Counts so far: items, calls, parse/format/criteria failures, fallbacks, mean score-token mass."""
        s = dict(self.stats)
        calls = s.get("score_calls", 0)
        if self.mode == "expected" and calls:
            s["mean_score_token_mass"] = s.pop("score_token_mass_sum") / calls
        s.setdefault("parse_failures", 0)
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


__all__ = ["MIN_SCORE_MASS", "EmpathyJudge", "JudgeResult"]
