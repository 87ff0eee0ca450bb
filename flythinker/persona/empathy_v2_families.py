"""Phrasing families of ``persona-empathy`` v2: the ways a user's history shows each trait value.

``FAMILIES[trait][value][family] = (kind, phrasings)``. Kinds:

- ``say``: the user says it (an explicit request, a self-description, asking again for their kind of reply, an
  implicit cue such as a formal sign-off or a long explanation); the line is added to one of their messages.
- ``praise``: the assistant's earlier reply had the value, the user's next message praises it.
- ``complaint``: the assistant's earlier reply had the other value, the user's next message objects to it.
- ``style`` (register only): every situation message the user writes is in their register.

:data:`TEST_FAMILIES` (per trait value) are held out: only test users use them, training and validation users
never do. docs/persona_empathy_v2.md lists every family.
"""

from __future__ import annotations

FAMILIES: dict[str, dict[str, dict[str, tuple[str, list[str]]]]] = {
    "strategy": {
        "validation": {
            "ask_to_be_heard": ("say", ["Before you give me any advice, I just need someone to hear me out.",
                                        "Please don't jump to solutions, I mostly need to vent.",
                                        "I don't want a to-do list right now, I want someone to understand."]),
            "complains_of_plan": ("complaint", ["That felt like a checklist. I wasn't ready for a plan yet.",
                                                "You went straight to fixing it. I just wanted to feel heard.",
                                                "Honestly, that was a bit cold. A plan wasn't what I needed."]),
            "praises_comfort": ("praise", ["Thank you for acknowledging how I felt before anything else.",
                                           "It helped that you understood first. I needed that.",
                                           "That was kind. Being heard made the rest easier."]),
            "describes_self": ("say", ["I'm the sort of person who has to feel understood before I can think "
                                       "about fixes.",
                                       "People who know me know I need sympathy first and advice later.",
                                       "When I'm upset, advice bounces off me until someone gets how I feel."]),
            "asks_for_reassurance": ("say", ["Can you just tell me it's okay to feel this way?",
                                             "Again, I mostly need some reassurance, not instructions.",
                                             "Could you start by saying something kind? That's what I need most."]),
            "dwells_on_feelings": ("say", ["I've been crying on and off all day and I feel so alone with it.",
                                           "My chest feels tight and I keep replaying it. It's all just so much.",
                                           "I feel completely crushed, and nobody around me seems to notice."]),
        },
        "steps": {
            "asks_for_plan": ("say", ["Skip the sympathy, please. Just tell me what to do.",
                                      "I need concrete steps, not reassurance.",
                                      "Give me a plan I can act on today."]),
            "complains_of_comfort": ("complaint", ["I appreciate the kind words, but I needed actual steps.",
                                                   "That was sweet, but it didn't tell me what to do.",
                                                   "Less sympathy next time, please, more of a plan."]),
            "praises_plan": ("praise", ["That list was exactly what I needed. Thanks.",
                                        "Perfect, clear steps. I already did the first one.",
                                        "Great, a plan I can follow. That's what helps me."]),
            "describes_self": ("say", ["I'm a fixer. Feelings can wait until I know what to do.",
                                       "When something goes wrong I calm down by making a plan.",
                                       "I cope by taking action, so practical advice works best for me."]),
            "asks_next_step": ("say", ["What's the first thing I should do?",
                                       "Okay, and what are the next steps after that?",
                                       "Can you break it down into steps for me?"]),
            "is_in_a_hurry": ("say", ["I don't have time to dwell on it. I need to sort it out by Friday.",
                                      "I've already processed it emotionally. Now I need to deal with the logistics.",
                                      "Let's be practical about this. The deadline is close."]),
        },
    },
    "register": {
        "formal": {
            "writes_formally": ("style", ["Good evening. {S}, and I would appreciate your advice.",
                                          "Hello. I am writing because {s}.",
                                          "I hope you are well. Regrettably, {s}."]),
            "asks_for_formality": ("say", ["Please keep your replies professional.",
                                           "I would prefer a more formal tone, if you do not mind.",
                                           "Kindly avoid slang in your answers."]),
            "complains_of_slang": ("complaint", ["I found that reply rather too casual.",
                                                 "The slang in your last message was off-putting to me.",
                                                 "Please do not address me so informally."]),
            "praises_courtesy": ("praise", ["Thank you for such a courteous and well-phrased reply.",
                                            "I appreciated the measured, professional tone.",
                                            "That was thoughtfully and properly expressed. Thank you."]),
            "describes_self": ("say", ["I work as a solicitor, and I tend to prefer a certain formality.",
                                       "I was brought up to value good manners in conversation.",
                                       "I am rather old-fashioned about how people write."]),
            "signs_off_formally": ("say", ["With thanks and kind regards.",
                                           "Yours sincerely, and thank you in advance.",
                                           "Many thanks for your time and consideration."]),
        },
        "casual": {
            "writes_casually": ("style", ["hey so {s} lol", "ugh {s}, idk what to do", "ok so {s} haha"]),
            "asks_for_casual": ("say", ["You can talk to me like a friend, no need to be so proper.",
                                        "Drop the formal stuff, just talk normally.",
                                        "Keep it chill, I'm not your boss lol."]),
            "complains_of_stiffness": ("complaint", ["That sounded like a letter from my bank haha.",
                                                     "Bit stiff, no? You can loosen up.",
                                                     "Wow, very formal. You don't need to be so stiff with me."]),
            "praises_ease": ("praise", ["Haha love how chill that was, thanks!",
                                        "That felt like talking to a mate, cheers.",
                                        "Nice, super easy to read, thanks dude."]),
            "describes_self": ("say", ["I'm pretty laid back, fancy words kinda lose me.",
                                       "I'm a student, I talk like one haha.",
                                       "I'm not a formal person at all, never have been."]),
            "uses_slang": ("say", ["tysm!! :)", "lol yeah fair enough", "omg ok ok that makes sense"]),
        },
    },
    "length": {
        "short": {
            "asks_for_brevity": ("say", ["Keep it short, please.", "Just the gist, I don't have much time.",
                                         "One or two lines is plenty for me."]),
            "complains_of_length": ("complaint", ["That was way too long. I stopped reading halfway.",
                                                  "Too much text. I just needed the main point.",
                                                  "Could you be briefer? That was a wall of text."]),
            "praises_brevity": ("praise", ["Short and to the point. Perfect.", "Thanks, quick and clear.",
                                           "Love that it was brief."]),
            "describes_self": ("say", ["I read your replies on my phone between meetings.",
                                       "I have a short attention span for long messages.",
                                       "I'm the type who skims, so brevity helps."]),
            "asks_for_summary": ("say", ["TL;DR?", "Can you sum that up in one line?", "Shorter version?"]),
            "writes_tersely": ("say", ["On the bus. Quick answer?", "No time. Bottom line?", "In a rush, sorry."]),
        },
        "detailed": {
            "asks_for_detail": ("say", ["Please be thorough, I want the full picture.",
                                        "Don't hold back on details, I like to understand everything.",
                                        "Give me the long version, please."]),
            "complains_of_brevity": ("complaint", ["That was a bit thin. Can you say more?",
                                                   "Too brief, I needed more than one line.",
                                                   "That felt rushed. I wanted more detail."]),
            "praises_thoroughness": ("praise", ["Thanks for the thorough answer, really helpful.",
                                                "I love how much detail you put in.",
                                                "That was comprehensive, exactly what I wanted."]),
            "describes_self": ("say", ["I'm a detail person and I like to see every step.",
                                       "I overthink, so I like having all the information.",
                                       "I'm an engineer, I want the full breakdown."]),
            "asks_to_expand": ("say", ["Can you expand on that?", "Tell me more, what else should I consider?",
                                       "Could you go into more depth?"]),
            "writes_at_length": ("say", ["I'll try to explain everything properly, because the background "
                                         "matters here and I want you to have all of it.",
                                         "Sorry for the long message, but I think every part of this is "
                                         "relevant, so bear with me.",
                                         "Let me give you the whole story from the beginning so nothing is "
                                         "missing."]),
        },
    },
}

# held out: test users show their traits only through these families (training and validation users never do)
TEST_FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "strategy": {"validation": ("describes_self", "asks_for_reassurance"),
                 "steps": ("describes_self", "asks_next_step")},
    "register": {"formal": ("describes_self", "signs_off_formally"),
                 "casual": ("describes_self", "uses_slang")},
    "length": {"short": ("describes_self", "asks_for_summary"),
               "detailed": ("describes_self", "asks_to_expand")},
}


def families_for(trait: str, value: str, held_out: bool) -> list[str]:
    """The family names of (trait, value) that test users (`held_out`) or the other users may use."""
    test = TEST_FAMILIES[trait][value]
    return [f for f in FAMILIES[trait][value] if (f in test) == held_out]
