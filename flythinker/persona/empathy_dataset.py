"""The bundled ``persona-empathy`` benchmark: synthetic users whose hidden traits show only in their history.

Every user has three hidden binary traits (:data:`TRAITS`): ``strategy`` (validation before advice, or
practical steps first), ``length`` (short or detailed replies) and ``register`` (formal or casual). A user's
history is a few earlier sessions: the user's message, written in their register, and the assistant's reply
that followed their preferred strategy/length/register, then the user's thanks. The query is drawn from one
neutral pool shared by all users, so it carries no trait: only the history tells the traits apart. The target
response is the reply the traits imply (rule in :func:`compose_response`), about the query's topic.

Deterministic: the same arguments give the same records (``random.Random(seed)``; no global state).
Train/validation/test are split **by user** (70/15/15 of users). Defaults: 800 users x 5 queries = 4000
records. Word-level text (punctuation spaced out) so that a tiny word-level tokenizer covers it exactly.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from pathlib import Path

from .records import Persona, PersonaRecord, Query, Turn
from .traits import SPLITS, TRAITS, split_users

# Topic -> (situations [neutral wording], steps {register: [4 steps]}).
TOPICS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "work": (["my manager criticized my report in front of the whole team",
              "i was passed over for the promotion i worked toward all year"],
             {"formal": ["Request a brief meeting with your manager to discuss the feedback .",
                         "Write down the specific points that were raised .",
                         "Prepare a revised version of the work and share it .",
                         "Consider asking a trusted colleague for their perspective ."],
              "casual": ["maybe grab your boss for a quick chat about it .",
                         "jot down what they actually said .",
                         "fix up the work and send it back .",
                         "talk it over with a work buddy you trust ."]}),
    "family": (["my sister and i had a big argument at dinner",
                "my parents keep comparing me to my cousin"],
               {"formal": ["Allow a day for emotions to settle before responding .",
                           "Explain calmly how the situation affected you .",
                           "Propose a specific time to talk privately .",
                           "Focus on one concrete issue rather than the whole history ."],
                "casual": ["give it a day so everyone cools off .",
                           "tell them straight up how it made you feel .",
                           "pick a chill time to talk one on one .",
                           "stick to one thing instead of dragging up old stuff ."]}),
    "friends": (["my best friend forgot my birthday",
                 "my friends made plans without inviting me"],
                {"formal": ["Let your friend know that you felt overlooked .",
                            "Ask whether something else has been occupying them lately .",
                            "Suggest an activity you could enjoy together soon .",
                            "Reflect on which friendships are reciprocal ."],
                 "casual": ["just tell them you felt kinda left out .",
                            "ask if something's been up with them lately .",
                            "throw out a fun hangout idea for this week .",
                            "think about who actually shows up for you ."]}),
    "health": (["i have not been sleeping well for weeks",
                "i feel exhausted all the time lately"],
               {"formal": ["Keep a consistent schedule for sleep and waking .",
                           "Reduce screen use during the hour before bed .",
                           "Schedule an appointment with your physician .",
                           "Record your sleep and energy levels for one week ."],
                "casual": ["try crashing and waking up at the same time every day .",
                           "ditch your phone for an hour before bed .",
                           "book a doctor visit to rule stuff out .",
                           "track how you sleep and feel for a week ."]}),
    "money": (["i spent more than i planned and rent is due soon",
               "an unexpected repair bill wiped out my savings"],
              {"formal": ["List all essential expenses for the coming month .",
                          "Contact your landlord early to discuss a payment arrangement .",
                          "Identify two expenses you can pause temporarily .",
                          "Set aside a small fixed amount each week ."],
               "casual": ["write out every bill you gotta pay this month .",
                          "hit up your landlord early about a payment plan .",
                          "cut two things you can live without for now .",
                          "stash a little cash every week ."]}),
    "study": (["i failed an important exam",
               "i am falling behind in all my classes"],
              {"formal": ["Review the exam to identify which topics caused difficulty .",
                          "Arrange a meeting with your instructor during office hours .",
                          "Create a study schedule with short daily sessions .",
                          "Form a study group with classmates ."],
               "casual": ["go over the test and see where it went wrong .",
                          "swing by your teacher's office hours .",
                          "do short study bursts every day .",
                          "team up with some classmates to study ."]}),
    "moving": (["i just moved to a new city and feel lonely",
                "i moved away and miss my old friends"],
               {"formal": ["Join a local club or class related to your interests .",
                           "Schedule regular calls with friends from home .",
                           "Explore one new neighbourhood each week .",
                           "Accept invitations even when they feel unfamiliar ."],
                "casual": ["check out a club or class for stuff you're into .",
                           "set up regular calls with your old crew .",
                           "wander around a new spot every week .",
                           "say yes to invites even if it feels weird ."]}),
    "breakup": (["my partner ended our relationship last week",
                 "my relationship ended and i keep thinking about it"],
                {"formal": ["Limit contact with your former partner for now .",
                            "Spend time with people who support you .",
                            "Return to a routine that gives your days structure .",
                            "Write about your feelings in a journal ."],
                 "casual": ["maybe mute them for a while .",
                            "hang out with people who've got your back .",
                            "get back into a daily routine .",
                            "dump your feelings into a journal ."]}),
}
QUERY_ENDINGS = ["what do you think ?", "can you help me ?", "i do not know how to handle it .",
                 "i wanted to talk about it ."]
# Openers per (strategy, register): the first sentence carries the strategy.
OPENERS = {
    ("validation", "formal"): ["I am truly sorry you are going through this .",
                               "That sounds genuinely painful , and your feelings are completely understandable .",
                               "It is entirely natural to feel hurt by this ."],
    ("validation", "casual"): ["oh no , that really sucks .",
                               "ugh , that sounds super rough , and it's totally okay to feel upset .",
                               "man , no wonder you're feeling awful ."],
    ("steps", "formal"): ["Here is a practical plan .", "Let us focus on concrete steps .",
                          "I recommend the following approach ."],
    ("steps", "casual"): ["ok , here's the plan .", "alright , let's sort this out .",
                          "so , here's what i'd do ."],
}
VALIDATION_MORE = {"formal": ["Anyone in your position would feel the same .",
                              "Your reaction shows how much this matters to you ."],
                   "casual": ["honestly anyone would feel like that .", "it's obvious you really care ."]}
CLOSERS = {"formal": ["Please take good care of yourself .", "You are handling this with great maturity ."],
           "casual": ["you got this .", "hang in there , ok ?"]}
USER_WRAP = {"formal": ["Good evening . {s} , and I would appreciate your advice .",
                        "Hello . I am writing because {s} ."],
             "casual": ["hey so {s} lol", "ugh {s} , idk what to do"]}
USER_THANKS = {"formal": ["Thank you , that was helpful .", "I appreciate your reply ."],
               "casual": ["thx , that helped a lot", "cool thanks !!"]}
SHORT_MAX_WORDS = 28  # short replies have <= 23 words, detailed ones >= 33 (checked in the tests)


def compose_response(traits: dict[str, str], topic: str, rng: random.Random) -> str:
    """The reply a user with ``traits`` wants about ``topic``.

    validation-first: empathic opener (+ one more validating sentence when detailed), then steps;
    steps-first: plan opener, then steps. short: one step; detailed: all four steps and a closing line.
    """
    reg, strat, detailed = traits["register"], traits["strategy"], traits["length"] == "detailed"
    steps = TOPICS[topic][1][reg]
    parts = [rng.choice(OPENERS[(strat, reg)])]
    if detailed and strat == "validation":
        parts.append(rng.choice(VALIDATION_MORE[reg]))
    parts += rng.sample(steps, 4 if detailed else 1)
    if detailed:
        parts.append(rng.choice(CLOSERS[reg]))
    return " ".join(parts)


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def _user_message(register: str, situation: str, rng: random.Random) -> str:
    wrap = rng.choice(USER_WRAP[register])
    return wrap.format(s=_capitalise(situation) if register == "formal" and wrap.startswith("Good") else situation)


def _user_records(uid: int, rng: random.Random, queries_per_user: int, history_sessions: tuple[int, int],
                  pool_size: int) -> list[PersonaRecord]:
    traits = {name: rng.choice(values) for name, values in TRAITS.items()}
    topics = list(TOPICS)
    # The user's past sessions: their message (their register) -> the reply they wanted -> their thanks.
    pool = []
    for _ in range(pool_size):
        topic = rng.choice(topics)
        situation = rng.choice(TOPICS[topic][0])
        pool.append([Turn("user", _user_message(traits["register"], situation, rng)),
                     Turn("assistant", compose_response(traits, topic, rng)),
                     Turn("user", rng.choice(USER_THANKS[traits["register"]]))])
    user_id = f"u{uid:04d}"
    out = []
    for j in range(queries_per_user):
        k = rng.randint(*history_sessions)
        chosen = sorted(rng.sample(range(pool_size), k))  # keep chronological order
        history = [t for i in chosen for t in pool[i]]
        topic = rng.choice(topics)
        query = f"{rng.choice(TOPICS[topic][0])} . {rng.choice(QUERY_ENDINGS)}"  # neutral: no trait in it
        out.append(PersonaRecord(
            record_id=f"{user_id}-q{j}", user_id=user_id, query=Query(text=query, category=topic),
            persona=Persona(traits=dict(traits)), history=history,
            response=compose_response(traits, topic, rng), meta={"topic": topic}))
    return out


def make_persona_empathy(n_users: int = 800, queries_per_user: int = 5, seed: int = 0,
                         history_sessions: tuple[int, int] = (2, 3), pool_size: int = 4,
                         ) -> dict[str, list[PersonaRecord]]:
    """Generate the benchmark: ``{"train": [...], "validation": [...], "test": [...]}``, split by user.

    Args:
        n_users: synthetic users (at least 3: one per split); each has hidden traits (strategy, length, register)
            that show only in their history.
        queries_per_user: records per user, each one query with its reference reply.
        seed: the one seed of the whole set (the same seed gives the same records).
        history_sessions: ``(lo, hi)``: each record's history holds between lo and hi of its user's past sessions,
            in order.
        pool_size: past sessions per user that the histories are drawn from (``1 <= lo <= hi <= pool_size``).

    Returns:
        The three splits as lists of :class:`PersonaRecord`, no user in two splits.
    """
    if n_users < 3:
        raise ValueError(f"n_users must be >= 3 (one per split), got {n_users}")
    lo, hi = history_sessions
    if not (1 <= lo <= hi <= pool_size):
        raise ValueError(f"history_sessions={history_sessions} must satisfy 1 <= lo <= hi <= pool_size={pool_size}")
    rng = random.Random(seed)
    users = [_user_records(u, random.Random(rng.getrandbits(64)), queries_per_user, history_sessions, pool_size)
             for u in range(n_users)]
    cuts = split_users(n_users, seed)
    return {split: [r for u in sorted(idx) for r in users[u]] for split, idx in cuts.items()}


def load_persona_empathy(split: str = "train", cache_dir: str | Path | None = None, version: int = 1,
                         **kwargs) -> list[PersonaRecord]:
    """One split of ``persona-empathy`` `version` 1 (this module) or 2 (:mod:`flythinker.persona.empathy_v2`).
    With ``cache_dir`` (e.g. ``flythinker.hub.cache_dir() / "data"``) the
    splits are written once as JSON lines and read back with ``load_records``; else generated in memory.

    The cache folder is written atomically (``flythinker.hub.atomic_directory``) with a ``manifest.json`` of each
    split's record count and sha256, checked on every read: a folder that does not match (a run killed while
    writing it, an older layout without a manifest, a file edited by hand) is rebuilt, with a warning, never used.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if version not in (1, 2):
        raise ValueError(f"persona-empathy version must be 1 or 2, got {version!r}")
    if version == 2:
        from .empathy_v2 import make_persona_empathy_v2 as make
    else:
        make = make_persona_empathy
    if cache_dir is None:
        return make(**kwargs)[split]
    from flythinker.hub import file_lock

    tag = "-".join(f"{k}{v}" for k, v in sorted(kwargs.items())) or "default"
    folder = Path(cache_dir) / f"persona-empathy-v{version}-{tag}".replace(" ", "").replace(",", "_")
    records, problem = _read_cache(folder, split)
    if records is not None:
        return records
    with file_lock(folder.parent / f".{folder.name}.lock"):  # one builder when several processes start at once
        records, problem = _read_cache(folder, split)
        if records is not None:
            return records
        if problem is not None:
            warnings.warn(f"persona-empathy cache {folder} is not valid ({problem}): rebuilding it", stacklevel=2)
        data = make(**kwargs)
        _write_cache(folder, data)
    return data[split]


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_cache(folder: Path, split: str) -> tuple[list[PersonaRecord] | None, str | None]:
    """(the split's records, None) if the cached folder matches its manifest, else (None, what is wrong) -- the
    problem is None when there is no folder at all."""
    from .loaders import load_records

    if not folder.exists():
        return None, None
    try:
        entry = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["splits"][split]
        path = folder / f"{split}.jsonl"
        if _sha256(path) != entry["sha256"]:
            return None, f"{path.name} does not match the sha256 in {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"no usable {MANIFEST} entry or file for {split!r}: {type(e).__name__}: {e}"
    records = load_records(path, format="flythinker")
    if len(records) != entry.get("records"):
        return None, f"{path.name} has {len(records)} records, {MANIFEST} says {entry.get('records')}"
    return records, None


def _write_cache(folder: Path, data: dict[str, list[PersonaRecord]]) -> None:
    """All splits + the manifest, built in a temporary sibling of `folder` and moved into place at once."""
    from flythinker.hub import atomic_directory

    from .loaders import save_records

    with atomic_directory(folder) as tmp:
        splits = {}
        for name, records in data.items():
            save_records(records, tmp / f"{name}.jsonl")
            splits[name] = {"records": len(records), "sha256": _sha256(tmp / f"{name}.jsonl")}
        (tmp / MANIFEST).write_text(json.dumps({"dataset": "persona-empathy", "splits": splits}, indent=1),
                                    encoding="utf-8")
