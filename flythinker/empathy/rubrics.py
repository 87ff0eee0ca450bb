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
    definition: str = ""
    checks: tuple[str, ...] = ()

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

# Level texts in our own words, carrying the definitions and checks of the PERM paper's rubric.
RESONATION_DEFINITION = (
    "How accurately and deeply the supporter enters the person's internal frame of reference: not only what was "
    "said, but the implicit feelings, what caused them, and why the experience matters to this person.")
RESONATION_LEVELS = {
    1: "Misreading: contradicts the facts given, attributes a feeling or cause with no basis in the text, or "
       "misses the core message.",
    2: "Labelling: names the obvious emotion or echoes the person's words, but not why they feel it; a summary "
       "rather than understanding.",
    3: "Accurate but literal: links the main explicit feeling to its immediate cause without over- or "
       "under-reading; stays on the surface, no mixed or hidden layers.",
    4: "Nuanced: brings subtle or conflicting signals together (e.g. the person's history against their present "
       "tone), catches mixed or unexpected feelings, grounded in the evidence rather than a stereotype.",
    5: "Value-level: explains the inner mechanism behind a complex feeling and ties the event to the person's "
       "identity, values or core needs (autonomy, dignity, growth): why it matters so much to them.",
}
EXPRESSION_DEFINITION = (
    "How the supporter communicates: tone, warmth and craft; whether the reply sounds formulaic or adapts "
    "fluidly to the person and helps them go further.")
EXPRESSION_LEVELS = {
    1: "Machine-like: cold, list-like or templated, no emotional adaptation.",
    2: "Service-like: polite and correct but hollow; stock phrases ('it is valid to feel...') or generic advice.",
    3: "Natural: talks directly like a real person, warm and functional, no preambles, but not tailored to this "
       "person.",
    4: "Calibrated: tone fitted to this person's state and personality (gentle for the fragile, grounded for the "
       "sceptical), a 'we are in this together' feel; may lack memorable precision.",
    5: "Artful: precise, vivid and concise wording that lands at once and stays with the person.",
}
RECEPTION_DEFINITION = (
    "The exchange from the person's own side: did the reply find the unspoken need behind the message and meet "
    "it in a way that feels warm, safe and worth continuing?")
RECEPTION_CHECKS = (
    "Safety: does it feel like a warm friend or an intrusive analyst? Intrusiveness scores low.",
    "Need: did it answer what I really wanted (e.g. validation, safety, autonomy) or only what I literally said?",
    "Engagement: do I want to reply and tell more?",
)
RECEPTION_LEVELS = {
    1: "Alienated: intrusive (private details listed bluntly, unwanted analysis), dismissive or hostile; I would "
       "stop talking.",
    2: "Processed: polite and on topic but changes nothing for me; stock reassurance or generic tips.",
    3: "Relieved: real warmth about how hard this is; I feel calmer and less alone, but it answers the visible "
       "feeling, not the need underneath.",
    4: "Helped: it names and meets the need I did not say, with a useful perspective or next step; I feel "
       "understood and equipped.",
    5: "Moved: it meets the hidden need and touches me; I feel grateful and want to keep talking, now and next "
       "time.",
}
# PereGRM's general criteria put this person's stable traits (from memories and persona) at the centre.
PERSONAL_DEFINITIONS = {
    "resonation": RESONATION_DEFINITION + " Weigh especially the link between the feeling and this person's "
                  "stable traits (from the memories), and the deeper need behind the reaction.",
    "expression": EXPRESSION_DEFINITION + " Weigh especially whether the communication strategy is tailored to "
                  "this person's traits and psychological needs.",
    "reception": RECEPTION_DEFINITION + " Judge as this particular person, given their personality and needs.",
}
BYSTANDER_PARTS = (
    "content effectiveness (does it help with the actual problem)",
    "logical structure and clarity",
    "communication efficiency (no padding or repetition)",
    "objectivity and neutrality (fair, no unfounded judgements)",
    "accuracy (no false or unverifiable claims)",
)


def _empathy_dims(marker: str, resonation_reads: str, personal: bool = False) -> tuple[Dimension, ...]:
    defs = PERSONAL_DEFINITIONS if personal else {"resonation": RESONATION_DEFINITION,
                                                   "expression": EXPRESSION_DEFINITION,
                                                   "reception": RECEPTION_DEFINITION}
    return (
        Dimension("resonation", "supporter", resonation_reads, 1, 5, marker,
                  "How well does the supporter understand the person's inner experience?", RESONATION_LEVELS,
                  defs["resonation"]),
        Dimension("expression", "supporter", "response", 1, 5, marker,
                  "How well does the reply express care in a way suited to this person?", EXPRESSION_LEVELS,
                  defs["expression"]),
        Dimension("reception", "seeker", "response", 1, 5, marker,
                  "Imagine you are this person and you receive this reply. How does it land?", RECEPTION_LEVELS,
                  defs["reception"], RECEPTION_CHECKS),
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
    ``dynamic_criteria=True`` (training): one judge call writes criteria for this user, an analysis and the score;
    ``False`` (evaluation): the judge scores against fixed criteria written beforehand. Its
    training reward is the harmonic mean; its evaluation reports the arithmetic mean (``aggregation="mean"``)."""
    return Rubric("peregrm", _empathy_dims("boxed", "response", personal=True), BYSTANDER, aggregation=aggregation,
                  bystander_coef=bystander_coef, dynamic_criteria=dynamic_criteria)


RUBRICS = {"perm": perm_rubric, "peregrm": peregrm_rubric}


def get_rubric(name: str, **kwargs) -> Rubric:
    """A rubric by name (``"perm"`` or ``"peregrm"``) with its builder's keyword options."""
    if name not in RUBRICS:
        raise ValueError(f"unknown rubric {name!r}; choose from {sorted(RUBRICS)}")
    return RUBRICS[name](**kwargs)


__all__ = ["AGGREGATIONS", "BYSTANDER", "BYSTANDER_PARTS", "PERSONAL_DEFINITIONS", "RECEPTION_CHECKS", "RUBRICS",
           "Dimension", "Rubric", "get_rubric", "perm_rubric", "peregrm_rubric"]
