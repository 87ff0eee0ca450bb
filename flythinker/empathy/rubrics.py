"""Judge rubrics as data: dimensions, scales, what each dimension reads, and level descriptions.

Two families, after the papers (prompts and wording here are our own):

- **PERM** (Wang, Zheng et al., "PERM: Psychology-grounded Empathetic Reward Modeling", arXiv 2601.10532; the
  Empathy Cycle): the *supporter*'s resonation (inner understanding: judged on the policy's analysis part when it
  writes one) and expression (how it is said), the *seeker*'s reception (the judge takes the user's place), each
  1-5; a *bystander* view of the whole exchange, 0-100 over five 0-20 dimensions.
- **PereGRM** (Zheng et al., "From Empathy to Personalized Empathy", arXiv 2606.00728): the same three dimensions,
  each scored 1-5 in ``\\boxed{x}`` after the judge writes criteria specific to *this* user (persona, memories,
  situation) -- or against fixed criteria for evaluation -- plus the same bystander view.

A :class:`Dimension` says where its text comes from (``reads``: ``"analysis"``, ``"response"`` or ``"exchange"``),
its integer scale, the output marker the parser reads (``"score_line"``: ``Score: N``; ``"boxed"``: ``\\boxed{N}``;
``"total"``: ``Total Score: N/100``) and the level descriptions shown to the judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Dimension:
    """One judged dimension. ``lo``..``hi``: the integer scale; ``levels``: ``{score: description}``."""

    name: str
    perspective: str  # supporter | seeker | bystander
    reads: str  # analysis | response | exchange
    lo: int
    hi: int
    marker: str  # score_line | boxed | total
    question: str
    levels: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reads not in ("analysis", "response", "exchange"):
            raise ValueError(f"Dimension.reads must be analysis/response/exchange, got {self.reads!r}")
        if self.marker not in ("score_line", "boxed", "total"):
            raise ValueError(f"Dimension.marker must be score_line/boxed/total, got {self.marker!r}")
        if not self.lo < self.hi:
            raise ValueError(f"Dimension {self.name}: lo={self.lo} must be < hi={self.hi}")


@dataclass(frozen=True)
class Rubric:
    """A judge rubric: the empathy dimensions, the bystander, and how the reward combines them.

    ``aggregation``: ``"mean" | "harmonic" | "geometric"`` over the empathy dimensions' ``score/hi``;
    ``bystander_coef``: weight of the bystander term ``coef * (B/100 - 1)`` (a penalty in [-coef, 0]);
    ``dynamic_criteria``: PereGRM's first judge call writes user-specific criteria per dimension.
    """

    name: str
    dimensions: tuple[Dimension, ...]
    bystander: Dimension | None
    aggregation: str = "harmonic"
    bystander_coef: float = 0.5
    dynamic_criteria: bool = False

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not self.dimensions:
            raise ValueError("a rubric needs at least one dimension")
        coef = self.bystander_coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0.0 <= coef < float("inf"):
            raise ValueError(f"bystander_coef must be a finite number >= 0 (the term coef * (B/100 - 1) is a "
                             f"penalty in [-coef, 0]), got {coef!r}")

    def dimension(self, name: str) -> Dimension:
        for d in self.dimensions + ((self.bystander,) if self.bystander else ()):
            if d.name == name:
                return d
        raise KeyError(f"rubric {self.name!r} has no dimension {name!r}")


AGGREGATIONS = ("mean", "harmonic", "geometric")

RESONATION_LEVELS = {
    1: "Misreads the person: invents feelings or facts that are not there, or contradicts what they said.",
    2: "Names an obvious emotion in general terms only, without tying it to this person's situation.",
    3: "Identifies the person's explicit feelings and their immediate cause correctly.",
    4: "Connects the feelings to the person's circumstances, history or traits, and sees unstated needs.",
    5: "Grasps what the situation means to this person at the level of their values, and what they need most.",
}
EXPRESSION_LEVELS = {
    1: "Mechanical or scripted; ignores the person's state or is cold.",
    2: "Polite but generic or clinical: stock sympathy phrases and boilerplate safety advice.",
    3: "Natural and direct; the care is sincere and the wording fits the conversation.",
    4: "Calibrated to this person: tone, length and balance of comfort and advice as a close friend would choose.",
    5: "Skilful and personal: every sentence serves this person, warm and specific without excess.",
}
RECEPTION_LEVELS = {
    1: "I would feel misunderstood, hurt or ignored, or a boundary of mine was crossed.",
    2: "It is polite, but it does not touch what I am going through.",
    3: "I feel my feelings were acknowledged and taken seriously.",
    4: "It addresses what I actually needed, even the part I did not say out loud.",
    5: "I feel deeply understood and would want to keep talking.",
}
BYSTANDER_PARTS = (
    "content effectiveness (does it help with the actual problem)",
    "logical structure and clarity",
    "communication efficiency (no padding or repetition)",
    "objectivity and neutrality (fair, no unfounded judgements)",
    "accuracy (no false or unverifiable claims)",
)


def _empathy_dims(marker: str, resonation_reads: str) -> tuple[Dimension, ...]:
    return (
        Dimension("resonation", "supporter", resonation_reads, 1, 5, marker,
                  "How well does the supporter understand the person's inner experience?", RESONATION_LEVELS),
        Dimension("expression", "supporter", "response", 1, 5, marker,
                  "How well does the reply express care in a way suited to this person?", EXPRESSION_LEVELS),
        Dimension("reception", "seeker", "response", 1, 5, marker,
                  "Imagine you are this person and you receive this reply. How does it land?", RECEPTION_LEVELS),
    )


BYSTANDER = Dimension(
    "bystander", "bystander", "exchange", 0, 100, "total",
    "As a neutral observer of this exchange, rate the reply's overall quality. Give each of the five parts 0-20 "
    "and report their sum.", {})


def perm_rubric(analysis: bool = True, aggregation: str = "harmonic", bystander_coef: float = 0.5) -> Rubric:
    """PERM: resonation on the policy's ``# Analysis`` part (``analysis=True``; else on the response), expression
    and reception on the ``# Response`` part, ``Score: N`` on 1-5; bystander 0-100. PERM's script uses harmonic
    aggregation and coef 0.5 (its default is 0.1)."""
    return Rubric("perm", _empathy_dims("score_line", "analysis" if analysis else "response"), BYSTANDER,
                  aggregation=aggregation, bystander_coef=bystander_coef)


def peregrm_rubric(dynamic_criteria: bool = True, bystander_coef: float = 0.5, aggregation: str = "harmonic"
                   ) -> Rubric:
    """PereGRM: all three dimensions on the response, ``\\boxed{N}`` on 1-5, bystander coef 0.5;
    ``dynamic_criteria=True`` (training) writes criteria per user first, ``False`` uses fixed criteria. Its
    training reward is the harmonic mean; its evaluation reports the arithmetic mean (``aggregation="mean"``)."""
    return Rubric("peregrm", _empathy_dims("boxed", "response"), BYSTANDER, aggregation=aggregation,
                  bystander_coef=bystander_coef, dynamic_criteria=dynamic_criteria)


RUBRICS = {"perm": perm_rubric, "peregrm": peregrm_rubric}


def get_rubric(name: str, **kwargs) -> Rubric:
    """A rubric by name (``"perm"`` or ``"peregrm"``) with its builder's keyword options."""
    if name not in RUBRICS:
        raise ValueError(f"unknown rubric {name!r}; choose from {sorted(RUBRICS)}")
    return RUBRICS[name](**kwargs)


__all__ = ["AGGREGATIONS", "BYSTANDER", "BYSTANDER_PARTS", "RUBRICS", "Dimension", "Rubric", "get_rubric",
           "perm_rubric", "peregrm_rubric"]
