"""``persona-empathy`` v2: synthetic users whose traits show through many phrasing families, in normal English.

Each user has the three binary traits of v1 (:data:`~flythinker.persona.empathy_dataset.TRAITS`: strategy,
length, register) and, per trait, one phrasing family (:mod:`flythinker.persona.empathy_v2_families`) through which
their history shows it: said outright, praised, complained about, described, written in. A history is 3 to 5
sessions in random order: one per trait (where that trait's family speaks), 0-1 unrelated exchange and 0-1
plain one; the assistant's replies in it are short, with *random* strategy and register, except where a praise
(the user's value) or complaint (the other value) family needs one kind. The query is a neutral situation from
one of 12 topics. The reference reply is composed from sentence banks (:mod:`flythinker.persona.empathy_v2_banks`)
for the user's traits.

Splits, by user: 70% train, 15% validation, 15% test. Test users express every trait only through the held-out
families (:data:`~flythinker.persona.empathy_v2_families.TEST_FAMILIES`), which no training or validation user
uses. Deterministic in ``seed``. Dataset card: docs/persona_empathy_v2.md.
"""

from __future__ import annotations

import random

from .empathy_v2_banks import CLOSERS, OPENERS, QUERY_ENDINGS, QUERY_OPENINGS, TOPICS, UNRELATED, VALIDATION_MORE
from .empathy_v2_families import FAMILIES, families_for
from .records import Persona, PersonaRecord, Query, Turn
from .traits import TRAITS, split_users

VERSION = 2
SHORT_MAX_WORDS = 28  # short replies: opener + one step; detailed ones are longer (checked in the tests)
NEUTRAL_MESSAGES = ["{S}.", "Something happened: {s}.", "I need to talk about something. {S}.",
                    "I'm not sure what to do. {S}.", "{S}, and it's been on my mind all week."]
PLAIN_REACTIONS = ["Thanks.", "Okay, thank you.", "I'll think about it.", "Thanks for replying."]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def compose_response(traits: dict[str, str], topic: str, rng: random.Random) -> str:
    """The reply for ``traits`` about ``topic``: an opener of the strategy (and register); detailed adds a second
    validating sentence (validation first), four steps and a closing line; short has one step."""
    reg, strat, detailed = traits["register"], traits["strategy"], traits["length"] == "detailed"
    parts = [rng.choice(OPENERS[(strat, reg)])]
    if detailed and strat == "validation":
        parts.append(rng.choice(VALIDATION_MORE[reg]))
    parts += rng.sample(TOPICS[topic][1][reg], 4 if detailed else 1)
    if detailed:
        parts.append(rng.choice(CLOSERS[reg]))
    return " ".join(parts)


def _flip(trait: str, value: str) -> str:
    a, b = TRAITS[trait]
    return b if value == a else a


def _situation_message(rng: random.Random, style: list[str] | None) -> tuple[str, str]:
    topic = rng.choice(list(TOPICS))
    s = rng.choice(TOPICS[topic][0])
    template = rng.choice(style if style else NEUTRAL_MESSAGES)
    text = template.format(s=s, S=_cap(s))
    if style and template.startswith(("hey", "ugh", "ok")):
        text = text.replace(" I ", " i ").replace("I'm", "i'm")
    return topic, text


def _session(trait: str, value: str, family: str, rng: random.Random, style: list[str] | None) -> list[Turn]:
    """The session in which `trait`'s family speaks (a style family speaks in every message: a plain session)."""
    kind, lines = FAMILIES[trait][value][family]
    topic, message = _situation_message(rng, style)
    reply_traits = _history_reply_traits(rng)
    if kind == "praise":
        reply_traits[trait] = value
    elif kind == "complaint":
        reply_traits[trait] = _flip(trait, value)
    if kind == "say" and rng.random() < 0.5:  # said with the request, or after the reply
        return [Turn("user", f"{message} {rng.choice(lines)}"),
                Turn("assistant", compose_response(reply_traits, topic, rng)),
                Turn("user", rng.choice(PLAIN_REACTIONS))]
    reaction = rng.choice(lines) if kind != "style" else rng.choice(PLAIN_REACTIONS)
    return [Turn("user", message), Turn("assistant", compose_response(reply_traits, topic, rng)),
            Turn("user", reaction)]


def _history_reply_traits(rng: random.Random) -> dict[str, str]:
    """Random traits of an earlier assistant reply (short unless a length family needs a detailed one: histories
    stay near 200 tokens)."""
    return {"strategy": rng.choice(TRAITS["strategy"]), "register": rng.choice(TRAITS["register"]),
            "length": "short"}


def _plain_session(rng: random.Random, style: list[str] | None) -> list[Turn]:
    topic, message = _situation_message(rng, style)
    reply = compose_response(_history_reply_traits(rng), topic, rng)
    return [Turn("user", message), Turn("assistant", reply), Turn("user", rng.choice(PLAIN_REACTIONS))]


def _history(traits: dict[str, str], families: dict[str, str], rng: random.Random) -> list[Turn]:
    fam = families["register"]
    kind, lines = FAMILIES["register"][traits["register"]][fam]
    style = lines if kind == "style" else None
    sessions = [_session(t, traits[t], families[t], rng, style) for t in TRAITS]
    sessions += [[Turn("user", q), Turn("assistant", a)] for q, a in rng.sample(UNRELATED, rng.randint(0, 1))]
    sessions += [_plain_session(rng, style) for _ in range(rng.randint(0, 1))]
    rng.shuffle(sessions)
    return [t for s in sessions for t in s]


def _query(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(list(TOPICS))
    s, opening = rng.choice(TOPICS[topic][0]), rng.choice(QUERY_OPENINGS)
    return topic, f"{opening}{s if opening.endswith(', ') else _cap(s)}. {rng.choice(QUERY_ENDINGS)}"


def _user_records(uid: int, rng: random.Random, queries_per_user: int, held_out: bool) -> list[PersonaRecord]:
    traits = {name: rng.choice(values) for name, values in TRAITS.items()}
    families = {t: rng.choice(families_for(t, traits[t], held_out)) for t in TRAITS}
    user_id = f"v2u{uid:04d}"
    out = []
    for j in range(queries_per_user):
        history = _history(traits, families, rng)  # a fresh history per query: the same families, new words
        topic, query = _query(rng)
        out.append(PersonaRecord(
            record_id=f"{user_id}-q{j}", user_id=user_id, query=Query(text=query, category=topic),
            persona=Persona(traits=dict(traits)), history=history,
            response=compose_response(traits, topic, rng),
            meta={"topic": topic, "version": VERSION, "families": dict(families)}))
    return out


def make_persona_empathy_v2(n_users: int = 800, queries_per_user: int = 5, seed: int = 0
                            ) -> dict[str, list[PersonaRecord]]:
    """``{"train", "validation", "test"}`` records, split by user; test users use only held-out families."""
    if n_users < 3:
        raise ValueError(f"n_users must be >= 3 (one per split), got {n_users}")
    cuts = split_users(n_users, seed)
    rng = random.Random(seed)
    seeds = [rng.getrandbits(64) for _ in range(n_users)]
    return {split: [r for u in sorted(idx)
                    for r in _user_records(u, random.Random(seeds[u]), queries_per_user, split == "test")]
            for split, idx in cuts.items()}


__all__ = ["SHORT_MAX_WORDS", "VERSION", "compose_response", "make_persona_empathy_v2"]
